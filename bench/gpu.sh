#!/usr/bin/env bash
# The GPU benchmark as one prepared script: builds a 0.6B-parameter Llama-shaped causal LM from a
# config (nothing downloaded), trains it with the pipeline's own `train` step in bf16 with
# ZeRO-2, ZeRO-3 and ZeRO-3 + LoRA over every visible GPU, and writes tokens/s, peak memory and
# MFU (against the data-sheet bf16 peak and a matmul peak measured on the same GPU) to
# bench/results/gpu.json. About 5 minutes on one H100/H200; the timeout below is 8.
#
#   bench/gpu.sh                    # a machine with the project installed (make install, CUDA torch)
#   WHEELS=.whl bench/gpu.sh        # a machine without network: the missing packages as wheels
#   OUT=/some/dir bench/gpu.sh      # where gpu.json goes (default bench/results)
#
# The same path runs on CPU in make test (tests/test_bench.py: --size tiny --precision fp32).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/finetune-site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/finetune-site:${PYTHONPATH:-}
fi
if ! "$PY" -c "import torch, deepspeed, transformers, peft, datasets, mlflow, pyarrow" 2>/dev/null; then
  echo "gpu.sh: $PY lacks one of torch, deepspeed, transformers, peft, datasets, mlflow, pyarrow;" \
       "install the project (make install) or pass WHEELS=<dir of wheels>" >&2
  exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: no CUDA GPU is visible to torch; on CPU run: $PY bench/gpu_train.py --size tiny --precision fp32" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 480 "$PY" bench/gpu_train.py --size 0.6b --precision bf16 --out "${OUT:-bench/results}/gpu.json" "$@"
