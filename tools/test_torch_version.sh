#!/usr/bin/env bash
# The torch-only layer on another torch than the set-up's: a second, small environment (torch
# $CBN_TORCH_VERSION from PyPI, default 2.1.2, the oldest supported; no mmcv/mmengine/mmdet) at
# $CBN_TORCH_VENV (default <repo>/.venv-torch<version>), then the tests that need torch alone. Extra
# arguments go to pytest (more test files, -k, ...). PyPI's torch is a CUDA build (2.5-5 GB with its
# CUDA libraries); it runs on CPU-only machines. Not part of `make test`: run it by hand or in a job
# that can afford the download.
#
#   tools/test_torch_version.sh                                   # torch 2.1.2
#   CBN_TORCH_VERSION=2.14.1 tools/test_torch_version.sh tests/test_models/test_cbn_fused.py
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=${CBN_TORCH_VERSION:-2.1.2}
venv=${CBN_TORCH_VENV:-$repo/.venv-torch$version}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
numpy='numpy'
case "$version" in 2.[0-2].*) numpy='numpy<2' ;; esac  # (torch before 2.3 was built against numpy 1)
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, pytest, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  "$python" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q "torch==$version" "$numpy" pytest expecttest
fi
cd "$repo"
# the fused CPU ops build per torch version (see cbn_mmdet/ops/fused.py)
PYTHONPATH="$repo" "$venv/bin/python" -m pytest -p no:cacheprovider "$@" \
  tests/test_torch_only.py tests/test_models/test_cbn_layer.py tests/test_ops/test_cbn_maths.py \
  tests/test_models/test_cbn_checkpointing.py tests/test_models/test_cbn_precision.py tests/test_models/test_cbn_compile.py
