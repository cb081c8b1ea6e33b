#!/usr/bin/env bash
# Inference with the gated flexible BERT: every static subnet (width x depth), width-dynamic with the
# task's best-trade-off widths, width+depth-dynamic with early exit over a threshold sweep, and one confidence
# cascade of static subnets (w0.25_d0.5 > w0.75_d0.75 at 0.3, or the --cascade flags given); at each batch
# size in BATCH_SIZES. Then the calibrated settings for each FLOPs budget in BUDGETS (train_gate_new.py
# --calibrate: map and threshold chosen on a seeded half of dev, reported on the other half; its Pareto front
# goes on the plot). Ends with one accuracy / FLOPs / latency table and a trade-off plot.
# Extra arguments are passed to inference_sweep.py (train_gate.py's flags). Environment: as run_glue.sh, plus
# MODEL (default $WD_BERT_GATES), BATCH_SIZES (default: the profile's), THRESHOLDS ("0.1 0.3 0.5"),
# BUDGETS ("0.3 0.5 0.7"; empty: no calibration), INFERENCE_DIR. Your own data (pipeline_env.sh): dev is
# VALIDATION_FILE; with TEST_FILE every setting also writes its test predictions (--do_predict,
# predict_results_<TASK>.txt); no calibration by default (BUDGETS calibrates on a seeded half of VALIDATION_FILE).
set -euo pipefail
cd "$(dirname "$0")"
source pipeline_env.sh
MODEL=${MODEL:-$WD_BERT_GATES}
BATCH_SIZES=${BATCH_SIZES:-$PROFILE_INFERENCE_BATCH_SIZES}
THRESHOLDS=${THRESHOLDS:-0.1 0.3 0.5}
BUDGETS=${BUDGETS-$([ -n "$OWN_DATA" ] || echo 0.3 0.5 0.7)}
COMMON=(--model_type bert --task_name "$TASK" "${DATA_ARGS[@]}" --model_dir "$MODEL"
        --max_seq_length "$MAX_SEQ_LENGTH" --do_eval --record_gpu_time)
[ -z "${TEST_FILE:-}" ] || COMMON+=(--do_predict)
REUSE=(); [ "$FORCE" = 1 ] || REUSE=(--reuse_existing)
CALIBRATION=(); [ -z "$BUDGETS" ] || CALIBRATION=(--flops_budget "$BUDGETS")

say "inference on $TASK with $MODEL -> $INFERENCE_DIR"
# One process for every setting: the model is loaded and dev tokenised once (inference_sweep.py).
$PY inference_sweep.py "${COMMON[@]}" --inference_dir "$INFERENCE_DIR" --batch_sizes "$BATCH_SIZES" \
  --thresholds "$THRESHOLDS" --dynamic_config best_tradeoff_inference_config.json "${CALIBRATION[@]}" \
  "${REUSE[@]}" "$@"
PLOT_METRIC=()  # a task of your own files: its headline metric (plot_tradeoff.py knows GLUE's by task name)
[ -z "$OWN_DATA" ] || PLOT_METRIC=(--metric "$([ "${IS_REGRESSION:-0}" = 1 ] && echo pearson || echo acc)")
$PY plot_tradeoff.py --inference_dir "$INFERENCE_DIR" --output_dir "$OUT_DIR" "${PLOT_METRIC[@]}"
