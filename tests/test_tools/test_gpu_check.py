"""tools/gpu_check.py: its CPU parts run and pass here; without CUDA the GPU run skips cleanly."""
import json

import torch
import torch.nn as nn

import gpu_check  # noqa: E402

from cbn_mmdet.models import convert_to_cbn  # noqa: E402


def test_cpu_checks_pass(tmp_path):
    rc = gpu_check.run(gpu_check.parse_args(['--out', str(tmp_path), '--device', 'cpu', '--quick',
                                             '--skip-models']))
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert rc == 0, report['checks']
    names = [c['check'] for c in report['checks']]
    assert sum('vs CPU float64' in n for n in names) == 4  # affine on/off × NCHW/channels_last
    assert any('autocast bfloat16' in n for n in names)
    assert sum('module' in n for n in names) == 2
    assert (tmp_path / 'gpu_check.md').read_text().count('| PASS |') == len(names)
    fixed = {r['norm']: r for r in report['fixed_cost']}
    assert set(fixed) == {'bn', 'naive', 'cbn'} and fixed['bn']['above_bn_ms'] == 0
    assert fixed['cbn']['ops_per_layer'] > fixed['naive']['ops_per_layer'] > fixed['bn']['ops_per_layer']
    assert 'Per-layer fixed cost' in (tmp_path / 'gpu_check.md').read_text()


def test_launch_share_relates_the_fixed_cost_to_the_model_step():
    cost = [dict(precision=p, norm=n, step_ms=ms) for p, rows in
            (('fp32', (('bn', 100.0), ('naive', 110.0), ('cbn', 130.0))),
             ('AMP fp16', (('bn', 60.0), ('naive', 80.0), ('cbn', 100.0)))) for n, ms in rows]
    fixed = [dict(norm='bn', above_bn_ms=0.0), dict(norm='naive', above_bn_ms=0.2),
             dict(norm='cbn', above_bn_ms=0.5)]
    assert gpu_check.launch_share(cost, fixed, 60) == [
        'fp32: CBN − BN = 30.0 ms per step; 60 CBN layers × 0.500 ms fixed cost = 30.0 ms',
        'AMP fp16: CBN − BN = 40.0 ms per step; 60 CBN layers × 0.500 ms fixed cost = 30.0 ms']


def test_without_cuda_the_gpu_run_skips_cleanly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.run(gpu_check.parse_args(['--out', str(tmp_path)])) == 0
    assert 'CUDA is not available' in (tmp_path / 'gpu_check.md').read_text()


def test_cost_rows_with_a_small_model():
    def build(norm):
        torch.manual_seed(0)
        body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = body

            def forward(self, x):
                return {'0': self.body(x)}

        model = Net()
        if norm != 'bn':
            convert_to_cbn(model, window=4, compensate=norm == 'cbn')
        return model

    rows = gpu_check.benchmark(build, 'cpu', images=2, size=(16, 16), steps=2, warmup=2,
                               amp_modes=(False, ))
    assert [r['norm'] for r in rows] == ['bn', 'naive', 'cbn']
    assert rows[0]['time_ratio'] == 1.0 and all(r['step_ms'] > 0 for r in rows)
