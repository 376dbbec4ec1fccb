"""The layer library works where only torch is installed, and importing it changes nothing in torch."""
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    BLOCKED = ('mmcv', 'mmengine', 'mmdet', 'pycocotools')

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in BLOCKED:
                raise ModuleNotFoundError(f'No module named {name!r} (blocked by the test)')
            return None

    sys.meta_path.insert(0, Block())

    import torch
    import torch.nn as nn
    import torch.serialization as ser

    def torch_state():
        safe = ser.get_safe_globals() if hasattr(ser, 'get_safe_globals') else None
        return (safe and list(safe), torch.load, torch.cuda.set_device, nn.Module.__call__,
                torch.nn.parallel.DistributedDataParallel.__init__)

    import torch._dynamo  # torch's own submodule (CBN opts out of graph capture); it allow-lists its
                          # own types for torch.load when imported, which is not ours to count
    before = torch_state()
    import cbn_mmdet
    from cbn_mmdet import CrossIterationBatchNorm2d, BatchRenorm2d, convert_to_cbn
    assert torch_state() == before, 'importing cbn_mmdet changed torch'
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
    assert not loaded, loaded

    try:
        import torchvision
        model = torchvision.models.resnet18(num_classes=5)
        source = 'torchvision resnet18'
    except Exception:  # CI's CPU environment has no torchvision
        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())
        model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                              block(8, 16, 2), block(16, 16, 1), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(16, 5))
        source = 'small ResNet-like net'
    convert_to_cbn(model, window=3)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert layers and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, ))
    losses = []
    for _ in range(4):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(m.last_bind_status == 'conv' for m in layers), [m.last_bind_status for m in layers]
    assert all(m.history_length == 2 for m in layers)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    model.eval()
    with torch.no_grad():
        model(x)
    BatchRenorm2d(4)(torch.randn(2, 4, 3, 3))
    print('OK', source, len(layers), 'CBN layers, losses', [round(v, 3) for v in losses])
''')


def test_layers_work_and_patch_nothing_with_torch_alone():
    out = subprocess.run([sys.executable, '-c', _SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith('OK'), out.stdout


def test_openmmlab_setup_registers_when_installed():
    pytest.importorskip('mmengine')
    import cbn_mmdet
    from mmengine.registry import MODELS
    assert MODELS.get('CBN') is cbn_mmdet.CrossIterationBatchNorm2d
    assert MODELS.get('BRN') is cbn_mmdet.BatchRenorm2d


def test_compat_fixes_can_be_turned_off():
    pytest.importorskip('mmengine')
    script = ('import torch._dynamo, torch.serialization as s; before = len(s.get_safe_globals()); '
              'import cbn_mmdet; from mmengine.registry import MODELS; '
              'print(len(s.get_safe_globals()) - before, MODELS.get("CBN") is not None)')
    runs = {}
    for value in ('0', '1'):
        env = dict(os.environ, CBN_MMDET_COMPAT=value)
        out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        runs[value] = out.stdout.split()
    assert runs['0'] == ['0', 'True'] and int(runs['1'][0]) > 0 and runs['1'][1] == 'True'
