#!/usr/bin/env bash
# Train a flexible BERT for $TASK: teacher fine-tuning -> width-adaptive training with neural grafting ->
# depth-adaptive training -> final fine-tuning. Extra arguments are passed to every run_glue.py call.
# Environment: TASK, BERT_DIR, DATA_DIR, OUT_DIR (and TEACHER_DIR, W_BERT, WD_BERT), PROFILE=quick|full|paper
# (configs/<PROFILE>.json; QUICK=1 is PROFILE=quick), FORCE=1, GRAFT=0|1 (width stage without/with neural
# grafting; default: the profile's), STAGES (default "teacher width depth final": the stages to run).
# Your own data instead of DATA_DIR: TRAIN_FILE, VALIDATION_FILE, TEST_FILE and the column variables
# (pipeline_env.sh); with the paper profile the augmented copy is made beside TRAIN_FILE.
# A TEACHER_DIR given in the environment that holds a model this script did not train (a downloaded
# task-fine-tuned BERT) is used as the teacher: the teacher stage is skipped.
set -euo pipefail
cd "$(dirname "$0")"
source pipeline_env.sh

COMMON=(--model_type bert --task_name "$TASK" --do_train "${DATA_ARGS[@]}" --max_seq_length "$MAX_SEQ_LENGTH"
        --per_gpu_train_batch_size "$PROFILE_TRAIN_BATCH_SIZE" --per_gpu_eval_batch_size 32)
PRECISION=()
if [ "$PROFILE_BF16" = 1 ] || { [ "$PROFILE_BF16" = auto ] && $PY run_profile.py --bf16_supported; }; then
  PRECISION=(--bf16)
fi
GRAFT_ARGS=(); [ "${GRAFT:-$GRAFT_DEFAULT}" = 0 ] || GRAFT_ARGS=(--graft_during_training)
STAGES=" ${STAGES:-teacher width depth final} "
wanted() { [[ "$STAGES" == *" $1 "* ]]; }

if [ -n "$OWN_DATA" ]; then  # augment_data.py writes <stem>_aug<suffix> beside your TRAIN_FILE
  TRAIN=${TRAIN_FILE:-}
  AUG_FILES=("${TRAIN%.*}_aug.${TRAIN##*.}")
  AUG_ARGS=(--train_file "$TRAIN" ${TEXT_COLUMN:+--text_column "$TEXT_COLUMN"}
            ${TEXT_PAIR_COLUMN:+--text_pair_column "$TEXT_PAIR_COLUMN"})
else
  AUG_FILES=("$DATA_DIR/train_aug.tsv" "$DATA_DIR/train_${TASK}_aug_with_logits.tsv")
  AUG_ARGS=(--task_name "$TASK" --data_dir "$DATA_DIR")
fi
augmented() { for f in "${AUG_FILES[@]}"; do [ -f "$f" ] && return 0; done; return 1; }
if [ "$PROFILE_AUGMENT" = 1 ] && { wanted width || wanted depth; } && ! augmented; then
  say "[0/4] augmented training data for --data_aug -> ${AUG_FILES[0]}"
  $PY augment_data.py "${AUG_ARGS[@]}" --model_dir "$BERT_DIR"
fi

if wanted teacher; then
say "[1/4] teacher: fine-tune $BERT_DIR on $TASK -> $TEACHER_DIR"
if [ -n "$TEACHER_GIVEN" ] && [ -f "$TEACHER_DIR/config.json" ] && [ ! -f "$TEACHER_DIR/.done-finetuning" ]; then
  echo "using the given teacher $TEACHER_DIR"
elif stage_done finetuning "$TEACHER_DIR"; then echo "reusing $TEACHER_DIR (FORCE=1 retrains)"; else
  $PY run_glue.py "${COMMON[@]}" --model_dir "$BERT_DIR" --output_dir "$TEACHER_DIR" --overwrite_output_dir \
    --training_phase finetuning --width_mult_list 1.0 "${TEACHER_ARGS[@]}" "${PRECISION[@]}" "$@"
  mark_done finetuning "$TEACHER_DIR"
fi
fi

if wanted width; then
say "[2/4] width-adaptive training${GRAFT_ARGS:+ with neural grafting} -> $W_BERT"
if stage_done dynabertw "$W_BERT"; then echo "reusing $W_BERT (FORCE=1 retrains)"; else
  $PY run_glue.py "${COMMON[@]}" --model_dir "$TEACHER_DIR" --output_dir "$W_BERT" --overwrite_output_dir \
    --width_mult_list 0.25,0.5,0.75,1.0 --depth_mult_list 1.0 --width_lambda1 1.0 --width_lambda2 0.1 \
    --training_phase dynabertw "${GRAFT_ARGS[@]}" "${W_ARGS[@]}" "${PRECISION[@]}" "$@"
  mark_done dynabertw "$W_BERT"
fi
fi

if wanted depth; then
say "[3/4] depth-adaptive training -> $WD_BERT"
if stage_done dynabert "$WD_BERT"; then echo "reusing $WD_BERT (FORCE=1 retrains)"; else
  $PY run_glue.py "${COMMON[@]}" --model_dir "$W_BERT" --output_dir "$WD_BERT" --overwrite_output_dir \
    --width_mult_list 0.25,0.5,0.75,1.0 --depth_mult_list 0.5,0.75,1.0 --depth_lambda1 1.0 --depth_lambda2 1.0 \
    --training_phase dynabert "${D_ARGS[@]}" "${PRECISION[@]}" "$@"
  mark_done dynabert "$WD_BERT"
fi
fi

if wanted final; then
# --eval_on_start: the depth stage's model is kept unless final fine-tuning beats it on dev.
say "[4/4] final fine-tuning (gold labels, all subnets) in place -> $WD_BERT"
if stage_done final_finetuning "$WD_BERT"; then echo "reusing $WD_BERT (FORCE=1 retrains)"; else
  $PY run_glue.py "${COMMON[@]}" --model_dir "$WD_BERT" --output_dir "$WD_BERT" \
    --width_mult_list 0.25,0.5,0.75,1.0 --depth_mult_list 0.5,0.75,1.0 \
    --training_phase final_finetuning --eval_on_start "${F_ARGS[@]}" "${PRECISION[@]}" "$@"
  mark_done final_finetuning "$WD_BERT"
fi
echo "flexible BERT for $TASK: $WD_BERT"
fi
