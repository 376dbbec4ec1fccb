"""The evidence scripts in tools/analysis (docs/evidence.md): tiny runs, output structure, known answers.

Each script runs once per module in its ``--quick`` mode (seconds) as a subprocess, the way the docs
call it. The oracle of ``statistics_estimation.py`` and the Jacobian ratios of ``gradient_ratios.py``
are also checked in-process on cases with a known answer.
"""
import importlib
import json
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO_ROOT

ANALYSIS = osp.join(REPO_ROOT, 'tools', 'analysis')
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
#: the CBN history tensors compensate_history reads (public properties of the layer)
HISTORY = ('history_mean', 'history_var', 'history_mean_ref', 'history_var_ref', 'history_patch_mean',
           'history_var_grad', 'history_compensable')

sklearn = pytest.importorskip('sklearn', reason='the analysis scripts need scikit-learn (setup_env.sh)')
pytest.importorskip('matplotlib', reason='the analysis scripts need matplotlib (setup_env.sh)')


def script(name):
    """Import ``tools/analysis/<name>.py`` (they import their sibling ``common``)."""
    if ANALYSIS not in sys.path:
        sys.path.insert(0, ANALYSIS)
    return importlib.import_module(name)


def run(name, out, *args):
    cmd = [sys.executable, osp.join(ANALYSIS, f'{name}.py'), '--quick', '--out', str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{cmd} failed:\n{(proc.stdout + proc.stderr)[-6000:]}'
    with open(osp.join(out, f'{name}.json')) as f:
        data = json.load(f)
    with open(osp.join(out, f'{name}.md')) as f:
        md = f.read()
    return proc.stdout, data, md


def assert_png(path):
    with open(path, 'rb') as f:
        assert f.read(8) == PNG_MAGIC, path


# ---------------------------------------------------------------------------- statistics estimation
@pytest.fixture(scope='module')
def estimation(tmp_path_factory):
    out = tmp_path_factory.mktemp('statistics_estimation')
    return out, *run('statistics_estimation', out, '--ks', '2', '4', '--lrs', '0.1')


@pytest.fixture(scope='module')
def estimation_frozen(tmp_path_factory):
    out = tmp_path_factory.mktemp('statistics_estimation_frozen')
    return out, *run('statistics_estimation', out, '--ks', '4', '--lrs', '0.1', '--freeze-convs')


def by_key(records):
    table = {}
    for r in records:
        table[(r['k'], r['iter'], r['layer'], r['method'])] = r
    return table


def test_statistics_estimation_outputs(estimation):
    out, stdout, data, md = estimation
    records = data['records']
    assert {r['method'] for r in records} == {'CBN', 'Naive CBN', 'BN', 'Own-layer exact'}
    assert {r['k'] for r in records} == {2, 4}
    layers = list(dict.fromkeys(r['layer'] for r in records))
    assert len(layers) == 9 and layers[0] == 'stem.1'  # SmallResNet: 9 CBN layers
    iters = {r['iter'] for r in records}
    assert len(iters) >= 2
    # every (k, iteration) has all layers and methods
    assert len(records) == len({(r['k'], r['iter']) for r in records}) * 9 * 4
    assert all(r['e_mu'] >= 0 and r['e_sigma'] >= 0 for r in records)
    assert '| lr | k | e_μ CBN |' in md and 'Per layer, lr=0.1, k=4' in md
    assert '| lr | k | e_μ CBN |' in stdout
    assert_png(osp.join(out, 'statistics_estimation.png'))
    assert_png(osp.join(out, 'statistics_estimation_layers.png'))


def test_first_layer_mean_compensation_is_exact(estimation):
    """The first CBN layer sees fixed images: its μ is linear in θ, so Eq. 7 is exact; Naive is not."""
    _, _, data, _ = estimation
    t = by_key(data['records'])
    for (k, it, layer, method), r in t.items():
        if layer == 'stem.1' and method == 'CBN':
            naive = t[(k, it, layer, 'Naive CBN')]
            assert r['e_mu'] < 1e-5, r
            assert naive['e_mu'] > 100 * r['e_mu'], (r, naive)
            # nothing upstream of the first conv: recomputing it exactly *is* the oracle
            own = t[(k, it, layer, 'Own-layer exact')]
            assert own['e_mu'] < 1e-5 and own['e_sigma'] < 1e-5, own
            assert r['e_sigma'] < naive['e_sigma'], (r, naive)  # Taylor error below staleness


def test_frozen_convs_cbn_equals_naive_and_first_layer_exact(estimation_frozen):
    """Conv weights fixed: CBN uses the window uncompensated (exact for those weights), so CBN = Naive
    = own-layer exact;
    the first layer's oracle (conv of the stored images) is met exactly, while BN's single batch is not."""
    _, _, data, _ = estimation_frozen
    t = by_key(data['records'])
    for (k, it, layer, method), r in t.items():
        if method != 'CBN':
            continue
        for other in ('Naive CBN', 'Own-layer exact'):
            o = t[(k, it, layer, other)]
            assert abs(r['e_mu'] - o['e_mu']) < 1e-5 and abs(r['e_sigma'] - o['e_sigma']) < 1e-5, (r, o)
        if layer == 'stem.1':
            assert r['e_mu'] < 1e-5 and r['e_sigma'] < 1e-5, r
            assert t[(k, it, layer, 'BN')]['e_mu'] > 1e-3


def test_oracle_definition_by_hand():
    """The oracle runs the stored batches through θ_t with each earlier CBN fixed to the statistics it used."""
    se = script('statistics_estimation')
    common = script('common')
    torch.manual_seed(0)
    model = common.SmallResNet(common.norm_factory('CBN', window=3, momentum=1.0)).train()
    batches = [torch.randn(2, 1, 16, 16) for _ in range(3)]
    used = {name: (torch.randn(layer.num_features) * 0.1, torch.rand(layer.num_features) + 0.5)
            for name, layer in common.cbn_layers(model).items()}
    with torch.no_grad():
        model.stem[1].weight.uniform_(0.5, 1.5)
        model.stem[1].bias.uniform_(-0.5, 0.5)
    oracle = se.oracle_statistics(model, batches, used)
    x = torch.cat(batches).double()
    stem_conv, stem_norm = model.stem[0].double(), model.stem[1]
    with torch.no_grad():
        a0 = stem_conv(x)
        mean, var = a0.mean(dim=(0, 2, 3)), a0.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(oracle['stem.1'][0], mean)
        torch.testing.assert_close(oracle['stem.1'][1], var)
        m, v = (u.double() for u in used['stem.1'])
        y = F.relu((a0 - m.view(1, -1, 1, 1)) / (v.view(1, -1, 1, 1) + stem_norm.eps).sqrt()
                   * stem_norm.weight.double().view(1, -1, 1, 1) + stem_norm.bias.double().view(1, -1, 1, 1))
        a1 = model.blocks[0].conv1.double()(y)
        torch.testing.assert_close(oracle['blocks.0.bn1'][0], a1.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(oracle['blocks.0.bn1'][1], a1.var(dim=(0, 2, 3), unbiased=False),
                                   rtol=1e-4, atol=1e-5)


def test_window_statistics_read_what_cbn_used():
    """CBN's μ̄, σ̄² read from the running statistics (momentum 1) equal Eqs. 7-11 recomputed from the
    history; Naive's equal the uncompensated pool."""
    se = script('statistics_estimation')
    common = script('common')
    from cbn_mmdet.ops.statistics import window_moments
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    norm = common.norm_factory('CBN', window=3, momentum=1.0)(4)
    opt = torch.optim.SGD(list(conv.parameters()) + list(norm.parameters()), lr=0.5)
    for _ in range(4):
        # the history before the forward: the forward overwrites its oldest entry
        before = [(e.mean.clone(), e.var.clone()) for e in norm.history.entries()]
        y = conv(torch.randn(2, 3, 5, 5))
        out = norm(y)
        stats = se.window_statistics(norm, y)
        opt.zero_grad()
        (out * torch.randn_like(out)).sum().backward()
        opt.step()
    # last forward's window: 3 iterations, weights changed in between
    cbn_mean, cbn_var, naive_mean, naive_var, batch_mean, batch_var = stats  # history unchanged since
    assert norm.history_length == 2
    torch.testing.assert_close(batch_mean, norm.history.entries()[0].mean.double())
    assert len(before) == 2
    valid = torch.ones(2, dtype=torch.float64)
    exp_mean, exp_var, _ = window_moments(batch_mean, batch_var,
                                          torch.stack([m for m, _ in before]).double(),
                                          torch.stack([v for _, v in before]).double(), valid)
    torch.testing.assert_close(naive_mean, exp_mean)
    torch.testing.assert_close(naive_var, exp_var)
    assert (cbn_mean - naive_mean).abs().max() > 1e-4  # compensation moved the past


def test_window_statistics_cbn_matches_compensation():
    """... and CBN's are Eqs. 7-10 (compensate_history at the current weights) pooled by Eqs. 9-11."""
    se = script('statistics_estimation')
    common = script('common')
    from cbn_mmdet.ops.statistics import compensate_history, window_moments
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    norm = common.norm_factory('CBN', window=3, momentum=1.0)(4)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    for step in range(4):
        x = torch.randn(2, 3, 5, 5)
        h = {name: norm.history.get(name).clone() for name in HISTORY  # before the forward writes
             if norm.history.get(name) is not None}
        slots = norm.history.slots_newest_first()  # the ring as compensate_history takes it
        y = conv(x)
        out = norm(y)
        if step == 3:
            stats = se.window_statistics(norm, y)
            mean_t, var_t = compensate_history(h['history_mean'], h['history_var'],
                                               h['history_mean_ref'], h['history_var_ref'],
                                               h['history_patch_mean'], h['history_var_grad'],
                                               h['history_compensable'], conv.weight.detach(), None,
                                               1)
            assert len(slots) == 2
            exp_mean, exp_var, _ = window_moments(
                stats[4], stats[5], mean_t[slots].double(), var_t[slots].double(),
                torch.ones(2, dtype=torch.float64))
            torch.testing.assert_close(stats[0], exp_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats[1], exp_var, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        (out * torch.randn_like(out)).sum().backward()
        opt.step()


# ---------------------------------------------------------------------------- the demo detector
DETECTOR_LAYER_TYPES = {'FPN lateral': 4, 'FPN output': 4, 'box head conv': 4}


@pytest.fixture(scope='module')
def detector_statistics(tmp_path_factory):
    out = tmp_path_factory.mktemp('detector_statistics')
    return out, *run('detector_statistics', out, '--ks', '2', '--work-dir', str(out / 'work'))


@pytest.fixture(scope='module')
def detector_statistics_lr0(tmp_path_factory):
    out = tmp_path_factory.mktemp('detector_statistics_lr0')
    return out, *run('detector_statistics', out, '--ks', '3', '--lr', '0', '--work-dir', str(out / 'work'))


def test_detector_statistics_pool_is_equal_weight_window():
    """The oracle pools k batches with weight 1/k each: for equal-size batches, the moments of all values."""
    ds = script('detector_statistics')
    from cbn_mmdet.ops.statistics import batch_moments
    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 4, 4) * (i + 1) + i for i in range(4)]
    mean, var = ds.pool([batch_moments(b) for b in batches])
    all_values = torch.cat(batches).double()
    torch.testing.assert_close(mean, all_values.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(var, all_values.var(dim=(0, 2, 3), unbiased=False))
    assert ds.layer_type('neck.lateral_convs.3.bn') == 'FPN lateral'
    assert ds.layer_type('roi_head.bbox_head.shared_convs.0.bn') == 'box head conv'


def test_detector_statistics_outputs(detector_statistics):
    """--quick trains the demo detector (tiny data) with CBN k=2 and measures; the oracle reproduces the
    training forward of the current batch in every CBN layer; the JSON means are the records' means."""
    out, stdout, data, md = detector_statistics
    checks, records = data['checks'], data['records']
    assert len(checks) >= 2
    for c in checks:
        # the oracle's newest batch (current weights, every norm fixed at what it used at t) is the
        # training forward: its statistics equal what each CBN layer recorded (FPN and box head)
        assert c['current_batch_fixed'] < 1e-4 and c['current_batch_batch-BN'] < 1e-4, c
        assert c['used_vs_running'] < 1e-4, c  # window_moments(...) is what CBN normalised with
        assert len(c['rois']) == 2 and min(c['rois']) > 0
    layers = list(dict.fromkeys(r['layer'] for r in records))
    types = [script('detector_statistics').layer_type(name) for name in layers]
    assert {t: types.count(t) for t in types} == DETECTOR_LAYER_TYPES
    assert len(records) == len(checks) * 12 * 4 * 2  # layers x methods x oracles
    assert all(r['e_mu'] >= 0 and r['e_sigma'] >= 0 for r in records)
    # the BN estimate (one batch) is not the window's: a nonzero error somewhere
    assert max(r['e_mu'] for r in records if r['method'] == 'BN') > 1e-3
    summary = data['summary']
    for oracle in ('fixed', 'batch-BN'):
        for method in ('CBN', 'Naive CBN', 'BN', 'Own-layer exact'):
            sel = [r for r in records if r['oracle'] == oracle and r['method'] == method]
            entry = summary['overall'][oracle]['2'][method]
            assert entry['n'] == len(sel) == len(checks) * 12
            assert entry['e_mu'] == pytest.approx(sum(r['e_mu'] for r in sel) / len(sel), rel=1e-12)
            assert entry['e_sigma'] == pytest.approx(sum(r['e_sigma'] for r in sel) / len(sel), rel=1e-12)
            for name in layers:
                one = [r['e_mu'] for r in sel if r['layer'] == name]
                assert summary['per_layer'][oracle]['2'][name][method]['e_mu'] == pytest.approx(
                    sum(one) / len(one), rel=1e-12)
    row = summary['overall']['fixed']['2']
    line = f"| 2 | {len(checks)} | {script('common').fmt(row['CBN']['e_mu'])} |"
    assert line in md and line in stdout
    assert 'Per layer, k = 2' in md and 'By layer type' in md
    assert_png(osp.join(out, 'detector_statistics.png'))


def test_detector_statistics_known_answers_at_lr0(detector_statistics_lr0):
    """Learning rate 0: the weights never change, so CBN = Naive CBN (nothing to compensate), and for the
    FPN's lateral layers (inputs: backbone outputs) the oracle with per-batch backbone BN *is* the
    recorded past: CBN, Naive CBN and own-layer exact meet it to float rounding, BN (one batch) does not."""
    _, _, data, _ = detector_statistics_lr0
    records = data['records']
    assert len(data['checks']) >= 2
    table = {(r['iter'], r['layer'], r['oracle'], r['method']): r for r in records}
    for (it, layer, oracle, method), r in table.items():
        if method == 'CBN':
            naive = table[(it, layer, oracle, 'Naive CBN')]
            assert abs(r['e_mu'] - naive['e_mu']) < 1e-6 and abs(r['e_sigma'] - naive['e_sigma']) < 1e-6
        if oracle == 'batch-BN' and r['layer_type'] == 'FPN lateral':
            if method == 'BN':
                assert r['e_mu'] > 1e-3, r
            else:
                assert r['e_mu'] < 1e-4 and r['e_sigma'] < 1e-4, r


# ---------------------------------------------------------------------------- gradient ratios
@pytest.mark.slow
def test_gradient_ratios_outputs(tmp_path):
    stdout, data, md = run('gradient_ratios', tmp_path)
    archs = [r['arch'] for r in data['records']]
    assert set(archs) == {'resnet18', 'vgg'} and len(archs) == 4  # 2 measurement points each
    for r in data['records']:
        assert r['arch'] != 'resnet18' or len(r['per_layer']) == 19  # 20 CBN layers, the first has no r
        assert r['arch'] != 'vgg' or len(r['per_layer']) == 7       # 8 layers
        for key in ('mu_l-1', 'mu_l-2', 'nu_l-1', 'nu_l-2'):
            assert 0 <= r['mean'][key] < float('inf')
    assert 'ResNet (paper)' in md and '0.12' in md and '0.39' in md
    assert 'μ: r=l−1' in stdout
    assert_png(osp.join(tmp_path, 'gradient_ratios.png'))


def test_gradient_ratio_known_answers():
    """1×1 conv → BN → 1×1 conv → BN (no activation): the second layer's mean is θ²·E[γx̂ + β] = θ²·β
    whatever θ¹ is, so ‖∂μ²/∂θ¹‖ = 0; its second moment does depend on θ¹ (channel correlations)."""
    gr = script('gradient_ratios')
    common = script('common')
    torch.manual_seed(0)
    norm = common.norm_factory('CBN', window=2)
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), norm(4), nn.Conv2d(4, 5, 1, bias=False), norm(5))
    with torch.no_grad():
        net[1].bias.fill_(0.5)  # μ² = θ²·β: non-zero, and ∂μ²/∂θ² = β ≠ 0
    result = gr.measure(net, torch.randn(6, 3, 4, 4))
    assert list(result) == ['3']  # layer '1' has no conv before its own
    assert result['3']['mu_l-1'] < 1e-6
    assert result['3']['nu_l-1'] > 1e-3
    assert 'mu_l-2' not in result['3']
    # and the norms themselves: ‖∂μ/∂θ^l‖_F of a 1×1 conv is ‖mean input‖ per output row
    x = torch.randn(6, 3, 4, 4)
    w = torch.randn(4, 3, 1, 1, requires_grad=True)
    mu = F.conv2d(x, w).mean(dim=(0, 2, 3))
    expected = (x.mean(dim=(0, 2, 3)).norm() * 4 ** 0.5).item()
    assert abs(gr.jacobian_norms(mu, [w])[0] - expected) < 1e-5


# ---------------------------------------------------------------------------- batch sizes
@pytest.mark.slow
def test_batch_size_table_outputs(tmp_path):
    stdout, data, md = run('batch_size_table', tmp_path)
    runs = data['runs']
    methods = ['BN', 'GN', 'BRN', 'NaiveCBN', 'CBN']
    assert sorted({r['method'] for r in runs}) == sorted(methods)
    assert {r['batch_size'] for r in runs} == {16, 8}
    assert len(runs) == len(methods) * 2 * 2  # --quick: bs 16, 8; seeds 0, 1
    assert all(0.0 <= r['test_acc'] <= 1.0 for r in runs)
    # bs 16 → k = min(ceil(16/16), 8) = 1: CBN and Naive CBN are BN exactly
    for seed in (0, 1):
        bn = next(r for r in runs if r['method'] == 'BN' and r['batch_size'] == 16 and r['seed'] == seed)
        for m in ('CBN', 'NaiveCBN'):
            r = next(r for r in runs if r['method'] == m and r['batch_size'] == 16 and r['seed'] == seed)
            assert r['window'] == 1 and r['test_acc'] == bn['test_acc'] and r['train_loss'] == bn['train_loss']
    assert {r['window'] for r in runs if r['method'] == 'CBN' and r['batch_size'] == 8} == {2}
    assert '| method | bs=16 | bs=8 |' in md and '| CBN |' in md and '±' in md
    assert '| method | bs=16 | bs=8 |' in stdout
    assert_png(osp.join(tmp_path, 'batch_size_table.png'))


@pytest.mark.parametrize('bs,k', [(16, 1), (8, 2), (4, 4), (2, 8), (1, 8), (3, 6)])
def test_window_rule(bs, k):
    assert script('batch_size_table').window_for(bs) == k


def test_one_value_per_channel_is_reported_not_raised():
    """cnn-1x1 at batch size 1: BN and CBN refuse one value per channel; the run is marked, GN trains."""
    import argparse
    bst = script('batch_size_table')
    common = script('common')
    data = common.load_digits_tensors(size=16)
    args = argparse.Namespace(model='cnn-1x1', epochs=1, burn_in=0, lr=0.1, weight_decay=1e-4)
    for method in ('BN', 'CBN'):
        r = bst.train_one(method, 1, 0, args, data, max_iters=3)
        assert r['diverged'] and 'more than 1 value per channel' in r['failure'], r
    r = bst.train_one('GN', 1, 0, args, data, max_iters=3)
    assert r['failure'] is None and r['iters'] == 3 and 0 <= r['test_acc'] <= 1


# ---------------------------------------------------------------------------- detection analog
def analog_settings(**over):
    settings = dict(batch_size=2, iters=40, burn_in=10, warmup=5, lr=0.02, window=4, gn_groups=16,
                    data_root='data/demo_shapes', generation=script('common').DEMO_DATA, small_rois=False)
    settings.update(over)
    return settings


@pytest.mark.parametrize('variant', ['BN', 'GN-heads', 'NaiveCBN-heads', 'CBN-heads', 'GN-all',
                                     'NaiveCBN-all', 'CBN-all', 'BRN-all', 'NaiveCBN-all-k8',
                                     'CBN-all-k8', 'BN-x4', 'BN-x8'])
def test_detection_analog_variant_configs(variant, tmp_path):
    """Each variant's config puts its normalizer where it says (counted in the built detector), has the
    burn-in hook exactly when it has a CBN layer, and the short schedule / batch / seed asked for."""
    da = script('detection_analog')
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope
    # (in mmdet's scope whatever an earlier test left current, e.g. mmpretrain's)
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmdet'):
        cfg = da.build_config(variant, 3, analog_settings(batch_size=1), str(tmp_path))
        census = da.norm_census(MODELS.build(cfg.model))
    heads, backbone = da.VARIANTS[variant]
    # slim ResNet-18: stem + 8 blocks × 2 + 3 downsamples = 20 norms; FPN: 4 lateral + 4 output convs;
    # Shared4Conv1FCBBoxHead: 4 convs; the RPN head has none
    assert census == {'backbone': {backbone: 20}, 'neck': {heads: 8}, 'rpn_head': {}, 'roi_head': {heads: 4}}
    hooks = [h['type'] for h in cfg.custom_hooks]
    assert ('CBNBurnInHook' in hooks) == ('CBN' in heads or 'CBN' in backbone) == da.uses_cbn(variant)
    if 'CBNBurnInHook' in hooks:
        burn = next(h for h in cfg.custom_hooks if h['type'] == 'CBNBurnInHook')
        assert burn['burn_in'] == 10 and burn['by_epoch'] is False
    assert 'RNGStateHook' in hooks
    if heads == 'GN':
        assert cfg.model.neck.norm_cfg == dict(type='GN', num_groups=16, requires_grad=True)
    if 'CBN' in heads:
        window = 8 if variant.endswith('-k8') else 4
        assert cfg.model.roi_head.bbox_head.norm_cfg['window'] == window
        assert backbone == 'BN' or cfg.model.backbone.norm_cfg['window'] == window
        assert cfg.model.neck.norm_cfg.get('compensate', True) == (heads == 'CBN')
    if heads == 'BRN':  # BN through the burn-in, full limits by half the run
        assert cfg.model.backbone.norm_cfg == dict(type='BRN', warmup_iters=10, rmax_iters=20,
                                                   dmax_iters=20, requires_grad=True)
    images = {'BN-x4': 4, 'BN-x8': 8}.get(variant, 1)  # the upper bound: k times the images
    assert cfg.train_cfg.max_iters == 40 and cfg.train_cfg.val_interval == 40
    assert cfg.param_scheduler[0]['end'] == 5 and cfg.param_scheduler[1]['milestones'] == [30, 36]
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.02 * images ** 0.5)
    assert cfg.train_dataloader.batch_size == images and cfg.randomness.seed == 3
    assert cfg.default_hooks.checkpoint is None and cfg.work_dir == str(tmp_path)


def test_detection_analog_summary_by_hand():
    """Mean and sample std over the seeds that have a result (one seed: no std); failed runs are
    listed, missing seeds too."""
    da = script('detection_analog')
    runs = [dict(variant='BN', seed=s, failure=None, bbox_mAP=ap, bbox_mAP_50=ap + 0.1, bbox_mAP_75=ap / 2,
                 wall_seconds=10.0 * (s + 1), iter_seconds=0.1, final_loss=1.0) for s, ap in ((0, 0.2), (1, 0.4))]
    runs.append(dict(variant='GN-heads', seed=0, failure='ValueError: x', bbox_mAP=None, bbox_mAP_50=None,
                     bbox_mAP_75=None))
    summary = da.summarize(['BN', 'GN-heads'], [0, 1, 2], runs)
    bn = summary['BN']
    assert bn['seeds'] == [0, 1] and bn['missing'] == [2] and bn['failures'] == {}
    assert bn['bbox_mAP']['values'] == [0.2, 0.4]
    assert bn['bbox_mAP']['mean'] == pytest.approx(0.3) and bn['bbox_mAP']['std'] == pytest.approx(0.02 ** 0.5)
    assert bn['bbox_mAP_50']['mean'] == pytest.approx(0.4) and bn['seconds_per_run'] == pytest.approx(15.0)
    gn = summary['GN-heads']
    assert gn['failures'] == {'0': 'ValueError: x'} and gn['missing'] == [1, 2]
    assert gn['bbox_mAP']['values'] == [None] and gn['bbox_mAP']['mean'] is None
    assert da.cell(bn['bbox_mAP']) == '30.0 ± 14.1' and da.cell(gn['bbox_mAP']) == '–'
    one = da.summarize(['BN'], [0], runs[:1])['BN']['bbox_mAP']
    assert one == dict(values=[0.2], mean=0.2, std=None) and da.cell(one) == '20.0'


def test_mean_std_convention():
    """Every table: mean ± sample std (n − 1) of the finite values; one run alone, none '–'."""
    common = script('common')
    mean, std = common.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(((16 + 1 + 25) / 9 / 2) ** 0.5)
    assert common.mean_std([0.5, float('nan'), None]) == (0.5, None)
    assert common.mean_std([]) == (None, None)
    assert common.format_mean_std(*common.mean_std([0.1, 0.3]), scale=100) == '20.0 ± 14.1'
    assert common.format_mean_std(0.25, None, digits=2) == '0.25'
    assert common.format_mean_std(None, None) == '–'


@pytest.mark.slow
def test_detection_analog_quick(tmp_path):
    """--quick trains BN and CBN-heads for 20 iterations on tiny data (two subprocesses) and evaluates;
    the table and JSON agree with the per-run result files; a second call reruns nothing, and a call
    with other settings reruns only the runs it asks for."""
    out, work = tmp_path / 'out', tmp_path / 'work'
    stdout, data, md = run('detection_analog', out, '--work-dir', str(work))
    da = script('detection_analog')
    metrics = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')
    assert set(data['summary']) == {'BN', 'CBN-heads'} and len(data['runs']) == 2
    assert '2 run(s) to do, 0 done before' in stdout
    for variant in ('BN', 'CBN-heads'):
        path = work / 'bs2' / variant / 'seed0' / 'result.json'
        with open(path) as f:
            result = json.load(f)
        assert result['failure'] is None and result['loss_finite'], result
        assert result['settings'] == data['settings'] and result['settings']['iters'] == 20
        for m in metrics:
            assert 0.0 <= result[m] <= 1.0, result
            entry = data['summary'][variant][m]
            assert entry['values'] == [result[m]] and entry['mean'] == result[m] and entry['std'] is None
        heads, backbone = da.VARIANTS[variant]
        assert result['norms'] == {'backbone': {'BN': 20}, 'neck': {heads: 8}, 'rpn_head': {},
                                   'roi_head': {heads: 4}}
        assert result['burn_in_hook'] == (variant == 'CBN-heads')
        k = '4' if da.uses_cbn(variant) else '–'  # window k, then images per iteration
        row = (f"| {variant} | {da.LABELS[heads]} | BN | {k} | 2 | " +
               ' | '.join(da.cell(data['summary'][variant][m]) for m in metrics) + ' | 1/1 |')
        assert row in md and row in stdout, (row, md)
        assert osp.isfile(work / 'bs2' / variant / 'seed0' / 'config.py')
    with open(work / 'bs2' / 'CBN-heads' / 'seed0' / 'stdout.log') as f:
        log = f.read()
    assert 'CBNBurnInHook: 12 CBN layers now use CBN with window 4 at iteration 5' in log
    assert_png(osp.join(out, 'detection_analog.png'))

    # resume: nothing left to do, same numbers
    stdout2, data2, _ = run('detection_analog', out, '--work-dir', str(work))
    assert '0 run(s) to do, 2 done before' in stdout2
    assert data2['summary'] == data['summary']
    # other settings: only the asked-for run is redone, the other result stays
    stdout3, data3, _ = run('detection_analog', out, '--work-dir', str(work), '--variants', 'BN',
                            '--iters', '10')
    assert '1 run(s) to do, 0 done before' in stdout3 and data3['runs'][0]['settings']['iters'] == 10
    with open(work / 'bs2' / 'CBN-heads' / 'seed0' / 'result.json') as f:
        assert json.load(f)['settings']['iters'] == 20
