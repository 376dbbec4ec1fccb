# Functions used by tools/setup_env.sh. Sourced, not run: kept apart so that tests can call each
# decision (device, cache key, nvcc, venv state, job count, cache writes) on its own with fakes.
# Errors go to stderr ("[setup_env] ERROR: " and indented continuation lines); functions that fail
# return non-zero.

cbn_err() {
  printf '[setup_env] ERROR: %s\n' "$1" >&2
  shift
  [ $# -eq 0 ] || printf '  %s\n' "$@" >&2
}

# The device an existing environment was set up for, or nothing. The record is written when the venv
# is created, so a set-up that stopped half-way still remembers its device; environments made before
# the record existed carry it in their stamp.
cbn_recorded_device() {
  local venv=$1 d=
  if [ -f "$venv/.cbn_device" ]; then
    d=$(head -n 1 "$venv/.cbn_device")
  elif [ -f "$venv/.cbn_mmdet_env_ok" ]; then
    d=$(sed -n 's/.*\bdevice=\([a-z]*\).*/\1/p' "$venv/.cbn_mmdet_env_ok" | head -n 1)
  fi
  printf '%s' "$d"
}

# cbn_resolve_device REQUESTED RECORDED VENV: the device to set up. No request keeps the recorded
# device (so a later `make` does not switch a GPU environment to CPU); a request for the other device
# is an error, since one venv holds one device's torch and mmcv.
cbn_resolve_device() {
  local requested=$1 recorded=$2 venv=$3
  case "$requested" in
    ''|cpu|cuda) ;;
    *) cbn_err "CBN_DEVICE must be 'cpu' or 'cuda' (got '$requested')"; return 2 ;;
  esac
  if [ -n "$requested" ] && [ -n "$recorded" ] && [ "$requested" != "$recorded" ]; then
    cbn_err "$venv was set up for CBN_DEVICE=$recorded, but CBN_DEVICE=$requested was asked for." \
      "One environment holds one device's torch and mmcv, so it is not switched in place. Either:" \
      "  - replace it: rm -rf '$venv' && CBN_DEVICE=$requested tools/setup_env.sh" \
      "  - or keep it and make a second one: CBN_VENV=/path/to/venv-$requested CBN_DEVICE=$requested tools/setup_env.sh" \
      "    (then run that environment's bin/python; make uses .venv)" \
      "Without CBN_DEVICE, tools/setup_env.sh and make keep using the device the environment has ($recorded)."
    return 2
  fi
  printf '%s' "${requested:-${recorded:-cpu}}"
}

# cbn_check_python PYTHON MIN: PYTHON runs and is at least MIN (e.g. 3.10).
cbn_check_python() {
  local py=$1 min=$2 v
  if ! v=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    cbn_err "no working Python interpreter '$py'. Python >= $min is needed; set PYTHON=/path/to/python3.11."
    return 1
  fi
  if ! cbn_version_ge "$v" "$min"; then
    cbn_err "$py is Python $v; Python >= $min is needed (torch's own requirement; tested with 3.11)." \
      "Set PYTHON=/path/to/python3.11 (or another >= $min)."
    return 1
  fi
}

# cbn_version_ge A B: dotted version A >= B.
cbn_version_ge() {
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]
}

# cbn_find_nvcc [DEFAULT_CUDA_HOME]: print the nvcc that torch's extension builder will use, found the
# way torch looks for it (CUDA_HOME or CUDA_PATH, then PATH, then the default location), or explain
# what is missing. Runs before anything is downloaded.
cbn_find_nvcc() {
  local default_home=${1:-/usr/local/cuda} home=${CUDA_HOME:-${CUDA_PATH:-}} var=CUDA_HOME p
  [ -n "${CUDA_HOME:-}" ] || var=CUDA_PATH
  if [ -n "$home" ]; then
    if [ -x "$home/bin/nvcc" ]; then printf '%s' "$home/bin/nvcc"; return 0; fi
    cbn_err "CBN_DEVICE=cuda: $var=$home, but $home/bin/nvcc does not exist." \
      "Point $var at a CUDA toolkit (the directory holding bin/nvcc), or unset it to use the nvcc on PATH." \
      "Nothing was downloaded or changed."
    return 1
  fi
  if p=$(command -v nvcc 2>/dev/null); then printf '%s' "$p"; return 0; fi
  if [ -x "$default_home/bin/nvcc" ]; then printf '%s' "$default_home/bin/nvcc"; return 0; fi
  cbn_err "CBN_DEVICE=cuda needs the CUDA compiler nvcc to build mmcv's CUDA ops, and none was found" \
    "(not on PATH, CUDA_HOME unset, no $default_home/bin/nvcc)." \
    "Install the CUDA toolkit (the compiler, not only the driver; same major version as torch's CUDA" \
    "build, e.g. 12.x) and either put its bin/ on PATH or set CUDA_HOME=/path/to/cuda." \
    "Nothing was downloaded or changed."
  return 1
}

# cbn_nvcc_version NVCC: "12.8" from `nvcc --version`.
cbn_nvcc_version() {
  local out v
  if ! out=$("$1" --version 2>&1); then
    cbn_err "$1 --version failed: $out"
    return 1
  fi
  v=$(printf '%s\n' "$out" | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
  if [ -z "$v" ]; then
    cbn_err "cannot read the CUDA version from '$1 --version': $out"
    return 1
  fi
  printf '%s' "$v"
}

# cbn_arch_key "8.0;8.6+PTX": "sm80-sm86+ptx" (sorted, de-duplicated; ';', ',' or spaces separate).
cbn_arch_key() {
  local a out=()
  for a in $(printf '%s' "$1" | tr ';,' '  '); do
    a=$(printf '%s' "$a" | tr 'A-Z' 'a-z')
    case "$a" in
      [0-9]*.[0-9]*) a="sm${a%%.*}${a#*.}" ;;
    esac
    out+=("$(printf '%s' "$a" | tr -c 'a-z0-9+._' '_')")
  done
  [ ${#out[@]} -gt 0 ] || return 1
  printf '%s\n' "${out[@]}" | LC_ALL=C sort -u | paste -sd- -
}

# cbn_cache_key DEVICE PYTAG TORCH_VERSION [CUDA_VERSION ARCH_LIST]: the cache folder for an mmcv
# wheel, e.g. cpu-cp311-torch2.13.0 or cuda12.8-cp311-torch2.13.0-sm90. A wheel's compiled ops are
# tied to the Python ABI, the torch release, the CUDA version and the GPU architectures built for.
# CPU-only ops link against the parts of libtorch that every build of a release shares (same headers,
# same C++ ABI), so one cpu wheel serves the release's CPU and CUDA builds alike: the CUDA version of
# a torch running CPU ops is not part of the key.
cbn_cache_key() {
  local device=$1 pytag=$2 torch=${3%%+*} cuda=${4:-} arches=${5:-} ak
  if [ -z "$pytag" ] || [ -z "$torch" ]; then cbn_err "cache key: no Python tag or torch version"; return 1; fi
  case "$device" in
    cpu) printf 'cpu-%s-torch%s' "$pytag" "$torch" ;;
    cuda)
      if [ -z "$cuda" ] || [ "$cuda" = none ]; then cbn_err "cache key: CUDA device without a CUDA version"; return 1; fi
      if ! ak=$(cbn_arch_key "$arches"); then cbn_err "cache key: CUDA device without target architectures"; return 1; fi
      printf 'cuda%s-%s-torch%s-%s' "$cuda" "$pytag" "$torch" "$ak" ;;
    *) cbn_err "cache key: unknown device '$device'"; return 1 ;;
  esac
}

# cbn_wheel_ok PYTHON WHEEL: WHEEL is a complete zip (catches truncated files from older set-ups).
cbn_wheel_ok() {
  "$1" -c 'import sys, zipfile; sys.exit(zipfile.ZipFile(sys.argv[1]).testzip() is not None)' "$2" >/dev/null 2>&1
}

# cbn_find_wheel PYTHON DIR MMCV_VERSION PYTAG: print a usable cached mmcv wheel in DIR; a damaged one
# is deleted so that it is rebuilt instead of failing at install time.
cbn_find_wheel() {
  local py=$1 dir=$2 ver=$3 pytag=$4 w
  for w in "$dir"/mmcv-"$ver"-"$pytag"-*-linux_*.whl; do
    [ -f "$w" ] || continue
    if cbn_wheel_ok "$py" "$w"; then printf '%s' "$w"; return 0; fi
    echo "[setup_env] removing damaged cached wheel $w" >&2
    rm -f "$w"
  done
  return 1
}

# cbn_cache_clean_tmp DIR: remove temporary files left by an interrupted cache write. Set-ups that
# share the cache are serialised by its lock, so no other writer is using them.
cbn_cache_clean_tmp() {
  [ -d "$1" ] || return 0
  find "$1" -maxdepth 1 -type f -name '.tmp.*' -delete
}

# cbn_cache_put FILE DIR: copy FILE into DIR under its own name atomically: the copy goes to a
# temporary name in DIR (never matched by the wheel lookups) and is renamed, so an interrupted copy
# never leaves a truncated wheel under the final name. Prints the final path.
cbn_cache_put() {
  local src=$1 dir=$2 name tmp
  name=$(basename "$src")
  mkdir -p "$dir"
  tmp="$dir/.tmp.$name.$$"
  if ! cp "$src" "$tmp"; then
    rm -f "$tmp"
    cbn_err "could not copy $src into the wheel cache $dir"
    return 1
  fi
  mv -f "$tmp" "$dir/$name"
  printf '%s' "$dir/$name"
}

# cbn_looks_like_venv DIR: DIR holds only what `python -m venv` and this script put there, so it may be
# cleared and recreated (a mistyped CBN_VENV pointing at other files is never emptied).
cbn_looks_like_venv() {
  local e
  [ -f "$1/pyvenv.cfg" ] && return 0
  for e in $(ls -A "$1"); do
    case "$e" in
      bin|include|lib|lib64|share|pyvenv.cfg|.cbn_*) ;;
      *) return 1 ;;
    esac
  done
}

# cbn_strip_wheel PYTHON WHEEL OUTDIR: repack WHEEL into OUTDIR with debug symbols stripped from its
# compiled extensions; prints the new wheel's path. Fails (leaving WHEEL as it is) if any step fails.
cbn_strip_wheel() {
  local py=$1 whl=$2 out=$3 work w
  work=$(mktemp -d) || return 1
  mkdir -p "$out" \
    && "$py" -m wheel unpack -d "$work" "$whl" >/dev/null \
    && find "$work" -name '_ext*.so' -exec strip --strip-debug {} + \
    && "$py" -m wheel pack -d "$out" "$work"/* >/dev/null \
    && w=$(ls "$out"/*.whl 2>/dev/null | head -n 1) && [ -n "$w" ]
  local rc=$?
  rm -rf "$work"
  [ $rc -eq 0 ] && printf '%s' "$w"
}

# cbn_venv_state VENV MIN_PYTHON: absent | ok | not-a-venv | no-python | broken-python | old-python |
# no-pip. Anything but ok/absent/not-a-venv is a half-made environment that is recreated.
cbn_venv_state() {
  local venv=$1 min=$2 v
  if [ ! -e "$venv" ] || { [ -d "$venv" ] && [ -z "$(ls -A "$venv")" ]; }; then echo absent; return; fi
  if ! cbn_looks_like_venv "$venv"; then echo not-a-venv; return; fi
  if [ ! -x "$venv/bin/python" ]; then echo no-python; return; fi
  if ! v=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null); then
    echo broken-python; return
  fi
  if ! cbn_version_ge "$v" "$min"; then echo old-python; return; fi
  if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then echo no-pip; return; fi
  echo ok
}

# cbn_available_mb [MEMINFO] [CGROUP_DIR]: memory available to this process in MB: MemAvailable,
# lowered to what a cgroup v2 memory limit leaves.
cbn_available_mb() {
  local meminfo=${1:-/proc/meminfo} cg=${2:-/sys/fs/cgroup} kb mb max cur left
  kb=$(awk '/^MemAvailable:/ {print $2; exit}' "$meminfo" 2>/dev/null || true)
  [ -n "$kb" ] || kb=$(awk '/^MemFree:/ {print $2; exit}' "$meminfo" 2>/dev/null || true)
  [ -n "$kb" ] || kb=0
  mb=$((kb / 1024))
  if [ -r "$cg/memory.max" ] && [ -r "$cg/memory.current" ]; then
    max=$(cat "$cg/memory.max"); cur=$(cat "$cg/memory.current")
    case "$max$cur" in
      *[!0-9]*) ;;
      *) left=$(((max - cur) / 1048576)); [ "$left" -lt "$mb" ] && mb=$left ;;
    esac
  fi
  [ "$mb" -ge 0 ] || mb=0
  printf '%s' "$mb"
}

# cbn_max_jobs NPROC AVAILABLE_MB MB_PER_JOB: parallel compile jobs, MAX_JOBS if set, else
# min(NPROC, AVAILABLE_MB / MB_PER_JOB) and at least 1 (each nvcc job of mmcv's ops takes 2-4 GB).
cbn_max_jobs() {
  local nproc=$1 avail=$2 per=$3 j
  if [ -n "${MAX_JOBS:-}" ]; then printf '%s' "$MAX_JOBS"; return; fi
  j=$((avail / per))
  [ "$j" -le "$nproc" ] || j=$nproc
  [ "$j" -ge 1 ] || j=1
  printf '%s' "$j"
}
