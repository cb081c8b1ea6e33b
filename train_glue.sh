#!/usr/bin/env bash
# Train the width gates of the flexible BERT made by run_glue.sh (backbone frozen). Extra arguments are
# passed to train_gate.py. Environment: as run_glue.sh (your own data: TRAIN_FILE, VALIDATION_FILE and the
# column variables), plus WD_BERT_GATES (output folder).
set -euo pipefail
cd "$(dirname "$0")"
source pipeline_env.sh

say "gates: train on $WD_BERT -> $WD_BERT_GATES"
if stage_done traingate "$WD_BERT_GATES"; then echo "reusing $WD_BERT_GATES (FORCE=1 retrains)"; else
  $PY train_gate.py --model_type bert --task_name "$TASK" --do_train "${DATA_ARGS[@]}" \
    --model_dir "$WD_BERT" --output_dir "$WD_BERT_GATES" --overwrite_output_dir --max_seq_length "$MAX_SEQ_LENGTH" \
    --per_gpu_train_batch_size 32 --per_gpu_eval_batch_size 32 \
    --width_mult_list 0.25,0.5,0.75,1.0 --gate_setting 0.25,0.5,0.75,1.0 --training_phase traingate \
    "${GATE_ARGS[@]}" "$@"
  mark_done traingate "$WD_BERT_GATES"
fi
