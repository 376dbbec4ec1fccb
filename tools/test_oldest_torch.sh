#!/usr/bin/env bash
# The torch-only layer on the oldest supported torch: a second, small environment (torch 2.1.2 from
# PyPI, no mmcv/mmengine/mmdet) at $CBN_OLD_TORCH_VENV (default <repo>/.venv-torch2.1), then the
# tests that need torch alone. PyPI's torch 2.1.2 is a CUDA build (about 2.5 GB with its CUDA
# libraries); it runs on CPU-only machines. Not part of `make test`: run it by hand or in a job that
# can afford the download.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CBN_OLD_TORCH_VENV:-$repo/.venv-torch2.1}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, pytest' 2>/dev/null; then
  "$python" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q "torch==2.1.2" "numpy<2" pytest
fi
cd "$repo"
PYTHONPATH="$repo" "$venv/bin/python" -m pytest -p no:cacheprovider "$@" \
  tests/test_torch_only.py tests/test_models/test_cbn_layer.py tests/test_ops/test_cbn_maths.py \
  tests/test_models/test_cbn_checkpointing.py tests/test_models/test_cbn_precision.py tests/test_models/test_cbn_compile.py
