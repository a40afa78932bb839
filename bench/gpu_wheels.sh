#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs where the python it is given lacks pydantic (the lent GPU
# machine's): pydantic at pyproject's floor and what it needs, for CPython 3.11 and 3.12 on x86-64 Linux,
# into .gpu-wheels/ (git-ignored; about 5 MiB, carried to the GPU machine with the checkout). Idempotent.
#
#   bench/gpu_wheels.sh [DIR]         # GPU_WHEELS_PYTHONS="3.12" for one version only
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/.gpu-wheels}
py=${PIP_PYTHON:-$root/.venv/bin/python}
floor=$(sed -n 's/^ *"pydantic>=\([0-9.]*\)",.*/\1/p' "$root/pyproject.toml")
[ -n "$floor" ] || { echo "gpu_wheels: no 'pydantic>=X' in pyproject.toml" >&2; exit 2; }
want="pydantic==$floor python ${GPU_WHEELS_PYTHONS:-3.11 3.12}"
[ "$(cat "$dir/.complete" 2>/dev/null)" = "$want" ] && exit 0
rm -rf "$dir" && mkdir -p "$dir"
for v in ${GPU_WHEELS_PYTHONS:-3.11 3.12}; do
  "$py" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --dest "$dir" \
    --python-version "$v" --implementation cp --abi "cp${v/./}" --abi abi3 --abi none \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "pydantic==$floor"
done
echo "$want" > "$dir/.complete"
du -sh "$dir"
