"""The benchmark scripts run (tiny sizes, one step each): a refactoring of the layer must not leave
them broken until the next measurement."""
import json
import os.path as osp
import sys

import pytest
import torch
import torch.nn as nn

from conftest import TOOLS

sys.path.insert(0, osp.join(TOOLS, 'benchmarks'))

import benchmark_fixed_cost  # noqa: E402
import benchmark_layer  # noqa: E402
import benchmark_sync_cbn  # noqa: E402
from cbn_mmdet.models import CrossIterationBatchNorm2d  # noqa: E402
from op_names import OpNames  # noqa: E402


def test_fixed_cost_benchmark_reports_every_variant():
    rows = benchmark_fixed_cost.run(benchmark_fixed_cost.parse_args(
        ['--layers', '2', '--channels', '4', '--size', '4', '--steps', '2', '--warmup', '1']))
    assert set(rows) == {'bn', 'naive', 'cbn'}
    assert rows['cbn']['ops'] > rows['naive']['ops'] > rows['bn']['ops'] > 0
    phases = rows['cbn']['phase_ops']
    assert len(phases) == len(benchmark_fixed_cost.PHASES) and all(n > 0 for n in phases.values())
    assert phases['record (incl. statistic gradients)'] > phases['statistic gradients']


def test_fixed_cost_benchmark_times_compiled_layers_against_compiled_bn():
    rows = benchmark_fixed_cost.run(benchmark_fixed_cost.parse_args(
        ['--layers', '2', '--channels', '4', '--size', '4', '--steps', '2', '--warmup', '3',
         '--compile', 'aot_eager']))
    assert set(rows) == {'bn', 'naive', 'cbn', 'bn-compiled', 'cbn-compiled'}
    for name in ('bn-compiled', 'cbn-compiled'):
        assert rows[name]['ops'] is None and rows[name]['warmup_s'] > 0 and rows[name]['step_ms'] > 0


def test_compiled_benchmark_reports_bn_and_cbn_with_flops(capsys, tmp_path):
    import benchmark_compiled
    out = tmp_path / 'rows.json'
    benchmark_compiled.main(['--model', 'r18', '--size', '32', '32', '--steps', '1', '--warmup', '3',
                             '--modes', 'eager', '--variants', 'bn', 'cbn', 'cbn-bf16-history',
                             'cbn-ops', '--profile-parts', '1', '--out', str(out)])
    rows = {(r['variant'], r['mode']): r for r in json.loads(out.read_text())['rows']}
    assert set(rows) == {('bn', 'eager'), ('cbn', 'eager'), ('cbn-bf16-history', 'eager'),
                         ('cbn-ops', 'eager')}
    assert rows['bn', 'eager']['flop_ratio'] == 1.0
    assert rows['cbn', 'eager']['flop_ratio'] > 1.0  # the ∂var/∂θ products are counted
    # the histories' size: none for BN; the weight-sized gradients, most of it, halved in bfloat16
    assert rows['bn', 'eager']['history_mb'] == 0
    ratio = rows['cbn-bf16-history', 'eager']['history_mb'] / rows['cbn', 'eager']['history_mb']
    assert 0.5 <= ratio < 0.6
    printed = capsys.readouterr().out
    assert '| cbn | eager |' in printed
    # --profile-parts: a row of the step's parts for each CBN variant (the one-call step ran), none
    # for BN
    parts = printed.split("The CBN step's parts")[1]
    assert 'train_step.past_and_record' in parts and 'normalise' in parts
    assert '| cbn | eager |' in parts and '| cbn-bf16-history | eager |' in parts
    assert '| bn | eager |' not in parts
    # cbn-ops: the fused ops one by one, not the one-call step
    table = [line.split('|')[1:-1] for line in parts.splitlines() if line.startswith('|')]
    columns = [c.strip() for c in table[0]]
    ops_row = next([c.strip() for c in r] for r in table if r[0].strip() == 'cbn-ops')
    one_call_row = next([c.strip() for c in r] for r in table if r[0].strip() == 'cbn')
    for name, ran_in_ops in (('train_step.past_and_record', False), ('past_window', True)):
        at = columns.index(name)
        assert (float(ops_row[at]) > 0) == ran_in_ops and (float(one_call_row[at]) > 0) != ran_in_ops


def test_compiled_benchmark_conv_products_variant_takes_the_convolution_for_1x1_convs():
    """``cbn-conv-products`` (the comparison for the 1×1 convs' matrix products) runs its steps
    with every product as the weight-gradient convolution, and the other variants do not."""
    import benchmark_compiled
    from cbn_mmdet.ops import statistics

    threshold = statistics.MATMUL_MAX_POSITIONS
    conv = nn.Conv2d(8, 4, 1)
    norm = CrossIterationBatchNorm2d(4, window=2)
    for variant, matmul in (('cbn', True), ('cbn-conv-products', False)):
        with benchmark_compiled._variant_context(variant), OpNames() as ops:
            for _ in range(3):
                norm(conv(torch.randn(2, 8, 4, 4))).sum().backward()
                torch.optim.SGD(conv.parameters(), lr=0.1).step()
        assert ('aten.addbmm' in ops.names) == matmul, variant
    assert statistics.MATMUL_MAX_POSITIONS == threshold


def test_fixed_cost_benchmark_times_the_parts_of_each_layer():
    """``--time-parts``: every part of CBN is entered (a part never called, e.g. after a rename in the
    layer, would be missing), the parts nest inside the forward, and the wrappers are removed after."""
    from cbn_mmdet.ops.window_norm import WindowBatchNormFunction
    backward = WindowBatchNormFunction.__dict__['backward']
    rows = benchmark_fixed_cost.run(benchmark_fixed_cost.parse_args(
        ['--layers', '2', '--channels', '4', '--size', '4', '--steps', '2', '--warmup', '2',
         '--time-parts']))
    parts = rows['cbn']['part_us']
    assert set(parts) == {label for _, _, label in benchmark_fixed_cost.TIMED_PARTS}
    assert all(us > 0 for us in parts.values())
    forward = parts.pop('forward (all of it)')
    assert parts['past window (compensation)'] < forward and parts['record (incl. statistic '
                                                                     'gradients)'] < forward
    assert 'statistic gradients' not in rows['naive']['part_us']  # Naive CBN records no gradients
    assert set(rows['bn']['part_us']) == {'forward (all of it)'}
    one_call = rows['cbn']['one_call_us']  # (the Python forward's parts: with it off)
    assert set(one_call) == {'forward (all of it)', 'one-call step'}
    assert 0 < one_call['one-call step'] < one_call['forward (all of it)']
    assert WindowBatchNormFunction.__dict__['backward'] is backward


def test_fixed_cost_benchmark_times_a_baseline_checkout_beside_this_one():
    """``--baseline DIR`` loads another checkout's layer beside this one (here: this checkout, so
    the same code: the same operation counts), with its own iteration clock advancing."""
    from conftest import REPO_ROOT
    rows = benchmark_fixed_cost.run(benchmark_fixed_cost.parse_args(
        ['--layers', '2', '--channels', '4', '--size', '4', '--steps', '2', '--warmup', '3',
         '--baseline', REPO_ROOT]))
    assert set(rows) == {'bn', 'naive', 'cbn', 'naive-baseline', 'cbn-baseline'}
    assert rows['cbn-baseline']['ops'] == rows['cbn']['ops']
    assert rows['naive-baseline']['ops'] == rows['naive']['ops']
    baseline = sys.modules['cbn_mmdet_baseline.models.cbn'].CrossIterationBatchNorm2d
    assert baseline is not CrossIterationBatchNorm2d


@pytest.mark.filterwarnings(r"ignore:CBN\(\d+\). var_grad_dtype='bfloat16' on a CPU without:UserWarning")
def test_layer_benchmark_times_bn_and_cbn_and_measures_an_error():
    shape = (2, 4, 6, 6)
    _, bn_history = benchmark_layer.time_steps(nn.BatchNorm2d, shape, 4, 3, 1, repeats=1, warmup=1)
    _, cbn_history = benchmark_layer.time_steps(
        lambda c: CrossIterationBatchNorm2d(c, window=3), shape, 4, 3, 1, repeats=1, warmup=1)
    assert bn_history == 0 and 2.0 <= cbn_history < 3.0  # window - 1 weight copies + statistics
    error = benchmark_layer.correction_error(shape, 4, 3, 1, steps=3, var_grad_dtype='bfloat16')
    assert 0 <= error < 0.05


@pytest.mark.filterwarnings(r"ignore:CBN\(\d+\). var_grad_dtype='bfloat16' on a CPU without:UserWarning")
def test_bf16_product_table(capsys):
    benchmark_layer.bf16_product_table([('tiny', (2, 4, 6, 6), 4, 3, 1)], rounds=1, repeats=1)
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith('| tiny |') and row.count('x |') == 2


def test_sync_cbn_benchmark_counts_the_normalisation_collectives(tmp_path):
    """2 gloo processes: SyncCBN sends one all-gather (current batch and window - 1 past entries:
    (1 + 3)·(2C + 1) values) and one all-reduce (2C) per layer and step; BN and CBN none."""
    out = tmp_path / 'sync.json'
    args = benchmark_sync_cbn.parse_args(['--layers', '2', '--channels', '4', '--size', '4',
                                          '--steps', '1', '--warmup', '1', '--out', str(out)])
    benchmark_sync_cbn.launch(args)
    rows = {r['variant']: r for r in json.loads(out.read_text())['rows']}
    assert rows['bn']['collectives_per_step'] == rows['cbn']['collectives_per_step'] == 0
    assert rows['sync-cbn']['collectives_per_step'] == 2 * 2
    assert rows['sync-cbn']['kib_sent_per_step'] * 1024 == 2 * 4 * ((1 + 3) * (2 * 4 + 1) + 2 * 4)


def test_model_benchmark_gathers_the_compensated_weights(capsys):
    """``--gather-weights``: the R50-FPN 4conv1fc model with CBN in all layers binds every norm of a
    trainable conv (stages 2-4, FPN, head: 54 of 65) and gathers exactly those convs' weights."""
    import benchmark_model
    row = benchmark_model.main(['--gather-weights', '--size', '64', '96', '--images', '1', '--rois',
                                '8', '--repeats', '1', '--warmup', '1'])
    assert (row['cbn_layers'], row['compensated']) == (65, 54)
    # ResNet-50 stages 2-4 (23 232 512), FPN lateral 1x1 + output 3x3 convs (983 040 + 2 359 296),
    # the head's 4 convs 256->256 3x3 (2 359 296), all without bias
    assert row['floats'] == 23_232_512 + 983_040 + 2_359_296 + 2_359_296 and row['gather_ms'] > 0
    assert 'gathering them into one tensor' in capsys.readouterr().out


@pytest.mark.parametrize('size', [6, 40])  # small convs' unfolded products; the large-conv path
def test_flop_counter_counts_the_fused_ops_as_the_python_path(size):
    """The fused CPU ops do their multiply-adds out of torch's formulas: the counter's mapping for
    them gives the count of the Python path's operations (within 1 %: a fused op missing from
    the mapping drops a product of the conv's size)."""
    from flops import counter
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    from cbn_mmdet.ops import fused
    if fused.ops() is None:
        pytest.skip('the fused CPU ops did not build')

    def flops():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, padding=1), CrossIterationBatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=2), CrossIterationBatchNorm2d(8),
            torch.nn.Conv2d(8, 16, 1), CrossIterationBatchNorm2d(16))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(2, 4, size, size)
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        flop_counter = counter()
        with flop_counter:
            model(x).sum().backward()
        return flop_counter.get_total_flops()
    with_ops = flops()
    with fused.disabled():
        python = flops()
    assert with_ops == pytest.approx(python, rel=1e-2)


def test_fixed_cost_benchmark_traces_a_variant_by_source_line(capsys):
    rows = benchmark_fixed_cost.run(benchmark_fixed_cost.parse_args(
        ['--layers', '2', '--channels', '4', '--size', '4', '--steps', '1', '--warmup', '5',
         '--python-path', '--trace-ops', 'cbn-python']))
    trace = rows['cbn-python']['trace']
    # every op of a steady-state step (the window full), per layer
    assert sum(n for n, _, _ in trace) == rows['cbn-python']['ops'] / 2
    lines = {where.split(':')[0] for _, _, where in trace}
    assert {'ops/statistics.py', 'models/window_history.py', 'ops/window_norm.py', '-'} <= lines
    assert any(op == 'aten.batch_norm_update_stats' and where.endswith(' batch_moments')
               for _, op, where in trace)
    assert 'cbn-python: the operations of one training step, per layer' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--trace-ops 'cbn-pyton': not a variant"):
        benchmark_fixed_cost.run(benchmark_fixed_cost.parse_args(
            ['--layers', '1', '--channels', '4', '--size', '4', '--steps', '1', '--warmup', '1',
             '--trace-ops', 'cbn-pyton']))
