"""tools/setup_env.sh and tools/setup_env_lib.sh with fakes: CPU only, no network, a few seconds.

The library's functions are called one by one; the whole script runs against a fake interpreter,
pip, torch, mmcv and nvcc (``FakeToolchain``) that log every call, so the tests can see which device
was set up, what pip was asked for, whether mmcv was built, and that some errors come before any pip
call. The real CUDA path (a CUDA torch, nvcc building mmcv's ops, a GPU) is not exercised here.
"""
import os
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT

LIB = osp.join(REPO_ROOT, 'tools', 'setup_env_lib.sh')
SCRIPT = osp.join(REPO_ROOT, 'tools', 'setup_env.sh')
PYTAG = 'cp%d%d' % sys.version_info[:2]
WHEEL = f'mmcv-2.1.0-{PYTAG}-{PYTAG}-linux_x86_64.whl'
TIMEOUT = 60

pytestmark = pytest.mark.skipif(shutil.which('bash') is None or shutil.which('flock') is None,
                                reason='needs bash and flock')

# Only system directories: the machine's own nvcc or python must not be found by accident.
BASE_PATH = '/usr/bin:/bin'
CLEARED = ('CBN_DEVICE', 'CBN_VENV', 'CBN_WHEEL_CACHE', 'CBN_TORCH_INDEX_URL', 'CUDA_HOME',
           'CUDA_PATH', 'MAX_JOBS', 'TORCH_CUDA_ARCH_LIST', 'PYTHON', 'PYTHONPATH')


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env['PATH'] = BASE_PATH
    env.update(extra)
    return env


def lib(snippet, env=None, path_prefix=None):
    """Run ``snippet`` in bash after sourcing the library (strict mode, as the script runs)."""
    env = dict(env or clean_env())
    if path_prefix:
        env['PATH'] = f'{path_prefix}:{env["PATH"]}'
    return subprocess.run(['bash', '-c', f'set -euo pipefail; source "{LIB}"; {snippet}'],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)


def write_exe(path, text):
    path = str(path)
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def make_wheel(path, force_cuda='0'):
    """A small valid wheel-named zip; ``force_cuda`` marks how the fake build compiled it."""
    os.makedirs(osp.dirname(str(path)), exist_ok=True)
    with zipfile.ZipFile(str(path), 'w') as z:
        z.writestr('mmcv/build.txt', force_cuda)
        z.writestr('mmcv/padding.bin', os.urandom(4096))
    return str(path)


# ----------------------------------------------------------------------------------------------
# cache key

@pytest.mark.parametrize('args, key', [
    ('cpu cp311 2.13.0+cpu', 'cpu-cp311-torch2.13.0'),
    ('cpu cp311 2.13.0', 'cpu-cp311-torch2.13.0'),
    ('cpu cp312 2.13.0+cpu', 'cpu-cp312-torch2.13.0'),
    ('cpu cp311 2.14.1+cpu', 'cpu-cp311-torch2.14.1'),
    # CPU ops built against a CPU torch run with the same release's CUDA build, and the other way round
    ('cpu cp311 2.13.0+cu130 13.0', 'cpu-cp311-torch2.13.0'),
    ('cuda cp311 2.13.0+cu128 12.8 9.0', 'cuda12.8-cp311-torch2.13.0-sm90'),
    ('cuda cp311 2.13.0 12.6 9.0', 'cuda12.6-cp311-torch2.13.0-sm90'),
    ('cuda cp310 2.13.0+cu128 12.8 9.0', 'cuda12.8-cp310-torch2.13.0-sm90'),
    ('cuda cp311 2.13.0+cu128 12.8 "8.6+PTX;8.0"', 'cuda12.8-cp311-torch2.13.0-sm80-sm86+ptx'),
    ('cuda cp311 2.13.0+cu128 12.8 "8.0 8.6"', 'cuda12.8-cp311-torch2.13.0-sm80-sm86'),
    ('cuda cp311 2.13.0+cu128 12.8 "8.6,8.0,8.6"', 'cuda12.8-cp311-torch2.13.0-sm80-sm86'),
    ('cuda cp311 2.13.0+cu128 12.8 9.0a', 'cuda12.8-cp311-torch2.13.0-sm90a'),
])
def test_cache_key(args, key):
    proc = lib(f'cbn_cache_key {args}')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == key


def test_cache_keys_differ_by_every_component():
    keys = set()
    for args in ['cpu cp311 2.13.0', 'cpu cp312 2.13.0', 'cpu cp311 2.14.1',
                 'cuda cp311 2.13.0 12.8 9.0', 'cuda cp311 2.13.0 12.6 9.0',
                 'cuda cp312 2.13.0 12.8 9.0', 'cuda cp311 2.14.1 12.8 9.0',
                 'cuda cp311 2.13.0 12.8 8.0', 'cuda cp311 2.13.0 12.8 "8.0;9.0"']:
        proc = lib(f'cbn_cache_key {args}')
        assert proc.returncode == 0, proc.stderr
        keys.add(proc.stdout)
    assert len(keys) == 9, keys


@pytest.mark.parametrize('args', ['cuda cp311 2.13.0 12.8 ""', 'cuda cp311 2.13.0 none 9.0',
                                  'cuda cp311 2.13.0', 'cpu "" 2.13.0', 'rocm cp311 2.13.0'])
def test_cache_key_refuses_incomplete_input(args):
    proc = lib(f'cbn_cache_key {args}')
    assert proc.returncode != 0 and proc.stdout == ''
    assert 'ERROR: cache key' in proc.stderr


# ----------------------------------------------------------------------------------------------
# atomic cache writes

def half_cp(tmp_path, then):
    """A fake ``cp SRC DST`` that writes half of SRC and then runs ``then``."""
    return write_exe(tmp_path / 'fakecp' / 'cp', f'''#!/bin/bash
size=$(stat -c %s "$1")
head -c $((size / 2)) "$1" > "$2"
{then}
''')


def test_cache_put_is_complete_and_leaves_no_temporary(tmp_path):
    src = make_wheel(tmp_path / 'build' / WHEEL)
    cache = tmp_path / 'cache'
    proc = lib(f'cbn_cache_put "{src}" "{cache}"')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == str(cache / WHEEL)
    assert os.listdir(cache) == [WHEEL]
    with open(src, 'rb') as a, open(cache / WHEEL, 'rb') as b:
        assert a.read() == b.read()


def test_failed_copy_leaves_no_wheel_under_the_final_name(tmp_path):
    src = make_wheel(tmp_path / 'build' / WHEEL)
    cache = tmp_path / 'cache'
    half_cp(tmp_path, 'exit 1')
    proc = lib(f'cbn_cache_put "{src}" "{cache}"', path_prefix=tmp_path / 'fakecp')
    assert proc.returncode != 0
    assert 'could not copy' in proc.stderr
    assert os.listdir(cache) == []


def test_interrupted_copy_leaves_no_wheel_and_its_temporary_is_cleaned(tmp_path):
    src = make_wheel(tmp_path / 'build' / WHEEL)
    cache = tmp_path / 'cache'
    # The whole set-up is killed in the middle of the copy (Ctrl-C, OOM killer, power loss).
    half_cp(tmp_path, 'kill -9 $PPID; exit 1')
    proc = lib(f'cbn_cache_put "{src}" "{cache}"', path_prefix=tmp_path / 'fakecp')
    assert proc.returncode == -9
    left = os.listdir(cache)
    assert WHEEL not in left
    assert len(left) == 1 and left[0].startswith('.tmp.')   # the partial copy, under a temporary name
    proc = lib(f'cbn_find_wheel "{sys.executable}" "{cache}" 2.1.0 {PYTAG}')
    assert proc.returncode != 0 and proc.stdout == ''
    proc = lib(f'cbn_cache_clean_tmp "{cache}"')
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(cache) == []


def test_find_wheel_removes_a_truncated_wheel(tmp_path):
    cache = tmp_path / 'cache'
    good = make_wheel(tmp_path / 'good' / WHEEL)
    with open(good, 'rb') as f:
        data = f.read()
    os.makedirs(cache)
    with open(cache / WHEEL, 'wb') as f:
        f.write(data[:len(data) // 2])
    proc = lib(f'cbn_find_wheel "{sys.executable}" "{cache}" 2.1.0 {PYTAG}')
    assert proc.returncode != 0 and proc.stdout == ''
    assert not (cache / WHEEL).exists()
    shutil.copy(good, cache / WHEEL)
    proc = lib(f'cbn_find_wheel "{sys.executable}" "{cache}" 2.1.0 {PYTAG}')
    assert proc.returncode == 0 and proc.stdout == str(cache / WHEEL)
    other_tag = lib(f'cbn_find_wheel "{sys.executable}" "{cache}" 2.1.0 cp39')
    assert other_tag.returncode != 0


def real_wheel(root, so_bytes):
    """A valid mmcv wheel (made by the ``wheel`` tool) holding ``_ext*.so`` with ``so_bytes``."""
    tree = root / 'tree' / 'mmcv-2.1.0'
    os.makedirs(tree / 'mmcv')
    os.makedirs(tree / 'mmcv-2.1.0.dist-info')
    (tree / 'mmcv' / '_ext.cpython-311-x86_64-linux-gnu.so').write_bytes(so_bytes)
    (tree / 'mmcv-2.1.0.dist-info' / 'WHEEL').write_text(
        f'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {PYTAG}-{PYTAG}-linux_x86_64\n')
    (tree / 'mmcv-2.1.0.dist-info' / 'METADATA').write_text(
        'Metadata-Version: 2.1\nName: mmcv\nVersion: 2.1.0\n')
    os.makedirs(root / 'built')
    subprocess.run([sys.executable, '-m', 'wheel', 'pack', '-d', str(root / 'built'), str(tree)],
                   check=True, capture_output=True)
    return str(root / 'built' / WHEEL)


@pytest.mark.skipif(shutil.which('strip') is None, reason='needs binutils strip')
def test_strip_wheel(tmp_path):
    pytest.importorskip('wheel')
    import _json
    elf = getattr(_json, '__file__', None)   # any compiled extension module will do
    if not elf or not elf.endswith('.so'):
        pytest.skip('no extension module to use as an ELF file')
    with open(elf, 'rb') as f:
        good = real_wheel(tmp_path / 'a', f.read())
    proc = lib(f'if cbn_strip_wheel "{sys.executable}" "{good}" "{tmp_path / "out"}"; then :; else exit 3; fi')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == str(tmp_path / 'out' / WHEEL)
    with zipfile.ZipFile(proc.stdout) as z:
        assert z.testzip() is None
        assert 'mmcv/_ext.cpython-311-x86_64-linux-gnu.so' in z.namelist()
    # the repacked wheel is consistent (its RECORD matches), so pip will install it
    subprocess.run([sys.executable, '-m', 'wheel', 'unpack', '-d', str(tmp_path / 'check'), proc.stdout],
                   check=True, capture_output=True)
    # not an ELF file: strip fails, nothing is printed and the caller keeps its wheel
    bad = real_wheel(tmp_path / 'b', b'not an ELF file')
    proc = lib(f'if cbn_strip_wheel "{sys.executable}" "{bad}" "{tmp_path / "out2"}"; then :; else exit 3; fi')
    assert proc.returncode == 3 and proc.stdout == ''
    assert osp.isfile(bad)


# ----------------------------------------------------------------------------------------------
# device stickiness

@pytest.mark.parametrize('requested, recorded, device', [
    ('', '', 'cpu'), ('', 'cpu', 'cpu'), ('', 'cuda', 'cuda'),
    ('cuda', '', 'cuda'), ('cpu', '', 'cpu'), ('cuda', 'cuda', 'cuda'), ('cpu', 'cpu', 'cpu'),
])
def test_resolve_device(requested, recorded, device):
    proc = lib(f'cbn_resolve_device "{requested}" "{recorded}" /some/venv')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == device


@pytest.mark.parametrize('requested, recorded', [('cuda', 'cpu'), ('cpu', 'cuda')])
def test_resolve_device_mismatch_says_how_to_switch(requested, recorded):
    proc = lib(f'cbn_resolve_device {requested} {recorded} /some/venv')
    assert proc.returncode == 2 and proc.stdout == ''
    err = proc.stderr
    assert f'/some/venv was set up for CBN_DEVICE={recorded}, but CBN_DEVICE={requested}' in err
    assert "rm -rf '/some/venv'" in err
    assert 'CBN_VENV=' in err


def test_resolve_device_rejects_unknown_device():
    proc = lib('cbn_resolve_device gpu "" /v')
    assert proc.returncode == 2
    assert "CBN_DEVICE must be 'cpu' or 'cuda' (got 'gpu')" in proc.stderr


def test_recorded_device(tmp_path):
    venv = tmp_path / 'venv'
    os.makedirs(venv)
    assert lib(f'cbn_recorded_device "{venv}"').stdout == ''
    # environments set up before the record existed: the stamp names the device
    (venv / '.cbn_mmdet_env_ok').write_text(
        'torch=2.13.0 mmcv=2.1.0 mmengine=0.10.7 mmdet=3.3.0 device=cuda extras=pytest\n')
    assert lib(f'cbn_recorded_device "{venv}"').stdout == 'cuda'
    (venv / '.cbn_device').write_text('cpu\n')
    assert lib(f'cbn_recorded_device "{venv}"').stdout == 'cpu'


# ----------------------------------------------------------------------------------------------
# nvcc

NVCC = '''#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release {v}, V{v}.93"
'''


def test_find_nvcc(tmp_path):
    nobody = tmp_path / 'no-cuda'
    # on PATH
    nvcc = write_exe(tmp_path / 'path' / 'nvcc', NVCC.format(v='12.8'))
    proc = lib(f'cbn_find_nvcc "{nobody}"', path_prefix=tmp_path / 'path')
    assert proc.returncode == 0 and proc.stdout == nvcc
    # CUDA_HOME wins over PATH, as in torch's extension builder
    home_nvcc = write_exe(tmp_path / 'cuda' / 'bin' / 'nvcc', NVCC.format(v='12.6'))
    env = clean_env(CUDA_HOME=str(tmp_path / 'cuda'))
    proc = lib(f'cbn_find_nvcc "{nobody}"', env=env, path_prefix=tmp_path / 'path')
    assert proc.returncode == 0 and proc.stdout == home_nvcc
    # the default location, as torch falls back to /usr/local/cuda
    proc = lib(f'cbn_find_nvcc "{tmp_path / "cuda"}"')
    assert proc.returncode == 0 and proc.stdout == home_nvcc
    assert lib(f'cbn_nvcc_version "{home_nvcc}"').stdout == '12.6'
    assert lib(f'cbn_nvcc_version "{nvcc}"').stdout == '12.8'


def test_find_nvcc_errors(tmp_path):
    proc = lib(f'cbn_find_nvcc "{tmp_path / "no-cuda"}"')
    assert proc.returncode != 0 and proc.stdout == ''
    assert 'CBN_DEVICE=cuda needs the CUDA compiler nvcc' in proc.stderr
    assert 'CUDA_HOME' in proc.stderr and 'Install the CUDA toolkit' in proc.stderr
    os.makedirs(tmp_path / 'empty-cuda')
    env = clean_env(CUDA_HOME=str(tmp_path / 'empty-cuda'))
    proc = lib(f'cbn_find_nvcc "{tmp_path / "no-cuda"}"', env=env)
    assert proc.returncode != 0
    assert f'CUDA_HOME={tmp_path / "empty-cuda"}, but {tmp_path / "empty-cuda"}/bin/nvcc does not exist' \
        in proc.stderr


# ----------------------------------------------------------------------------------------------
# half-created venv

def test_venv_state(tmp_path):
    def state(name):
        proc = lib(f'cbn_venv_state "{tmp_path / name}" 3.10')
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert state('missing') == 'absent'
    os.makedirs(tmp_path / 'empty')
    assert state('empty') == 'absent'
    os.makedirs(tmp_path / 'other')
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    assert state('other') == 'not-a-venv'
    os.makedirs(tmp_path / 'nopy' / 'bin')
    (tmp_path / 'nopy' / 'pyvenv.cfg').write_text('home = /usr/bin\n')
    assert state('nopy') == 'no-python'
    # interrupted before pyvenv.cfg was written: only venv folders
    os.makedirs(tmp_path / 'partial' / 'lib')
    os.makedirs(tmp_path / 'partial' / 'include')
    assert state('partial') == 'no-python'
    write_exe(tmp_path / 'broken' / 'bin' / 'python', '#!/bin/sh\nexit 127\n')
    (tmp_path / 'broken' / 'pyvenv.cfg').write_text('')
    assert state('broken') == 'broken-python'
    os.symlink(tmp_path / 'gone' / 'python3', tmp_path / 'nopy' / 'bin' / 'python')
    assert state('nopy') == 'no-python'   # dangling link to a removed interpreter
    write_exe(tmp_path / 'old' / 'bin' / 'python', '#!/bin/sh\necho 3.8\n')
    (tmp_path / 'old' / 'pyvenv.cfg').write_text('')
    assert state('old') == 'old-python'
    nopip = f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 1\nexec "{sys.executable}" "$@"\n'
    write_exe(tmp_path / 'nopip' / 'bin' / 'python', nopip)
    (tmp_path / 'nopip' / 'pyvenv.cfg').write_text('')
    assert state('nopip') == 'no-pip'
    ok = f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec "{sys.executable}" "$@"\n'
    write_exe(tmp_path / 'ok' / 'bin' / 'python', ok)
    (tmp_path / 'ok' / 'pyvenv.cfg').write_text('')
    assert state('ok') == 'ok'


def test_check_python(tmp_path):
    assert lib(f'cbn_check_python "{sys.executable}" 3.9').returncode == 0
    old = write_exe(tmp_path / 'python3.9', '#!/bin/sh\necho 3.9\n')
    proc = lib(f'cbn_check_python "{old}" 3.10')
    assert proc.returncode != 0
    assert 'is Python 3.9; Python >= 3.10 is needed' in proc.stderr and 'PYTHON=' in proc.stderr
    proc = lib(f'cbn_check_python "{tmp_path / "nothing"}" 3.10')
    assert proc.returncode != 0 and 'no working Python interpreter' in proc.stderr
    assert lib('cbn_version_ge 3.10 3.9').returncode == 0
    assert lib('cbn_version_ge 3.9 3.10').returncode != 0


# ----------------------------------------------------------------------------------------------
# compile jobs

@pytest.mark.parametrize('nproc, avail_mb, per_job, jobs', [
    (16, 8192, 3072, 2),      # memory bound
    (2, 65536, 3072, 2),      # core bound
    (16, 1000, 3072, 1),      # at least one
    (64, 131072, 3072, 42),
    (2, 23000, 1024, 2),
])
def test_max_jobs_bounded_by_memory(nproc, avail_mb, per_job, jobs):
    proc = lib(f'cbn_max_jobs {nproc} {avail_mb} {per_job}')
    assert proc.returncode == 0 and proc.stdout == str(jobs)


def test_max_jobs_override():
    proc = lib('cbn_max_jobs 16 1000 3072', env=clean_env(MAX_JOBS='5'))
    assert proc.stdout == '5'


def test_available_mb(tmp_path):
    (tmp_path / 'meminfo').write_text('MemTotal: 33554432 kB\nMemFree: 1048576 kB\n'
                                      'MemAvailable: 16777216 kB\n')
    cg = tmp_path / 'cg'
    os.makedirs(cg)
    assert lib(f'cbn_available_mb "{tmp_path / "meminfo"}" "{cg}"').stdout == '16384'
    (cg / 'memory.max').write_text('max\n')
    (cg / 'memory.current').write_text('1073741824\n')
    assert lib(f'cbn_available_mb "{tmp_path / "meminfo"}" "{cg}"').stdout == '16384'
    (cg / 'memory.max').write_text(f'{9 * 2**30}\n')   # a 9 GB container limit, 1 GB used
    assert lib(f'cbn_available_mb "{tmp_path / "meminfo"}" "{cg}"').stdout == '8192'
    # the real machine: a positive number
    assert int(lib('cbn_available_mb').stdout) > 0


# ----------------------------------------------------------------------------------------------
# the whole script against fakes

FAKE_BASE_PYTHON = '''#!/bin/bash
echo "base-python $*" >> "$FAKE_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then
  d=${@: -1}
  mkdir -p "$d" && find "$d" -mindepth 1 -delete
  mkdir -p "$d/bin" && echo "home = fake" > "$d/pyvenv.cfg"
  cp "$FAKE_ROOT/venv-python" "$d/bin/python"
  exit 0
fi
exec "$REAL_PYTHON" -S "$@"
'''

FAKE_VENV_PYTHON = '''#!/bin/bash
venv=$(cd "$(dirname "$0")/.." && pwd)
echo "python $*" >> "$FAKE_LOG"
case "$1 ${2:-}" in
  "-m pip") shift 2; exec "$REAL_PYTHON" -S "$FAKE_ROOT/fake_pip.py" "$venv" "$@" ;;
  "-m wheel"|"-m ensurepip") exit 1 ;;
esac
PYTHONPATH="$venv/site" exec "$REAL_PYTHON" -S "$@"
'''

FAKE_TORCH = '''import os
__version__ = {version!r}
class version:
    cuda = {cuda!r}
class cuda:
    @staticmethod
    def _caps():
        caps = os.environ.get('FAKE_GPU_CAPS', '') if version.cuda else ''
        return [tuple(int(x) for x in c.split('.')) for c in caps.split(',') if c]
    @staticmethod
    def is_available():
        return bool(cuda._caps())
    @staticmethod
    def device_count():
        return len(cuda._caps())
    @staticmethod
    def get_device_capability(i):
        return cuda._caps()[i]
def tensor(data, device=None):
    return data
'''

FAKE_MMCV_OPS = '''class RoIAlign:
    pass
class _Keep(list):
    def tolist(self):
        return list(self)
def nms(boxes, scores, threshold):
    return None, _Keep([0, 2])
def get_compiling_cuda_version():
    return {compiled!r}
'''

FAKE_PIP = '''import os, re, sys, zipfile
venv, args = sys.argv[1], sys.argv[2:]
site = os.path.join(venv, 'site')
def note(line):
    with open(os.environ['FAKE_LOG'], 'a') as f:
        f.write(line + '\\n')
def module(name, body=''):
    d = os.path.join(site, *name.split('.'))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, '__init__.py'), 'w') as f:
        f.write(body)
note('pip ' + ' '.join(args))
cmd, rest = args[0], args[1:]
if cmd == '--version':
    print('pip 0 (fake)')
elif cmd == 'wheel':
    note('BUILD FORCE_CUDA=%s MAX_JOBS=%s TORCH_CUDA_ARCH_LIST=%s CUDA_HOME=%s' % tuple(
        os.environ.get(k, '') for k in ('FORCE_CUDA', 'MAX_JOBS', 'TORCH_CUDA_ARCH_LIST', 'CUDA_HOME')))
    tag = 'cp%d%d' % sys.version_info[:2]
    out = os.path.join(rest[rest.index('-w') + 1], 'mmcv-2.1.0-%s-%s-linux_x86_64.whl' % (tag, tag))
    with zipfile.ZipFile(out, 'w') as z:
        z.writestr('mmcv/build.txt', os.environ.get('FORCE_CUDA', '0'))
elif cmd == 'install':
    reqs, index, i = [], '', 0
    while i < len(rest):
        a = rest[i]
        if a == '-e':
            module('cbn_mmdet')
            module('cbn_mmdet.ops')
            module('cbn_mmdet.ops.fused', 'def ops():\\n    return True\\n'
                   'def one_call_ops():\\n    return True\\n')
        if a == '--index-url':
            index = rest[i + 1]
        if a in ('-e', '--index-url', '--find-links'):
            i += 2
            continue
        if not a.startswith('-'):
            reqs.append(a)
        i += 1
    for r in reqs:
        if r.endswith('.whl'):
            with zipfile.ZipFile(r) as z:
                force = z.read('mmcv/build.txt').decode()
            note('INSTALL-WHEEL ' + r)
            compiled = os.environ.get('FAKE_TORCH_CUDA') if force == '1' else 'not available'
            module('mmcv')
            module('mmcv.ops', FAKE_MMCV_OPS.format(compiled=compiled))
            continue
        name = re.match(r'[A-Za-z0-9_.-]+', r).group(0).lower()
        if name == 'torch':
            cuda = os.environ.get('FAKE_TORCH_CUDA') or None
            version = '2.13.0+' + ('cu' + cuda.replace('.', '') if cuda else 'cpu')
            note('TORCH %s index=%s -> %s' % (r, index, version))
            module('torch', FAKE_TORCH.format(version=version, cuda=cuda))
        elif name not in ('pip', 'wheel', 'setuptools', 'mmcv'):
            module(name.replace('-', '_'))
elif cmd == 'uninstall':
    pass
else:
    sys.exit('fake pip: unknown command %r' % cmd)
'''


class FakeToolchain:
    """A temporary venv path, wheel cache and fake tools; ``run`` runs tools/setup_env.sh."""

    def __init__(self, root):
        self.root = root
        self.venv = root / 'venv'
        self.cache = root / 'cache'
        self.log = root / 'calls.log'
        self.bin = root / 'bin'
        write_exe(root / 'venv-python', FAKE_VENV_PYTHON)
        self.python = write_exe(self.bin / 'python-base', FAKE_BASE_PYTHON)
        with open(root / 'fake_pip.py', 'w') as f:
            f.write(f'FAKE_TORCH = {FAKE_TORCH!r}\nFAKE_MMCV_OPS = {FAKE_MMCV_OPS!r}\n' + FAKE_PIP)
        self.env = clean_env(
            PATH=f'{self.bin}:{BASE_PATH}', HOME=str(root / 'home'), CBN_VENV=str(self.venv),
            CBN_WHEEL_CACHE=str(self.cache), PYTHON=self.python, FAKE_ROOT=str(root),
            FAKE_LOG=str(self.log), REAL_PYTHON=sys.executable,
            CBN_DEFAULT_CUDA_HOME=str(root / 'no-cuda'), FAKE_TORCH_CUDA='', FAKE_GPU_CAPS='')

    def add_nvcc(self, version='12.8'):
        write_exe(self.bin / 'nvcc', NVCC.format(v=version))

    def calls(self):
        return self.log.read_text().splitlines() if self.log.exists() else []

    def pip_calls(self):
        return [c for c in self.calls() if c.startswith('pip ')]

    def builds(self):
        return [c for c in self.calls() if c.startswith('BUILD ')]

    def run(self, **env):
        if self.log.exists():
            self.log.unlink()
        assert str(self.venv).startswith(str(self.root))
        proc = subprocess.run(['bash', SCRIPT], env=dict(self.env, **env), capture_output=True,
                              text=True, timeout=TIMEOUT, cwd=str(self.root))
        proc.out = proc.stdout + proc.stderr
        return proc

    def stamp(self):
        return (self.venv / '.cbn_mmdet_env_ok').read_text()


@pytest.fixture
def fake(tmp_path):
    return FakeToolchain(tmp_path)


CUDA_KEY = f'cuda12.8-{PYTAG}-torch2.13.0-sm90'
CPU_KEY = f'cpu-{PYTAG}-torch2.13.0'


def test_missing_nvcc_fails_before_anything_is_downloaded(fake):
    proc = fake.run(CBN_DEVICE='cuda')
    assert proc.returncode != 0
    assert 'CBN_DEVICE=cuda needs the CUDA compiler nvcc' in proc.out
    assert 'Install the CUDA toolkit' in proc.out and 'CUDA_HOME' in proc.out
    assert fake.calls() == []          # no interpreter, no pip
    assert not fake.venv.exists()      # and no environment that would now be recorded as cuda
    proc = fake.run(CBN_DEVICE='cuda', CUDA_HOME=str(fake.root / 'no-cuda'))
    assert proc.returncode != 0 and '/bin/nvcc does not exist' in proc.out
    assert fake.calls() == []


def test_cuda_setup_then_later_runs_stay_on_cuda(fake):
    fake.add_nvcc('12.8')
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 0, proc.out
    torch_calls = [c for c in fake.calls() if c.startswith('TORCH ')]
    assert torch_calls == ['TORCH torch==2.13.0,!=2.13.0+cpu index= -> 2.13.0+cu128']
    assert fake.builds() == [f'BUILD FORCE_CUDA=1 MAX_JOBS={fake.builds()[0].split("MAX_JOBS=")[1].split()[0]} '
                             f'TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME={fake.root}']
    assert os.listdir(fake.cache / CUDA_KEY) == [WHEEL]
    assert (fake.venv / '.cbn_device').read_text().strip() == 'cuda'
    assert 'device=cuda' in fake.stamp()
    assert 'CUDA check passed' in proc.out

    # `make test` / `make demo` run the script without CBN_DEVICE: the fast path, nothing installed
    proc = fake.run(FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 0, proc.out
    assert fake.pip_calls() == []

    # a package-list change forces the slow path: still cuda, the cached wheel is reused
    (fake.venv / '.cbn_mmdet_env_ok').unlink()
    proc = fake.run(FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 0, proc.out
    assert any(c.startswith('TORCH torch==2.13.0,!=2.13.0+cpu') for c in fake.calls())
    assert fake.builds() == []
    assert 'device=cuda' in fake.stamp()

    # asking for the other device explicitly is an error, before any pip call
    proc = fake.run(CBN_DEVICE='cpu')
    assert proc.returncode == 2
    assert f'{fake.venv} was set up for CBN_DEVICE=cuda, but CBN_DEVICE=cpu was asked for' in proc.out
    assert f"rm -rf '{fake.venv}'" in proc.out and 'CBN_VENV=' in proc.out
    assert fake.pip_calls() == []
    assert 'device=cuda' in fake.stamp()


def test_interrupted_cuda_setup_is_resumed_as_cuda(fake):
    fake.add_nvcc('12.8')
    # the first attempt stops after the venv was made (here: a CPU torch was installed)
    proc = fake.run(CBN_DEVICE='cuda')
    assert proc.returncode != 0
    proc = fake.run(FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')   # plain `make test` afterwards
    assert proc.returncode == 0, proc.out
    assert 'device=cuda' in fake.stamp()
    assert [b.split()[1] for b in fake.builds()] == ['FORCE_CUDA=1']


def test_cuda_with_a_cpu_torch_is_a_clear_error(fake):
    fake.add_nvcc('12.8')
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 1
    assert 'is a CPU-only build (2.13.0+cpu: torch.version.cuda is None)' in proc.out
    assert 'find-links' in proc.out and 'CBN_TORCH_INDEX_URL=' in proc.out
    assert fake.builds() == []
    assert not (fake.venv / '.cbn_mmdet_env_ok').exists()


def test_cuda_torch_index_url(fake):
    fake.add_nvcc('12.6')
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.6', FAKE_GPU_CAPS='8.0,8.6',
                    CBN_TORCH_INDEX_URL='https://download.pytorch.org/whl/cu126', MAX_JOBS='3')
    assert proc.returncode == 0, proc.out
    assert [c for c in fake.calls() if c.startswith('TORCH ')] == [
        'TORCH torch==2.13.0,!=2.13.0+cpu index=https://download.pytorch.org/whl/cu126 -> 2.13.0+cu126']
    assert fake.builds()[0].startswith('BUILD FORCE_CUDA=1 MAX_JOBS=3 TORCH_CUDA_ARCH_LIST=8.0;8.6 ')
    assert os.listdir(fake.cache / f'cuda12.6-{PYTAG}-torch2.13.0-sm80-sm86') == [WHEEL]


def test_cuda_nvcc_major_mismatch_fails_before_the_build(fake):
    fake.add_nvcc('11.8')
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 1
    assert 'nvcc is CUDA 11.8 but torch 2.13.0+cu128 was built with CUDA 12.8' in proc.out
    assert fake.builds() == []


def test_cuda_without_visible_gpu(fake):
    fake.add_nvcc('12.8')
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='')
    assert proc.returncode == 1
    assert 'no GPU is visible to torch' in proc.out and 'TORCH_CUDA_ARCH_LIST' in proc.out
    assert fake.builds() == []
    # with the architectures given, the wheel is built and cached, but the set-up is not marked ready
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='',
                    TORCH_CUDA_ARCH_LIST='9.0')
    assert proc.returncode == 1
    assert 'torch.cuda.is_available() is False' in proc.out
    assert os.listdir(fake.cache / CUDA_KEY) == [WHEEL]
    assert not (fake.venv / '.cbn_mmdet_env_ok').exists()
    # on the GPU machine the same command finishes from the cache
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 0, proc.out
    assert fake.builds() == []


def test_cuda_mmcv_without_cuda_ops_is_an_error(fake):
    fake.add_nvcc('12.8')
    make_wheel(fake.cache / CUDA_KEY / WHEEL, force_cuda='0')   # a CPU build under the cuda key
    proc = fake.run(CBN_DEVICE='cuda', FAKE_TORCH_CUDA='12.8', FAKE_GPU_CAPS='9.0')
    assert proc.returncode == 1
    assert "compiled without CUDA (get_compiling_cuda_version() says 'not available')" in proc.out
    assert str(fake.cache / CUDA_KEY / WHEEL) in proc.out
    assert not (fake.venv / '.cbn_mmdet_env_ok').exists()


def test_cpu_setup_reuses_the_wheel_of_the_old_cache_layout(fake):
    legacy = make_wheel(fake.cache / 'cpu' / WHEEL)
    proc = fake.run()
    assert proc.returncode == 0, proc.out
    assert fake.builds() == []
    assert [c for c in fake.calls() if c.startswith('TORCH ')] == [
        'TORCH torch==2.13.0,!=2.13.0+cpu index= -> 2.13.0+cpu']
    assert os.listdir(fake.cache / CPU_KEY) == [WHEEL]
    assert f'INSTALL-WHEEL {fake.cache / CPU_KEY / WHEEL}' in fake.calls()
    assert osp.isfile(legacy)
    assert fake.stamp().strip() == ('torch=2.13.0 torchvision=0.28.0 mmcv=2.1.0 mmengine=0.10.7 mmdet=3.3.0 '
                                    'device=cpu extras=pycocotools,pytest,matplotlib,scikit-learn,expecttest,'
                                    'sphinx9,myst-parser5,mmpretrain '
                                    'packages=cbn_mmdet,cbn_mmdet_demo')
    assert (fake.venv / '.cbn_device').read_text().strip() == 'cpu'
    proc = fake.run()
    assert proc.returncode == 0 and fake.calls() == ['python -c ']   # the fast path: no pip


def test_cpu_build_cleans_stale_temporaries_and_caches_atomically(fake):
    stale = fake.cache / CPU_KEY / f'.tmp.{WHEEL}.12345'
    os.makedirs(stale.parent)
    stale.write_bytes(b'PK\x03\x04 half a wheel')
    proc = fake.run(MAX_JOBS='')
    assert proc.returncode == 0, proc.out
    assert len(fake.builds()) == 1 and fake.builds()[0].startswith('BUILD FORCE_CUDA=0 MAX_JOBS=')
    jobs = int(fake.builds()[0].split('MAX_JOBS=')[1].split()[0])
    assert 1 <= jobs <= os.cpu_count()
    assert os.listdir(fake.cache / CPU_KEY) == [WHEEL]


@pytest.mark.parametrize('damage', ['no-python', 'broken-python', 'no-pip'])
def test_half_created_venv_is_recreated(fake, damage):
    make_wheel(fake.cache / CPU_KEY / WHEEL)
    assert fake.run().returncode == 0
    (fake.venv / '.cbn_mmdet_env_ok').unlink()     # as if interrupted before the end
    py = fake.venv / 'bin' / 'python'
    if damage == 'no-python':
        py.unlink()
    elif damage == 'broken-python':
        write_exe(py, '#!/bin/sh\nexit 127\n')
    else:
        write_exe(py, '#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 1\n'
                      f'exec "{sys.executable}" -S "$@"\n')
    proc = fake.run()
    assert proc.returncode == 0, proc.out
    assert f'{fake.venv} is incomplete ({damage}): recreating it' in proc.out
    assert f'base-python -m venv --clear {fake.venv}' in fake.calls()
    assert fake.builds() == []
    assert 'device=cpu' in fake.stamp()


def test_a_folder_that_is_not_a_venv_is_left_alone(fake):
    os.makedirs(fake.venv)
    (fake.venv / 'notes.txt').write_text('mine')
    proc = fake.run()
    assert proc.returncode == 1
    assert 'is not a virtual environment; refusing to empty it' in proc.out
    assert (fake.venv / 'notes.txt').read_text() == 'mine'
    assert fake.pip_calls() == []


def test_old_python_is_refused_before_any_download(fake):
    old = write_exe(fake.bin / 'python3.9', '#!/bin/sh\necho "base-python $*" >> "$FAKE_LOG"\necho 3.9\n')
    proc = fake.run(PYTHON=old)
    assert proc.returncode == 1
    assert 'is Python 3.9; Python >= 3.10 is needed' in proc.out
    assert fake.pip_calls() == []
    assert not fake.venv.exists()


def test_cpu_setup_takes_pypi_torch_and_torchvision_and_the_cpu_wheel(fake):
    # PyPI's torch is a CUDA build; its CPU ops use the same cached wheel as the CPU build's
    make_wheel(fake.cache / CPU_KEY / WHEEL)
    proc = fake.run(FAKE_TORCH_CUDA='13.0', CBN_TORCH_INDEX_URL='https://download.pytorch.org/whl/cu126')
    assert proc.returncode == 0, proc.out
    torch_installs = [c for c in fake.pip_calls() if 'torch==' in c]
    # together, so that pip resolves a torchvision built for the pinned torch; the index is for cuda only
    assert torch_installs == ['pip install -q torch==2.13.0,!=2.13.0+cpu torchvision==0.28.0,!=0.28.0+cpu']
    assert fake.builds() == []
    assert f'INSTALL-WHEEL {fake.cache / CPU_KEY / WHEEL}' in fake.calls()
    assert any('mmpretrain==1.2.0' in c for c in fake.pip_calls())
    assert 'device=cpu' in fake.stamp() and 'mmpretrain' in fake.stamp()


def test_an_environment_set_up_before_mmpretrain_is_updated(fake):
    make_wheel(fake.cache / CPU_KEY / WHEEL)
    assert fake.run().returncode == 0
    old_stamp = ('torch=2.13.0 mmcv=2.1.0 mmengine=0.10.7 mmdet=3.3.0 device=cpu extras=pycocotools,pytest,'
                 'matplotlib,scikit-learn,expecttest,sphinx9,myst-parser5 packages=cbn_mmdet,cbn_mmdet_demo')
    (fake.venv / '.cbn_mmdet_env_ok').write_text(old_stamp + '\n')
    proc = fake.run(FAKE_TORCH_CUDA='13.0')
    assert proc.returncode == 0, proc.out
    assert any('torchvision==0.28.0' in c for c in fake.pip_calls())
    assert any('mmpretrain==1.2.0' in c for c in fake.pip_calls())
    assert fake.builds() == []
    assert fake.stamp().strip() != old_stamp
