"""tools/model_converters/publish_model.py, and tools/test.py's notice for CBN training checkpoints.

A tiny conv + CBN model (window 3) is trained 3 SGD steps so that its layers hold history, saved as
an mmengine runner checkpoint, and published with the tool in a subprocess; the result must load
strictly into the same architecture built with BN and with CBN, with the trained weights and
running statistics. The error cases call the tool's functions in this process (no interpreter
start-up per case).
"""
import hashlib
import importlib.util
import os
import os.path as osp
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.logging import MessageHub

import cbn_mmdet  # noqa: F401  (registers CBN; torch.load of mmengine checkpoints)
from cbn_mmdet.models import CrossIterationBatchNorm2d
from cbn_mmdet.models.cbn import HISTORY_STATE_KEYS

from conftest import REPO_ROOT  # noqa: E402

TOOL = osp.join(REPO_ROOT, 'tools', 'model_converters', 'publish_model.py')
TRAINING_KEYS = ('optimizer', 'message_hub', 'param_schedulers')
WINDOW = 3


def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


publish_model = load_script(TOOL, 'publish_model_tool')


def make_model(norm_type):
    norm_cfg = dict(type='CBN', window=WINDOW) if norm_type == 'CBN' else dict(type='BN')
    return nn.Sequential(
        ConvModule(3, 8, 3, padding=1, norm_cfg=norm_cfg),
        ConvModule(8, 8, 3, padding=1, norm_cfg=norm_cfg))


def is_history_key(key):
    return key.rsplit('.', 1)[-1] in HISTORY_STATE_KEYS


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope='module')
def published(tmp_path_factory):
    """Train, save a runner-style checkpoint, publish it: paths, trained state, tool output."""
    torch.manual_seed(0)
    model = make_model('CBN')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        loss = model(torch.randn(4, 3, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # advances CBN's iteration
    hub = MessageHub.get_instance('test_publish_model')
    hub.update_scalar('train/loss', loss.item())
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    metadata = model.state_dict()._metadata
    checkpoint = dict(
        meta=dict(epoch=1, iter=3, seed=0, cfg="model = dict(type='Tiny')",
                  dataset_meta=dict(classes=('circle', 'square'))),
        state_dict=model.state_dict(), optimizer=optimizer.state_dict(),
        message_hub=hub.state_dict(), param_schedulers=[dict(base_lrs=[0.1], last_step=3)])
    work = tmp_path_factory.mktemp('publish_model')
    in_file = work / 'iter_3.pth'
    torch.save(checkpoint, in_file)
    out_dir = work / 'published'
    proc = run_tool(in_file, out_dir / 'tiny.pth')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return SimpleNamespace(in_file=str(in_file), out_dir=str(out_dir), trained=trained,
                           meta=checkpoint['meta'], stdout=proc.stdout, model=model,
                           metadata=metadata)


@pytest.fixture(scope='module')
def out_file(published):
    files = os.listdir(published.out_dir)
    assert len(files) == 1, files  # no OUT itself, no temporary file left behind
    return osp.join(published.out_dir, files[0])


def test_training_checkpoint_has_history(published):
    """Every CBN layer of the input holds history (else the other tests prove nothing)."""
    cbn_layers = [m for m in published.model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(cbn_layers) == 2 and all(m.history_length == WINDOW - 1 for m in cbn_layers)
    history = [k for k in published.trained if is_history_key(k)]
    assert len(history) == 2 * len(HISTORY_STATE_KEYS)


def test_output_named_with_sha256_prefix(published, out_file):
    name = osp.basename(out_file)
    assert re.fullmatch(r'tiny-[0-9a-f]{8}\.pth', name), name
    with open(out_file, 'rb') as f:
        assert name == f'tiny-{hashlib.sha256(f.read()).hexdigest()[:8]}.pth'
    assert f'The published model is saved at {out_file}.' in published.stdout


def test_training_state_and_history_removed(published, out_file):
    checkpoint = torch.load(out_file, map_location='cpu')
    assert set(checkpoint) == {'meta', 'state_dict'}
    assert checkpoint['meta'] == published.meta
    assert not [k for k in checkpoint['state_dict'] if is_history_key(k)]
    assert set(checkpoint['state_dict']) == {
        k for k in published.trained if not is_history_key(k)}
    # the module versions that torch's and CBN's loaders read are kept
    assert checkpoint['state_dict']._metadata == published.metadata
    # what was removed is reported, with counts
    assert 'Removed top-level keys (training state): optimizer, message_hub, param_schedulers' \
        in published.stdout
    assert f'Removed {2 * len(HISTORY_STATE_KEYS)} CBN history tensors of 2 CBN layers' \
        in published.stdout


@pytest.mark.parametrize('norm_type', ['BN', 'CBN'])
def test_loads_strictly_with_trained_weights(published, out_file, norm_type):
    state_dict = torch.load(out_file, map_location='cpu')['state_dict']
    model = make_model(norm_type)
    model.load_state_dict(state_dict, strict=True)
    loaded = model.state_dict()
    # weights, running statistics and num_batches_tracked, exactly as trained
    assert set(loaded) == {k for k in published.trained if not is_history_key(k)}
    for key, value in loaded.items():
        assert torch.equal(value, published.trained[key]), key
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2
    if norm_type == 'CBN':
        assert all(isinstance(m, CrossIterationBatchNorm2d) and m.history_length == 0
                   for m in norms)
    # and it predicts like the trained model
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), published.model.eval()(x), atol=1e-6)


def test_republishing_a_published_file_is_idempotent(out_file, tmp_path, capsys):
    """A file without training state or history publishes to the same bytes (same name)."""
    publish_model.process_checkpoint(out_file, str(tmp_path / 'tiny.pth'))
    stdout = capsys.readouterr().out
    assert 'No CBN history in the state dict' in stdout
    assert 'Removed top-level keys' not in stdout
    assert os.listdir(tmp_path) == [osp.basename(out_file)]


def test_missing_input_fails_with_a_clear_message(tmp_path, monkeypatch):
    """The command line exits with one error line (sys.exit(str): status 1, message on stderr)."""
    missing = tmp_path / 'nope.pth'
    monkeypatch.setattr(sys, 'argv', [TOOL, str(missing), str(tmp_path / 'out.pth')])
    with pytest.raises(SystemExit) as excinfo:
        publish_model.main()
    assert excinfo.value.code == (
        f'publish_model.py: error: input checkpoint {missing} does not exist')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('content, message', [
    (b'not a checkpoint\n', r'is not a torch checkpoint: it is neither a zip archive nor a pickle'),
    (b'\x80\x02 a damaged pickle', r'could not be read as a torch checkpoint \(UnpicklingError'),
    (torch.zeros(3), r'holds a Tensor, not a checkpoint dict'),
    ({'conv.weight': torch.zeros(3)},
     r"has no 'state_dict' entry, so it is not an mmengine checkpoint \(top-level keys: "
     r'conv\.weight\)'),
    ({'state_dict': [1, 2]}, r"has a list as its 'state_dict' entry"),
])
def test_not_a_checkpoint_fails_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / 'bad.pth'
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        publish_model.process_checkpoint(str(path), str(tmp_path / 'out.pth'))
    assert os.listdir(tmp_path) == ['bad.pth']  # nothing written


def test_directory_input_fails_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match='is not a file'):
        publish_model.process_checkpoint(str(tmp_path), str(tmp_path / 'out.pth'))


# ---------------------------------------------------------------------------------- tools/test.py
@pytest.fixture(scope='module')
def tools_test_module():
    return load_script(osp.join(REPO_ROOT, 'tools', 'test.py'), 'cbn_tools_test')


def notice(tools_test_module, model, checkpoint):
    lines = []
    runner = SimpleNamespace(model=model, logger=SimpleNamespace(info=lines.append))
    tools_test_module.CBNHistoryNotice('iter_3.pth').after_load_checkpoint(runner, checkpoint)
    return lines


def test_test_py_explains_cbn_checkpoint_for_bn_model(tools_test_module, published):
    state_dict = torch.load(published.in_file, map_location='cpu')['state_dict']
    checkpoint = {'meta': {}, 'state_dict': state_dict}
    model = make_model('BN')
    lines = notice(tools_test_module, model, checkpoint)
    assert len(lines) == 1
    assert lines[0].startswith('iter_3.pth is a CBN training checkpoint')
    assert 'not needed for inference' in lines[0]
    assert 'tools/model_converters/publish_model.py' in lines[0]
    # the history is ignored: what remains loads strictly, so mmengine has nothing to list
    assert not [k for k in state_dict if is_history_key(k)]
    model.load_state_dict(state_dict, strict=True)


def test_test_py_quiet_for_cbn_model_or_checkpoint_without_history(tools_test_module, published):
    state_dict = torch.load(published.in_file, map_location='cpu')['state_dict']
    keys = list(state_dict)
    assert notice(tools_test_module, make_model('CBN'), {'state_dict': state_dict}) == []
    assert list(state_dict) == keys  # a CBN model gets its history
    plain = {k: v for k, v in state_dict.items() if not is_history_key(k)}
    assert notice(tools_test_module, make_model('BN'), {'state_dict': plain}) == []
