"""tools/gpu_check.py: its CPU parts run and pass here; without CUDA the GPU run skips cleanly."""
import json
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

import gpu_check  # noqa: E402

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN, convert_to_cbn  # noqa: E402


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
    for r in fixed.values():  # the host's CPU time of the same steps (on the CPU: all of it, 1 thread)
        assert _sane(r['host_ms_per_layer']) and _sane(r['host_ratio']), r
    assert 'host ms per layer and step' in (tmp_path / 'gpu_check.md').read_text()
    assert any(n.startswith('host = ') for n in report['notes'])


def _sane(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


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


def _tiny_build(norm):
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


def test_cost_rows_with_a_small_model():
    rows = gpu_check.benchmark(_tiny_build, 'cpu', images=2, size=(16, 16), steps=2, warmup=2,
                               amp_modes=(False, ))
    assert [r['norm'] for r in rows] == ['bn', 'naive', 'cbn']
    assert rows[0]['time_ratio'] == 1.0 and all(r['step_ms'] > 0 for r in rows)
    # the FLOP ratios of one float32 step: the products counted for CBN, none for Naive CBN
    assert rows[0]['flop_ratio'] == 1.0 and rows[1]['flop_ratio'] == pytest.approx(1.0, abs=1e-3)
    assert rows[2]['flop_ratio'] > 1.1
    for r in rows:
        assert r['mode'] == 'eager' and r['graphs'] is None
        assert _sane(r['host_ms']) and _sane(r['host_ratio']) and r['first_steps_s'] > 0, r


def test_compiled_rows_with_a_small_model(tmp_path):
    rows = gpu_check.benchmark(_tiny_build, 'cpu', images=2, size=(16, 16), steps=2, warmup=1,
                               amp_modes=(False, ), compile_backend='aot_eager', norms=('bn', 'cbn'))
    assert [(r['mode'], r['norm']) for r in rows] == [('compiled', 'bn'), ('compiled', 'cbn')]
    bn, cbn = rows
    assert bn['warmup_steps'] == cbn['warmup_steps'] == 3  # CBN's graphs all compiled before timing
    assert bn['graphs'] == 1 and cbn['graphs'] == 2  # CBN: the first iteration, the steady state
    assert bn['graphs_timed'] == cbn['graphs_timed'] == 0
    assert bn['flop_ratio'] is None and cbn['flop_ratio'] is None  # (counted in the eager rows)
    for r in rows:
        assert _sane(r['host_ms']) and _sane(r['host_ratio']) and r['first_steps_s'] > 0, r
    text = gpu_check.write_report(str(tmp_path), {}, [], rows, [])
    assert '| fp32 | compiled | cbn |' in text and text.count(' | 3 | ') == 2


@pytest.mark.parametrize('flags,why', [(['--quick'], '--quick'),
                                       (['--skip-compiled'], '--skip-compiled')])
def test_quick_and_skip_compiled_leave_the_compiled_rows_out(flags, why):
    args = gpu_check.parse_args(['--out', 'unused', '--device', 'cpu'] + flags)
    backend, reason = gpu_check.compiled_rows_backend(args)
    assert backend is None and reason.startswith(why)
    default = gpu_check.parse_args(['--out', 'unused'])
    assert gpu_check.compiled_rows_backend(default) == ('inductor', None)


def test_quick_model_rows_have_host_times_and_no_compiled_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'resnet50_fpn', _tiny_build)
    monkeypatch.setitem(sys.modules, 'torchvision', types.ModuleType('torchvision'))  # (may be absent)
    gpu_check.run(gpu_check.parse_args(['--out', str(tmp_path), '--device', 'cpu', '--quick',
                                        '--skip-fixed-cost', '--image-size', '16', '16', '--steps', '2',
                                        '--warmup', '1']))
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert [(r['mode'], r['norm']) for r in report['cost']] == [
        ('eager', 'bn'), ('eager', 'naive'), ('eager', 'cbn')]
    assert all(_sane(r['host_ms']) and _sane(r['host_ratio']) for r in report['cost'])
    assert 'compiled rows skipped: --quick' in ' '.join(report['notes'])
    assert '| host (ms) | host / step |' in (tmp_path / 'gpu_check.md').read_text()


class _Stopped(BaseException):
    """A run killed from outside (a command's time limit): not caught as a failed section."""


def _stub_fixed_cost(device, steps, warmup):
    return [dict(norm=n, ms_per_layer=1.0, above_bn_ms=a, ops_per_layer=o, host_ms_per_layer=0.5,
                 host_ratio=0.5) for n, a, o in (('bn', 0.0, 23), ('naive', 0.1, 30), ('cbn', 0.2, 40))]


def test_a_run_stopped_in_the_compiled_rows_leaves_the_rows_before_them(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'resnet50_fpn', _tiny_build)
    monkeypatch.setitem(sys.modules, 'torchvision', types.ModuleType('torchvision'))  # (may be absent)
    monkeypatch.setattr(gpu_check, 'fixed_cost', _stub_fixed_cost)
    measure = gpu_check.measure_step

    def stopped_when_compiling(*args, **kwargs):
        if args[-1] or kwargs.get('compile_backend'):
            raise _Stopped
        return measure(*args, **kwargs)

    monkeypatch.setattr(gpu_check, 'measure_step', stopped_when_compiling)
    with pytest.raises(_Stopped):
        gpu_check.run(gpu_check.parse_args(['--out', str(tmp_path), '--device', 'cpu',
                                            '--compile-backend', 'aot_eager', '--image-size', '16',
                                            '16', '--steps', '2', '--warmup', '1']))
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert report['checks'] and all(c['ok'] for c in report['checks'])
    assert [(r['mode'], r['norm']) for r in report['cost']] == [
        ('eager', 'bn'), ('eager', 'naive'), ('eager', 'cbn')]
    assert [r['norm'] for r in report['fixed_cost']] == ['bn', 'naive', 'cbn']  # (before compiling)
    assert report['notes'][-1].startswith('incomplete: stopped while running the compiled model rows')
    assert 'incomplete: stopped while running the compiled' in (tmp_path / 'gpu_check.md').read_text()


def test_a_run_stopped_between_model_rows_keeps_the_rows_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'resnet50_fpn', _tiny_build)
    monkeypatch.setitem(sys.modules, 'torchvision', types.ModuleType('torchvision'))
    measure = gpu_check.measure_step

    def stopped_at_cbn(build, norm, *args, **kwargs):
        if norm == 'cbn':
            raise _Stopped
        return measure(build, norm, *args, **kwargs)

    monkeypatch.setattr(gpu_check, 'measure_step', stopped_at_cbn)
    with pytest.raises(_Stopped):
        gpu_check.run(gpu_check.parse_args(['--out', str(tmp_path), '--device', 'cpu', '--quick',
                                            '--image-size', '16', '16', '--steps', '2', '--warmup', '1']))
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert [r['norm'] for r in report['cost']] == ['bn', 'naive']
    assert report['notes'][-1].startswith('incomplete: stopped while running the eager model rows')


def test_time_limit_skips_the_sections_that_would_start_after_it(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, 'resnet50_fpn', _tiny_build)
    monkeypatch.setitem(sys.modules, 'torchvision', types.ModuleType('torchvision'))
    monkeypatch.setattr(gpu_check, 'fixed_cost', _stub_fixed_cost)
    rc = gpu_check.run(gpu_check.parse_args(['--out', str(tmp_path), '--device', 'cpu',
                                             '--compile-backend', 'aot_eager', '--time-limit', '0',
                                             '--image-size', '16', '16']))
    report = json.loads((tmp_path / 'gpu_check.json').read_text())
    assert rc == 0 and report['checks'] and report['cost'] == [] and report['fixed_cost'] == []
    skipped = [n for n in report['notes'] if 'skipped: --time-limit 0 s reached' in n]
    assert [n.split(' skipped')[0] for n in skipped] == [
        'eager model rows', 'fixed-cost rows', 'compiled model rows']
    assert not any(n.startswith('incomplete') for n in report['notes'])


@pytest.mark.parametrize('value', ['-1', 'nan'])
def test_a_negative_time_limit_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(['--out', 'unused', '--time-limit', value])
    assert '--time-limit must be a number of seconds, 0 or more' in capsys.readouterr().err


def test_model_variants_are_built_with_their_options():
    pytest.importorskip('torchvision')
    for norm, options in gpu_check.CBN_VARIANTS.items():
        layers = [m for m in gpu_check.resnet50_fpn(norm).modules() if isinstance(m, CBN)]
        assert len(layers) > 50 and all(m.window == 4 for m in layers)
        assert all(m.compensate == options.get('compensate', True) for m in layers), norm
        assert all(m.var_grad_dtype == options.get('var_grad_dtype', 'float32') for m in layers)
    assert not any(isinstance(m, CBN) for m in gpu_check.resnet50_fpn('bn').modules())
