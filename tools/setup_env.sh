#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at $CBN_VENV (default: <repo>/.venv).
#
# Idempotent: when the venv already has everything at the pinned versions it exits in about a second.
# mmcv 2.1.0 has only a source distribution on PyPI; its C++ ops take 10-20 minutes to compile on 2
# cores, so the built wheel is kept in $CBN_WHEEL_CACHE (default ~/.cache/cbn_mmdet/wheels, outside the
# repository so a fresh clone reuses it), in a folder named after what the compiled ops depend on
# (e.g. cpu-cp311-torch2.13.0, cuda12.8-cp311-torch2.13.0-sm90), and is never rebuilt while it is there.
#
# Device: CBN_DEVICE=cpu (the default for a new environment) or cuda (a CUDA torch and mmcv's CUDA ops;
# needs nvcc). An existing environment keeps the device it was set up for when CBN_DEVICE is not given;
# asking for the other one is an error that says how to switch.
# Other settings: CBN_VENV, CBN_WHEEL_CACHE, PYTHON (the interpreter for the venv, Python >= 3.10),
# MAX_JOBS (compile jobs; default bounded by cores and memory), TORCH_CUDA_ARCH_LIST (GPU architectures
# for cuda; default: the visible GPUs'), CBN_TORCH_INDEX_URL (cuda: the index to take torch from, e.g.
# https://download.pytorch.org/whl/cu126; default PyPI, whose Linux torch is a CUDA build).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=tools/setup_env_lib.sh
source "$repo/tools/setup_env_lib.sh"

venv=${CBN_VENV:-$repo/.venv}
wheel_cache=${CBN_WHEEL_CACHE:-$HOME/.cache/cbn_mmdet/wheels}
python=${PYTHON:-python3.11}
[ -n "${PYTHON:-}" ] || command -v "$python" >/dev/null 2>&1 || python=python3

TORCH_VERSION=2.13.0
MMCV_VERSION=2.1.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0
MMPRETRAIN_VERSION=1.2.0
TORCHVISION_VERSION=0.28.0   # the release built for torch 2.13
PYTHON_MIN=3.10   # torch 2.13.0's Requires-Python

device=$(cbn_resolve_device "${CBN_DEVICE:-}" "$(cbn_recorded_device "$venv")" "$venv")

stamp="$venv/.cbn_mmdet_env_ok"
# Bump EXTRAS when the package list below changes, so that existing environments are updated.
EXTRAS="pycocotools,pytest,matplotlib,scikit-learn,expecttest,sphinx9,myst-parser5,mmpretrain"
# Likewise the project's own top-level packages: an editable install only finds those it was made with.
PACKAGES="cbn_mmdet,cbn_mmdet_demo"
want="torch=$TORCH_VERSION torchvision=$TORCHVISION_VERSION mmcv=$MMCV_VERSION mmengine=$MMENGINE_VERSION mmdet=$MMDET_VERSION device=$device extras=$EXTRAS packages=$PACKAGES"
env_ready() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c '' 2>/dev/null; }
env_ready && exit 0

# Everything that can be checked without downloading comes first, so a missing tool fails in seconds.
if [ "$device" = cuda ]; then
  # /usr/local/cuda is where torch looks last; the variable lets tests hide a toolkit installed there.
  nvcc=$(cbn_find_nvcc "${CBN_DEFAULT_CUDA_HOME:-/usr/local/cuda}")
  nvcc_version=$(cbn_nvcc_version "$nvcc")
  # torch's extension builder uses CUDA_HOME first: make it the nvcc checked here.
  export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$nvcc")")}
  echo "[setup_env] nvcc: $nvcc (CUDA $nvcc_version)"
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
  env_ready && exit 0
fi
build_dir=
trap '[ -z "$build_dir" ] || rm -rf "$build_dir"' EXIT
trap 'echo "[setup_env] FAILED (exit code $?); rerun tools/setup_env.sh after fixing the error above" >&2' ERR
start=$SECONDS

state=$(cbn_venv_state "$venv" "$PYTHON_MIN")
case "$state" in
  ok) ;;
  not-a-venv)
    cbn_err "$venv exists and is not a virtual environment; refusing to empty it." \
      "Set CBN_VENV to another path, or move that folder away."
    exit 1 ;;
  *)
    cbn_check_python "$python" "$PYTHON_MIN"
    [ "$state" = absent ] || echo "[setup_env] $venv is incomplete ($state): recreating it"
    "$python" -m venv --clear "$venv"
    if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
      "$venv/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 || true
      if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        cbn_err "the new venv $venv has no pip ('$python -m venv' could not install it)." \
          "Install your Python's venv/ensurepip support (Debian/Ubuntu: apt-get install python3-venv, for" \
          "the matching version) or set PYTHON to another interpreter, then rerun."
        exit 1
      fi
    fi ;;
esac
# Recorded before the long steps, so that a rerun after an interruption keeps this device.
echo "$device" > "$venv/.cbn_device"
echo "[setup_env] setting up $venv ($want)"

vpy="$venv/bin/python"
vpip() { "$vpy" -m pip "$@"; }
# setuptools 82 dropped pkg_resources, which mmcv's setup.py and mmengine's `mmdet::` config loading import.
vpip install -q -U pip wheel "setuptools<82"
# Both devices take PyPI's torch (a CUDA build, which runs on CPU too) and the torchvision built with it,
# which mmpretrain's data transforms import: any build of the pinned releases except the CPU one, so a
# local CPU wheel in pip's find-links is never taken (PyPI's torchvision does not load with it).
# cuda: CBN_TORCH_INDEX_URL picks a CUDA variant (PyTorch's per-CUDA indexes).
index_args=()
[ "$device" = cpu ] || [ -z "${CBN_TORCH_INDEX_URL:-}" ] || index_args=(--index-url "$CBN_TORCH_INDEX_URL")
vpip install -q ${index_args[@]+"${index_args[@]}"} "torch==$TORCH_VERSION,!=$TORCH_VERSION+cpu" \
  "torchvision==$TORCHVISION_VERSION,!=$TORCHVISION_VERSION+cpu"
vpip install -q numpy ninja psutil

torch_info=$("$vpy" -c '
import sys, torch
tag = ("cp" if sys.implementation.name == "cpython" else sys.implementation.name) + "%d%d" % sys.version_info[:2]
cuda = torch.version.cuda or "none"
visible = cuda != "none" and torch.cuda.is_available()
arches = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) if visible else []
print(tag, torch.__version__, cuda, int(visible), ";".join(arches) or "none")
')
read -r pytag torch_version torch_cuda gpu_visible gpu_arches <<<"$torch_info"
echo "[setup_env] torch $torch_version (CUDA: $torch_cuda), $pytag"

arches=
if [ "$device" = cuda ]; then
  if [ "$torch_cuda" = none ]; then
    cbn_err "CBN_DEVICE=cuda, but the torch installed in $venv is a CPU-only build ($torch_version: torch.version.cuda is None)." \
      "pip took it from a source that offers a CPU build under the pinned version, e.g. a local wheel folder in" \
      "pip's find-links (see 'pip config list' and PIP_FIND_LINKS) or a CPU-only index." \
      "Fix: remove that source (unset PIP_FIND_LINKS; drop find-links from the pip configuration, or run with" \
      "PIP_CONFIG_FILE=/dev/null), or choose a CUDA build explicitly, e.g." \
      "CBN_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 (the CUDA version of your nvcc); then" \
      "$vpy -m pip uninstall -y torch && CBN_DEVICE=cuda tools/setup_env.sh"
    exit 1
  fi
  if [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    arches=$TORCH_CUDA_ARCH_LIST
  elif [ "$gpu_arches" != none ]; then
    arches=$gpu_arches
  else
    cbn_err "no GPU is visible to torch (torch.cuda.is_available() is False) and TORCH_CUDA_ARCH_LIST is unset," \
      "so the GPU architectures to compile mmcv's ops for are unknown. Run on the GPU machine (check nvidia-smi" \
      "and CUDA_VISIBLE_DEVICES), or set TORCH_CUDA_ARCH_LIST, e.g. '9.0' (H100/H200), '8.0' (A100)," \
      "'8.6' (RTX 30xx, A40), '8.9' (L4, L40, RTX 40xx), several separated by ';'."
    exit 1
  fi
  # The build compiles for exactly the architectures the cache key names.
  export TORCH_CUDA_ARCH_LIST=$arches
fi
key=$(cbn_cache_key "$device" "$pytag" "$torch_version" "$torch_cuda" "$arches")
tagged_cache="$wheel_cache/$key"
mkdir -p "$tagged_cache"
cbn_cache_clean_tmp "$tagged_cache"
mmcv_wheel=$(cbn_find_wheel "$vpy" "$tagged_cache" "$MMCV_VERSION" "$pytag" || true)
# Wheels from the earlier cache layout (<cache>/cpu/) were all built against the pinned torch.
if [ -z "$mmcv_wheel" ] && [ "$device" = cpu ] && [ "${torch_version%%+*}" = "$TORCH_VERSION" ] \
    && legacy=$(cbn_find_wheel "$vpy" "$wheel_cache/cpu" "$MMCV_VERSION" "$pytag"); then
  echo "[setup_env] using the cached wheel $legacy (copied to $tagged_cache/)"
  mmcv_wheel=$(cbn_cache_put "$legacy" "$tagged_cache")
fi
if [ -z "$mmcv_wheel" ]; then
  if [ "$device" = cuda ] && [ "${nvcc_version%%.*}" != "${torch_cuda%%.*}" ]; then
    cbn_err "nvcc is CUDA $nvcc_version but torch $torch_version was built with CUDA $torch_cuda; torch refuses to" \
      "build extensions when the major versions differ. Install a CUDA $torch_cuda toolkit and set CUDA_HOME to" \
      "it, or take a torch built for your nvcc: CBN_TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ" \
      "(then $vpy -m pip uninstall -y torch and rerun)."
    exit 1
  fi
  if [ "$device" = cuda ]; then mb_per_job=3072; else mb_per_job=1024; fi
  jobs=$(cbn_max_jobs "$(nproc)" "$(cbn_available_mb)" "$mb_per_job")
  echo "[setup_env] building mmcv $MMCV_VERSION with ops ($key, MAX_JOBS=$jobs); this takes 10-20 minutes on 2 cores, once"
  build_dir=$(mktemp -d)
  force_cuda=0; [ "$device" = cuda ] && force_cuda=1
  # --no-build-isolation: with isolation the build has no torch and silently yields a wheel without ops.
  MMCV_WITH_OPS=1 FORCE_CUDA=$force_cuda MAX_JOBS=$jobs \
    vpip wheel --no-build-isolation --no-deps "mmcv==$MMCV_VERSION" -w "$build_dir"
  built=$(ls "$build_dir"/mmcv-$MMCV_VERSION-cp*-linux_*.whl 2>/dev/null | head -n 1 || true)
  if [ -z "$built" ]; then
    cbn_err "the mmcv build produced no platform wheel (no compiled ops): $(ls "$build_dir")"
    exit 1
  fi
  # Strip debug symbols from the extension: 32 MB -> ~1.4 MB, same code. On failure the unstripped wheel is kept.
  if stripped=$(cbn_strip_wheel "$vpy" "$built" "$build_dir/stripped"); then
    built=$stripped
  else
    echo "[setup_env] (strip skipped)"
  fi
  mmcv_wheel=$(cbn_cache_put "$built" "$tagged_cache")
  echo "[setup_env] cached $mmcv_wheel"
fi
vpip install -q --no-deps "$mmcv_wheel"
# expecttest: imported by torch.testing._internal, whose ModuleInfo samples test_conformance.py runs;
# sphinx and myst-parser: the documentation site, which the suite builds;
# mmpretrain: the classification side (configs/cbn_imagenet/ and its tests)
vpip install -q "mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" "mmpretrain==$MMPRETRAIN_VERSION" \
  pycocotools pytest matplotlib scikit-learn expecttest \
  "sphinx>=9,<10" "myst-parser>=5,<6" \
  "mmcv==$MMCV_VERSION" --find-links "$tagged_cache"
vpip install -q --no-deps --no-build-isolation -e "$repo"
"$vpy" -c "import mmdet, mmcv, mmengine, mmpretrain, torchvision; from mmcv.ops import RoIAlign, nms; import cbn_mmdet"
# CBN's fused CPU ops (built once per torch version, like mmcv's ops; the layer falls back to its
# Python path without them, but this environment has the compiler, so a failure is an error here)
if ! "$vpy" -c "import sys; from cbn_mmdet.ops import fused; sys.exit(fused.one_call_ops() is None)"; then
  cbn_err "CBN's fused CPU ops (cbn_mmdet/ops/csrc/) did not build: see the warning above."
  exit 1
fi
if [ "$device" = cuda ]; then
  compiled=$("$vpy" -c "from mmcv.ops import get_compiling_cuda_version as v; print(v())")
  if [ "$compiled" = "not available" ] || [ -z "$compiled" ]; then
    cbn_err "mmcv's ops in $venv were compiled without CUDA (get_compiling_cuda_version() says '$compiled')." \
      "The wheel $mmcv_wheel is not a CUDA build: delete it and rerun CBN_DEVICE=cuda tools/setup_env.sh" \
      "(the build needs nvcc and FORCE_CUDA=1, which this script sets)."
    exit 1
  fi
  if ! "$vpy" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    cbn_err "everything is installed (mmcv's ops compiled with CUDA $compiled for $arches, cached in $tagged_cache)," \
      "but torch sees no GPU: torch.cuda.is_available() is False. Check the driver (nvidia-smi; it must support" \
      "CUDA $torch_cuda) and CUDA_VISIBLE_DEVICES, then rerun; the environment is not marked ready until then."
    exit 1
  fi
  # mmcv's CUDA kernels run on this GPU (built for its architecture).
  "$vpy" -c "
import torch
from mmcv.ops import nms
boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]], device='cuda')
keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7], device='cuda'), 0.5)[1]
assert keep.tolist() == [0, 2], keep
"
  echo "[setup_env] CUDA check passed: torch CUDA $torch_cuda, mmcv ops compiled with CUDA $compiled, GPU visible"
fi
echo "$want" > "$stamp"
echo "[setup_env] ready: $venv ($((SECONDS - start)) s)"
