#!/usr/bin/env bash
# The GPU check (opd_runtime/gpu_check): numerics against references, a random-init Qwen3-1.7B trained
# at real lengths (peak memory, tokens/s, MFU), and the vLLM sampler beside the trainer. At most ~5 min
# on one H100/H200; `--tiny` runs the same code on small shapes on a CPU in seconds.
#
#   bench/gpu_check.sh --require-gpu [--require-vllm] [--json out.json]
#   PYTHON=/path/to/python bench/gpu_check.sh --tiny
#
# It needs no install and no .venv: PYTHON (default python3) must hold torch and transformers; opd's own
# source is put on the path from this checkout through a folder holding only opd_runtime (the checkout's
# root would let its operator/ folder shadow the standard library's `operator`), and pydantic, when that
# python lacks it, is installed from the wheels folder GPU_CHECK_WHEELS (default .gpu-wheels, made by
# bench/gpu_wheels.sh) into a temporary folder (bench/unpack_wheels.py: no pip needed). Several visible GPUs: one process per GPU under
# `python -m opd_runtime.launch` (torchrun). GPU_CHECK_TIMEOUT (seconds, default 480) bounds the run.
# Exit codes: those of `python -m opd_runtime.gpu_check` (0 all passed, 1 a check failed, 3 a required
# part cannot run here), 2 when this script cannot set up, 124 past the time limit (SIGTERM: the check
# writes its --json with what it had done and the part it was in; SIGKILL 20 s later if it cannot).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-$root/.gpu-wheels}
export PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# no progress bars: a log read afterwards (or only its tail) must hold the check's lines, not redraws
export HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$PY" >/dev/null 2>&1 || fail "no python '$PY' (set PYTHON)"
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # the run starts elsewhere
# one interpreter start (torch takes seconds to import): the GPUs torch sees, and whether pydantic is there
probe=$("$PY" -c 'import importlib.util as u, torch, transformers
print(torch.cuda.device_count() if torch.cuda.is_available() else 0, int(u.find_spec("pydantic") is not None))') ||
  fail "$PY cannot import torch and transformers"
read -r visible has_pydantic <<<"$probe"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/opd-gpu-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src"
ln -s "$root/opd_runtime" "$tmp/src/opd_runtime"
path=$tmp/src
if [ "$has_pydantic" = 0 ]; then
  [ -d "$wheels" ] || fail "$PY has no pydantic and there is no wheels folder $wheels (run bench/gpu_wheels.sh)"
  "$PY" "$root/bench/unpack_wheels.py" "$wheels" "$tmp/site" || fail "unpacking the wheels of $wheels failed"
  path=$path:$tmp/site
  echo "gpu_check: pydantic from $wheels"
fi
export PYTHONPATH=$path${PYTHONPATH:+:$PYTHONPATH}
cd "$tmp"  # not the checkout: nothing there can shadow a module, whatever the python's path rules

gpus=${GPU_CHECK_NPROC:-$visible}
limit=${GPU_CHECK_TIMEOUT:-480}
set +e
if [ "$gpus" -gt 1 ]; then
  echo "gpu_check: $gpus processes, one per GPU"
  timeout -k 20 "$limit" "$PY" -m opd_runtime.launch --standalone --nproc-per-node="$gpus" -m opd_runtime.gpu_check "$@"
else
  timeout -k 20 "$limit" "$PY" -m opd_runtime.gpu_check "$@"
fi
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check: stopped after GPU_CHECK_TIMEOUT=${limit}s" >&2
exit "$rc"
