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
