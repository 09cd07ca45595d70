#!/usr/bin/env bash
# The prepared accelerator check of the icm core (no Ray): LoRA steps through DeepSpeed in bf16,
# task-vector forward passes, generator training, adapter generation, vLLM where installed.
#
#   bash scripts/gpu_check.sh [--model-dir DIR --random-weights] [--quick] [--out FILE]
#
# On a machine with a stock PyTorch image and no network, first install the carried wheels
# (scripts/gpu_wheels.sh prepares them here, in .whl/):  WHEELS=.whl bash scripts/gpu_check.sh ...
# Without a GPU it runs on the CPU (gloo, float32); the tests run it that way with --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d -t icm-site-XXXXXX)  # the wheels' install target, this run only
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
fi
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${WHEELS:-}" ] && PYTHON=.venv/bin/python
exec "$PYTHON" -m icm.gpu_check "$@"
