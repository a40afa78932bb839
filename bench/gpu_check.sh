#!/usr/bin/env bash
# The prepared GPU check (issue 11 item 8; issue 13 item 6): a random-init Qwen3-1.7B (its real config,
# built here: no network), one SFT step on a packed 16k row and one OPD train step on 8 x 8k samples
# through opd's training code, printing peak GPU memory, tokens/s and MFU. One process per visible GPU
# (under `python -m opd_runtime.launch`, i.e. torchrun; FSDP with more than one). Then each rank starts the
# OPD sampler's vLLM engine (when vLLM is installed) and the check fails unless every engine runs on its
# rank's own GPU (`--vllm 0` skips that part). At most 8 minutes.
#
#   bench/gpu_check.sh                 # on the GPU machine, from the repository root
#   bench/gpu_check.sh --tiny          # the same code on small shapes (CPU is fine): what tests run
#   bench/gpu_check.sh --json out.json # also keep the numbers
#
# Extra arguments go to bench/gpu_check.py (--sft-tokens, --opd-samples, --opd-tokens, --opd-micro-batch,
# --gradient-checkpointing 0|1, --workdir). GPU_CHECK_TIMEOUT (seconds, default 480) bounds the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# GPU_CHECK_NPROC forces the process count (tests run 2 CPU processes with it)
# (the GPUs torch sees, honouring CUDA_VISIBLE_DEVICES; without nvidia-smi there are none to ask about)
if [ -n "${GPU_CHECK_NPROC:-}" ]; then
  gpus=$GPU_CHECK_NPROC
elif command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
else
  gpus=0
fi
limit=${GPU_CHECK_TIMEOUT:-480}
if [ "$gpus" -gt 1 ]; then
  echo "gpu_check: $gpus processes, one per GPU (FSDP)"
  exec timeout "$limit" "$PY" -m opd_runtime.launch --standalone --nproc-per-node="$gpus" bench/gpu_check.py "$@"
fi
[ "$gpus" -eq 1 ] && echo "gpu_check: 1 GPU" || echo "gpu_check: no GPU, running on the CPU"
exec timeout "$limit" "$PY" bench/gpu_check.py "$@"
