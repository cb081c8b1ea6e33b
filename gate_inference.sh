#!/usr/bin/env bash
# Inference with the gated flexible BERT: every static subnet (width x depth), width-dynamic with the
# task's best-trade-off widths, and width+depth-dynamic with early exit over a threshold sweep; at each
# batch size in BATCH_SIZES. Then the calibrated settings for each FLOPs budget in BUDGETS (train_gate_new.py
# --calibrate: map and threshold chosen on a seeded half of dev, reported on the other half; its Pareto front
# goes on the plot). Ends with one accuracy / FLOPs / latency table and a trade-off plot.
# Extra arguments are passed to every train_gate(_new).py call. Environment: as run_glue.sh, plus
# MODEL (default $WD_BERT_GATES), BATCH_SIZES ("32 1"; quick: "32"), THRESHOLDS ("0.1 0.3 0.5"),
# BUDGETS ("0.3 0.5 0.7"; empty: no calibration), INFERENCE_DIR.
set -euo pipefail
cd "$(dirname "$0")"
source pipeline_env.sh
MODEL=${MODEL:-$WD_BERT_GATES}
BATCH_SIZES=${BATCH_SIZES:-$([ "$QUICK" = 1 ] && echo 32 || echo "32 1")}
THRESHOLDS=${THRESHOLDS:-0.1 0.3 0.5}
BUDGETS=${BUDGETS-0.3 0.5 0.7}
CONFIG=best_tradeoff_inference_config.json
# The task's class->width map from the best-trade-off config (README's example widths otherwise).
DYN_WIDTHS=$($PY -c "import json,sys; e=json.load(open('$CONFIG')).get('$TASK'); print(','.join(map(str, e['width_mult_list'])) if e else '0.5,0.75,0.75,0.75')")
COMMON=(--model_type bert --task_name "$TASK" --data_dir "$DATA_DIR" --model_dir "$MODEL"
        --max_seq_length "$MAX_SEQ_LENGTH" --do_eval --record_gpu_time)

run() {  # run NAME BATCH SCRIPT ARGS...: one inference, results in $INFERENCE_DIR/NAME_bBATCH/
  local name=$1 bs=$2 script=$3; shift 3
  local out="$INFERENCE_DIR/${name}_b$bs"
  if [ "$FORCE" != 1 ] && [ -f "$out/inference_results.json" ]; then echo "reusing $out"; return; fi
  echo "-- $name (batch $bs)"
  # The log is moved next to the results only when the run succeeds: a failed run leaves no file behind.
  local log rc=0
  log=$(mktemp)
  $PY "$script" "${COMMON[@]}" --output_dir "$out" --per_gpu_eval_batch_size "$bs" "$@" "${EXTRA[@]}" > "$log" 2>&1 \
    || rc=$?
  if [ "$rc" != 0 ]; then cat "$log" >&2; rm -f "$log"; exit "$rc"; fi
  mv "$log" "$out.log" && chmod a+r "$out.log"
}
EXTRA=("$@")
say "inference on $TASK with $MODEL -> $INFERENCE_DIR"
for bs in $BATCH_SIZES; do
  for d in 1.0 0.75 0.5; do
    for w in 1.0 0.75 0.5 0.25; do
      run "static_w${w}_d${d}" "$bs" train_gate.py --width_mult_list "$w,$w,$w,$w" --depth_mult_list "$d" --static
    done
  done
  run "w_dynamic" "$bs" train_gate_new.py --width_mult_list "$DYN_WIDTHS" --depth_mult_list 1.0 --w_dynamic
  for t in $THRESHOLDS; do
    run "wd_dynamic_t$t" "$bs" train_gate_new.py --width_mult_list "$DYN_WIDTHS" --depth_mult_list 1.0 \
      --wd_dynamic --early_exit --exit_threshold "$t"
  done
done
if [ -n "$BUDGETS" ]; then  # one calibration for all budgets (the maps' forwards are shared), first batch size
  out="$INFERENCE_DIR/calibrated"
  if [ "$FORCE" != 1 ] && [ -f "$out/calibration_results.json" ]; then
    echo "reusing $out"
  else
    echo "-- calibration for FLOPs budgets $BUDGETS"
    log=$(mktemp) rc=0
    $PY train_gate_new.py "${COMMON[@]}" --output_dir "$out" --per_gpu_eval_batch_size "${BATCH_SIZES%% *}" \
      --calibrate --flops_budget "$(echo $BUDGETS | tr ' ' ',')" "${EXTRA[@]}" > "$log" 2>&1 || rc=$?
    if [ "$rc" != 0 ]; then cat "$log" >&2; rm -f "$log"; exit "$rc"; fi
    mv "$log" "$out.log" && chmod a+r "$out.log"
    tr '\r' '\n' < "$out.log" | sed -n '/^\*\*\*\*\* Calibration/,$p'  # the summary (progress bars use \r)
  fi
fi
$PY plot_tradeoff.py --inference_dir "$INFERENCE_DIR" --output_dir "$OUT_DIR"
