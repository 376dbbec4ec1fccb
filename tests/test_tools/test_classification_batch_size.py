"""tools/analysis/classification_batch_size.py (docs/evidence.md, Figure 1 at CPU scale): the run
configs it builds, and its --quick mode through mmpretrain's runner."""
import importlib
import json
import os.path as osp
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ANALYSIS = osp.join(REPO_ROOT, 'tools', 'analysis')
pytest.importorskip('mmpretrain', reason='the study trains through mmpretrain (setup_env.sh)')
pytest.importorskip('matplotlib', reason='the analysis scripts need matplotlib (setup_env.sh)')


def study():
    if ANALYSIS not in sys.path:
        sys.path.insert(0, ANALYSIS)
    return importlib.import_module('classification_batch_size')


@pytest.mark.parametrize('n,k', [(1, 16), (2, 8), (3, 6), (4, 4), (8, 2), (16, 1), (32, 1)])
def test_window_rule(n, k):
    assert study().window(n) == k   # N·k ≥ 16, the smallest such k


@pytest.mark.parametrize('norm', ['BN', 'CBN', 'CBN-naive', 'NaiveCBN', 'GN'])
def test_run_config(norm, tmp_path):
    mod = study()
    settings = dict(images=640, lr=0.05, gn_groups=8, data_root=str(tmp_path / 'data'),
                    generation=dict(mod.QUICK_DATA))
    cfg = mod.build_config(norm, 4, 3, settings, str(tmp_path / 'run'))
    assert cfg.model.backbone.norm_cfg == mod.norm_cfg(norm, 4, 8)
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.train_cfg.max_iters == cfg.train_cfg.val_interval == 160   # 640 images / 4
    assert cfg.optim_wrapper.optimizer.lr == pytest.approx(0.05 * 4 / 16)
    assert cfg.randomness.seed == 3
    burn_in = [h for h in cfg.custom_hooks if h['type'] == 'CBNBurnInHook']
    assert burn_in == ([dict(type='CBNBurnInHook', burn_in=40, by_epoch=False)]
                       if 'CBN' in norm else [])
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = cfg[name].dataset
        assert dataset.data_root == str(tmp_path / 'data') + '/'
        assert dataset.generate == mod.QUICK_DATA
    crop = next(s for s in cfg.train_dataloader.dataset.pipeline if s['type'] == 'RandomResizedCrop')
    assert crop['scale'] == mod.QUICK_DATA['image_size']


def test_window_and_burn_in_settings(tmp_path):
    """--window fixes CBN's k at every N and --burn-in sets the burn-in's share of the run; Naive CBN
    is CBN with compensate=False; BN is untouched."""
    mod = study()
    settings = dict(images=640, lr=0.05, gn_groups=8, data_root=str(tmp_path / 'data'),
                    generation=dict(mod.QUICK_DATA), window=3, burn_in=0.5)
    for n in (2, 16):
        cfg = mod.build_config('NaiveCBN', n, 0, settings, str(tmp_path / 'run'))
        assert cfg.model.backbone.norm_cfg == dict(type='CBN', window=3, compensate=False,
                                                   requires_grad=True)
        burn_in = [h for h in cfg.custom_hooks if h['type'] == 'CBNBurnInHook']
        assert burn_in == [dict(type='CBNBurnInHook', burn_in=640 // n // 2, by_epoch=False)]
    cfg = mod.build_config('BN', 2, 0, settings, str(tmp_path / 'run'))
    assert cfg.model.backbone.norm_cfg == dict(type='BN', requires_grad=True)
    assert not [h for h in cfg.custom_hooks if h['type'] == 'CBNBurnInHook']


def test_loss_by_tenth():
    mod = study()
    assert mod.loss_by_tenth(list(range(9))) is None
    assert mod.loss_by_tenth([float(i) for i in range(10)]) == [float(i) for i in range(10)]
    curve = mod.loss_by_tenth([float(i // 3) for i in range(32)])   # 32 values: tenths of 3 or 4
    assert len(curve) == 10 and curve[0] == 0.0 and curve[-1] == 9.5   # values 28..31 // 3


def test_densenet_config_builds_with_cbn_where_the_tool_says(tmp_path):
    """--backbone densenet: mmpretrain's DenseNet with the study's arch, the head sized to its
    output, CBN with fallback='naive' in every norm layer; one training step passes."""
    import torch
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS

    import cbn_mmdet  # noqa: F401
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    mod = study()
    settings = dict(images=64, lr=0.05, gn_groups=8, data_root=str(tmp_path / 'data'),
                    generation=dict(mod.QUICK_DATA), backbone='densenet')
    cfg = mod.build_config('CBN-naive', 2, 0, settings, str(tmp_path / 'run'))
    assert cfg.model.backbone.type == 'DenseNet'
    init_default_scope('mmpretrain')
    model = MODELS.build(cfg.model)
    norms = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    # stem + 2 per dense layer + 3 transitions + the final norm
    assert len(norms) == 1 + 2 * sum(mod.DENSENET['depths']) + 3 + 1
    assert all(m.fallback == 'naive' and m.window == 8 for m in norms)
    from cbn_mmdet.models.notices import CBNWarning
    x = torch.randn(2, 3, 32, 32)
    # the norms over a concatenation say once which fallback they take
    with pytest.warns(CBNWarning, match=r"CatBackward0.*fallback='naive'"):
        feats = model.extract_feat(x)
    assert feats[-1].shape == (2, mod.densenet_channels(mod.DENSENET))


def test_quick(tmp_path):
    """--quick: BN and CBN at 2 and 4 images per iteration, one seed, each a subprocess through
    mmengine's Runner; every run has a top-1 and the outputs are written."""
    cmd = [sys.executable, osp.join(ANALYSIS, 'classification_batch_size.py'), '--quick',
           '--work-dir', str(tmp_path / 'work'), '--out', str(tmp_path / 'out')]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(tmp_path / 'out' / 'classification_batch_size.json') as f:
        data = json.load(f)
    runs = data['runs']
    assert sorted((r['norm'], r['images_per_iter']) for r in runs) == \
        [('BN', 2), ('BN', 4), ('CBN', 2), ('CBN', 4)]
    for r in runs:
        assert r['failure'] is None and 0 <= r['top1'] <= 100
        assert r['iters'] == 64 // r['images_per_iter']
        assert r['window'] == (study().window(r['images_per_iter']) if r['norm'] == 'CBN' else None)
        assert len(r['loss_by_tenth']) == 10 and r['loss_by_tenth'][0] > 0
    md = (tmp_path / 'out' / 'classification_batch_size.md').read_text()
    assert 'Top-1 (%) on the val split, mean ± std over seeds [0]:' in md
    assert (tmp_path / 'out' / 'classification_batch_size.png').read_bytes()[:4] == b'\x89PNG'
    # finished runs are kept: a second call trains nothing
    again = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and '0 run(s) to do, 4 done before' in again.stdout


def test_jobs_do_not_change_the_runs(tmp_path):
    """--jobs 2 runs two subprocesses at a time; each run keeps its seed, settings and one thread,
    so every run's numbers equal those of --jobs 1, and the report says how the runs were made."""
    def study_runs(jobs):
        out = tmp_path / f'jobs{jobs}'
        cmd = [sys.executable, osp.join(ANALYSIS, 'classification_batch_size.py'), '--quick',
               '--norms', 'CBN', '--images', '16', '--jobs', str(jobs), '--work-dir',
               str(out / 'work'), '--data-root', str(tmp_path / 'data'), '--out', str(out)]
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        with open(out / 'classification_batch_size.json') as f:
            data = json.load(f)
        assert data['jobs'] == jobs and all(r['jobs'] == jobs for r in data['runs'])
        md = (out / 'classification_batch_size.md').read_text()
        assert ('one at a time' if jobs == 1 else '2 at a time (--jobs 2)') in md
        keys = ('iters', 'window', 'top1', 'final_loss', 'failure')
        return {(r['norm'], r['images_per_iter'], r['seed']): {k: r[k] for k in keys}
                for r in data['runs']}

    sequential, parallel = study_runs(1), study_runs(2)
    assert sorted(parallel) == [('CBN', 2, 0), ('CBN', 4, 0)]
    assert parallel == sequential   # the same numbers, bit for bit

    # --collect trains nothing: the finished runs are reported, a seed not run is missing
    out = tmp_path / 'jobs2'
    proc = subprocess.run(
        [sys.executable, osp.join(ANALYSIS, 'classification_batch_size.py'), '--quick', '--norms',
         'CBN', '--images', '16', '--seeds', '0', '1', '--collect', '--work-dir', str(out / 'work'),
         '--data-root', str(tmp_path / 'data'), '--out', str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-6000:]
    assert not (out / 'work' / 'n2' / 'CBN' / 'seed1').exists()
    md = (out / 'classification_batch_size.md').read_text()
    assert 'Missing (no result; rerun the command to continue): CBN N=2 seed 1, CBN N=4 seed 1' in md
    assert 'this invocation ran 0 of them' in md and '2 were done by earlier invocations (--jobs 2)' in md


@pytest.mark.parametrize('option,message', [
    (['--jobs', '0'], '--jobs must be at least 1 (got 0)'),
    (['--window', '0'], '--window must be at least 1 (got 0)'),
    (['--burn-in', '1'], '--burn-in must be a fraction of the run in [0, 1) (got 1.0)')])
def test_bad_settings_are_refused(option, message):
    proc = subprocess.run([sys.executable, osp.join(ANALYSIS, 'classification_batch_size.py')]
                          + option, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr
