#!/usr/bin/env bash
# The GPU check (issue 14), on one GPU within 8 minutes: the tiny pipeline, then one epoch of plain
# and of shaped DPO on SmolLM2-135M-Instruct in bf16, with pairs/s against this script's CPU figures.
#   bash bench/gpu_check.sh          # on the GPU
#   bash bench/gpu_check.sh --cpu    # the same on the CPU with fewer pairs (writes bench/gpu_check_cpu.json)
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Details: bench/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
"$PY" bench/gpu_check.py "$@"
echo "gpu_check: $(( $(date +%s) - start )) s in all"
