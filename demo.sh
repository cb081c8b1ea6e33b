#!/usr/bin/env bash
# The main job: the whole pipeline on one task, then the trade-off table. `make demo` runs it with QUICK=1
# inside .venv. Stages that already finished are reused (FORCE=1 retrains). Arguments are passed to every
# Python call of the three scripts, so only flags they all take (e.g. --seed 7 --num_threads 1).
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
bash run_glue.sh "$@"
bash train_glue.sh "$@"
bash gate_inference.sh "$@"
echo "pipeline finished in $(( $(date +%s) - start )) s"
