#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at $CBN_VENV (default: <repo>/.venv).
#
# Idempotent: when the venv already has everything at the pinned versions it exits in about a second.
# mmcv 2.1.0 has only a source distribution on PyPI; its C++ ops take 10-30 minutes to compile on two
# cores, so the built wheel is kept in $CBN_WHEEL_CACHE (default ~/.cache/cbn_mmdet/wheels, outside the
# repository so a fresh clone reuses it) and is never rebuilt while it is there.
#
# GPU machines: set CBN_DEVICE=cuda to take a CUDA torch from PyPI and build mmcv's CUDA ops
# (needs nvcc matching the torch CUDA version); the default, CBN_DEVICE=cpu, is the CPU stack.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CBN_VENV:-$repo/.venv}
wheel_cache=${CBN_WHEEL_CACHE:-$HOME/.cache/cbn_mmdet/wheels}
device=${CBN_DEVICE:-cpu}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null 2>&1 || python=python3

TORCH_VERSION=2.13.0
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0

case "$device" in
  cpu|cuda) ;;
  *) echo "setup_env.sh: CBN_DEVICE must be 'cpu' or 'cuda' (got '$device')" >&2; exit 2 ;;
esac

stamp="$venv/.cbn_mmdet_env_ok"
# Bump EXTRAS when the package list below changes, so that existing environments are updated.
EXTRAS="pycocotools,pytest,matplotlib,scikit-learn"
want="torch=$TORCH_VERSION mmcv=$MMCV_VERSION mmengine=$MMENGINE_VERSION mmdet=$MMDET_VERSION device=$device extras=$EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi

# Serialise concurrent set-ups (two `make` commands at once, or two clones sharing the wheel cache):
# the second waits, then finds the environment ready.
mkdir -p "$wheel_cache"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$wheel_cache/.setup_env.lock"
  if ! flock -n 9; then
    echo "[setup_env] another set-up is running; waiting for it to finish"
    flock 9
  fi
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    exit 0
  fi
fi
trap 'echo "[setup_env] FAILED (exit code $?); rerun tools/setup_env.sh after fixing the error above" >&2' ERR
start=$SECONDS
echo "[setup_env] creating environment in $venv ($want)"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
# setuptools 82 dropped pkg_resources, which mmcv's setup.py and mmengine's `mmdet::` config loading import.
$pip install -q -U pip wheel "setuptools<82"
# On this machine torch==2.13.0 resolves to the CPU wheel on disk (an unpinned torch pulls a CUDA build);
# on a GPU machine the same pin takes PyPI's CUDA build.
$pip install -q "torch==$TORCH_VERSION"
$pip install -q numpy ninja psutil

mkdir -p "$wheel_cache"
tagged_cache="$wheel_cache/$device"
mkdir -p "$tagged_cache"
mmcv_wheel=$(ls "$tagged_cache"/mmcv-$MMCV_VERSION-cp*-linux_*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$mmcv_wheel" ]; then
  echo "[setup_env] building mmcv $MMCV_VERSION with ops ($device); this takes 10-30 minutes on 2 cores, once"
  build_dir=$(mktemp -d)
  force_cuda=0; [ "$device" = cuda ] && force_cuda=1
  # --no-build-isolation: with isolation the build has no torch and silently yields a wheel without ops.
  MMCV_WITH_OPS=1 FORCE_CUDA=$force_cuda MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    $pip wheel --no-build-isolation --no-deps "mmcv==$MMCV_VERSION" -w "$build_dir"
  built=$(ls "$build_dir"/mmcv-$MMCV_VERSION-cp*-linux_*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$built" ]; then
    echo "[setup_env] the mmcv build produced no platform wheel (no compiled ops): $(ls "$build_dir")" >&2
    exit 1
  fi
  # Strip debug symbols from the extension: 32 MB -> ~1.4 MB, same code.
  ( cd "$build_dir" && tmp=$(mktemp -d) && "$venv/bin/python" -m wheel unpack -d "$tmp" "$built" >/dev/null \
      && find "$tmp" -name '_ext*.so' -exec strip --strip-debug {} + \
      && rm "$built" && "$venv/bin/python" -m wheel pack -d "$build_dir" "$tmp"/mmcv-* >/dev/null && rm -rf "$tmp" ) \
    || echo "[setup_env] (strip skipped)"
  mv "$build_dir"/mmcv-$MMCV_VERSION-*.whl "$tagged_cache"/
  rm -rf "$build_dir"
  mmcv_wheel=$(ls "$tagged_cache"/mmcv-$MMCV_VERSION-cp*-linux_*.whl | head -n 1)
fi
$pip install -q --no-deps "$mmcv_wheel"
$pip install -q "mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" pycocotools pytest matplotlib scikit-learn \
  "mmcv==$MMCV_VERSION" --find-links "$tagged_cache"
$pip install -q --no-deps --no-build-isolation -e "$repo"
"$venv/bin/python" -c "import mmdet, mmcv, mmengine; from mmcv.ops import RoIAlign, nms; import cbn_mmdet"
echo "$want" > "$stamp"
echo "[setup_env] ready: $venv ($((SECONDS - start)) s)"
