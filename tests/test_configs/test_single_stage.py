"""CBN in single-stage shared heads: configs/cbn_single_stage (RetinaNet / FCOS R50, COCO) and their
demo-scale variants (configs/demo/retinanet_*, fcos_*).

The head's stacked convs run once per FPN level, so each of their norm layers is called ``num_outs``
(5) times per forward: the ``cbn-percall`` configs give CBN ``per_call=num_outs`` (one history per
level), the plain CBN ones pool the calls (``per_call=0``), the ``gn`` ones are the baselines and the
demo ``bn`` ones the controls. Checked here: what each config's name promises, in the config and in the built model; that a shared head's
CBN is called once per level and keeps 5 histories (or 1 pooled) after training steps; and (``slow``)
that each demo variant trains 2 iterations through tools/train.py and evaluates on demo data.
"""
import functools
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT as REPO  # noqa: E402
from collect_table import read_final_metrics  # noqa: E402
from tiny_runs import tiny_overrides  # noqa: E402

COCO_DIR = osp.join('configs', 'cbn_single_stage')
COCO_CONFIGS = sorted(osp.join(COCO_DIR, f) for f in os.listdir(osp.join(REPO, COCO_DIR))
                      if f.endswith('.py'))
DEMO_CONFIGS = sorted(osp.join('configs', 'demo', f) for f in os.listdir(osp.join(REPO, 'configs', 'demo'))
                      if f.startswith(('retinanet_', 'fcos_')))
CONFIGS = COCO_CONFIGS + DEMO_CONFIGS
NAME = re.compile(r'(retinanet|fcos)_r(50|50-caffe|18)_fpn_(?:(gn|bn|cbn|cbn-percall)-head_)?'
                  r'(4xb4-1x_coco|demo-shapes)')


def _expect(path):
    """What a config's name promises: (detector type, head norm, demo?). The demo bases, named
    without a norm, are CBN pooled (as faster-rcnn_r18_fpn_demo-shapes.py is CBN)."""
    m = NAME.fullmatch(osp.basename(path)[:-3])
    assert m, path
    arch, _, norm, setting = m.groups()
    return dict(retinanet='RetinaNet', fcos='FCOS')[arch], norm or 'cbn', setting == 'demo-shapes'


@functools.lru_cache(maxsize=None)
def _load(path):
    import cbn_mmdet  # noqa: F401
    from mmengine.config import Config
    return Config.fromfile(osp.join(REPO, path))


def _build(path):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return MODELS.build(_load(path).model)


def test_the_configs_are_found():
    names = {osp.basename(p)[:-3] for p in CONFIGS}
    assert names == {
        'retinanet_r50_fpn_gn-head_4xb4-1x_coco', 'retinanet_r50_fpn_cbn-head_4xb4-1x_coco',
        'retinanet_r50_fpn_cbn-percall-head_4xb4-1x_coco',
        'fcos_r50-caffe_fpn_cbn-head_4xb4-1x_coco', 'fcos_r50-caffe_fpn_cbn-percall-head_4xb4-1x_coco',
        'retinanet_r18_fpn_demo-shapes', 'retinanet_r18_fpn_cbn-percall-head_demo-shapes',
        'retinanet_r18_fpn_gn-head_demo-shapes', 'fcos_r18_fpn_demo-shapes',
        'fcos_r18_fpn_cbn-percall-head_demo-shapes', 'fcos_r18_fpn_gn-head_demo-shapes',
        'retinanet_r18_fpn_bn-head_demo-shapes', 'fcos_r18_fpn_bn-head_demo-shapes'}


def test_folder_readme_and_metafile_list_every_config():
    import yaml
    names = {osp.basename(p)[:-3] for p in COCO_CONFIGS}
    meta = yaml.safe_load(open(osp.join(REPO, COCO_DIR, 'metafile.yml')))
    assert {m['Name'] for m in meta['Models']} == names
    for model in meta['Models']:
        assert model['Config'] == f"{COCO_DIR}/{model['Name']}.py"
        assert model['Metadata'].get('Per Call') == {'cbn': 0, 'cbn-percall': 5}.get(
            _expect(model['Config'])[1])
    readme = open(osp.join(REPO, COCO_DIR, 'README.md')).read()
    assert set(re.findall(r'\[([a-z0-9_.-]+_coco)\]\(\./\1\.py\)', readme)) == names


@pytest.mark.parametrize('path', CONFIGS)
def test_config_settings(path):
    """Plugin imports, head norm_cfg, burn-in hook, data layout, without building the model."""
    cfg = _load(path)
    arch, norm, demo = _expect(path)
    assert cfg.model.type == arch
    plugins = ['cbn_mmdet', 'cbn_mmdet_demo'] if demo else ['cbn_mmdet']
    assert cfg.custom_imports == dict(imports=plugins, allow_failed_imports=False)
    head, neck = cfg.model.bbox_head, cfg.model.neck
    # one call of the shared head per FPN output, one FPN output per head stride
    strides = head.anchor_generator.strides if arch == 'RetinaNet' else head.strides
    assert neck.num_outs == len(strides) == 5
    assert 'norm_cfg' not in neck  # mmdet's RetinaNet/FCOS FPN: no normalizer
    expected = dict(gn=dict(type='GN', num_groups=32, requires_grad=True),
                    bn=dict(type='BN', requires_grad=True),
                    cbn=dict(type='CBN', window=4),
                    **{'cbn-percall': dict(type='CBN', window=4, per_call=neck.num_outs)})[norm]
    got = dict(head.norm_cfg)
    if demo:  # the demo configs name their head norm once, in head_norm_cfg
        assert cfg.head_norm_cfg == head.norm_cfg
        if norm not in ('gn', 'bn'):
            assert got.pop('requires_grad') is True
    assert got == expected, f'{path}: head norm {head.norm_cfg}'
    hooks = [h for h in cfg.get('custom_hooks', []) if h.type == 'CBNBurnInHook']
    if norm in ('gn', 'bn'):
        assert hooks == []
    elif demo:  # a quarter of the iterations, like the Faster R-CNN demo
        assert [dict(h) for h in hooks] == [dict(type='CBNBurnInHook', by_epoch=False,
                                                 burn_in=cfg.train_cfg.max_iters // 4)]
    else:  # as configs/cbn_paper: 3 epochs with k=1, the window from norm_cfg
        assert [dict(h) for h in hooks] == [dict(type='CBNBurnInHook', burn_in=3, by_epoch=True)]
    if demo:
        assert cfg.model.backbone.init_cfg is None and cfg.model.backbone.depth == 18
        assert cfg.train_dataloader.dataset.type == 'DemoShapesDataset'
    else:  # 4 GPUs x 4 images (k = 4 = min(ceil(16 / 4), 8)), mmdet's 1x schedule and lr
        assert cfg.train_dataloader.batch_size == 4
        assert cfg.train_cfg.max_epochs == 12
        assert cfg.optim_wrapper.optimizer.lr == 0.01
        assert cfg.model.backbone.init_cfg.type == 'Pretrained'
        assert cfg.model.backbone.norm_eval and cfg.model.backbone.frozen_stages == 1
        assert not cfg.get('sync_bn')


def _head_norms(model):
    return [conv.norm for conv in list(model.bbox_head.cls_convs) + list(model.bbox_head.reg_convs)]


@pytest.mark.parametrize('path', CONFIGS)
def test_model_has_the_norm_in_the_head_convs(path):
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    _, norm, _ = _expect(path)
    model = _build(path)
    norms = _head_norms(model)
    assert len(norms) == 2 * model.bbox_head.stacked_convs == 8
    all_cbn = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    if norm == 'gn':
        assert all(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 32 for m in norms)
    if norm == 'bn':
        assert all(type(m) is torch.nn.BatchNorm2d for m in norms)
    if norm in ('gn', 'bn'):
        assert all_cbn == []
        return
    assert all(isinstance(m, CrossIterationBatchNorm2d) for m in norms)
    assert {id(m) for m in all_cbn} == {id(m) for m in norms}  # CBN in the head convs only
    per_call = 5 if norm == 'cbn-percall' else 0
    for m in norms:
        assert (m.window, m.per_call, m.compensate) == (4, per_call, True)
        assert len(m.call_histories.histories) == max(per_call, 1)


LEVEL_SIZES = (16, 8, 4, 2, 1)  # P3-P7 of a 128 px image


@pytest.mark.parametrize('path', [p for p in CONFIGS if _expect(p)[1] not in ('gn', 'bn')])
def test_shared_head_keeps_one_history_per_level_or_pools(path):
    """Three SGD steps of the head on 5 levels of features: each CBN runs once per level, and keeps
    per level (``per_call=5``) or pooled (``per_call=0``) what it saw."""
    torch.manual_seed(0)
    _, norm, _ = _expect(path)
    model = _build(path)
    head = model.bbox_head.train()
    norms = _head_norms(model)
    for m in norms:
        m.active_window = m.window  # what CBNBurnInHook does after the burn-in
    calls = []
    norms[0].register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[-1]))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01)  # its step advances CBN's iteration
    batch = 2
    for _ in range(3):
        feats = [torch.randn(batch, head.in_channels, s, s) * (1 + level)
                 for level, s in enumerate(LEVEL_SIZES)]
        loss = sum((t ** 2).mean() for outputs in head(feats) for t in outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert calls == list(LEVEL_SIZES) * 3  # called once per level, in level order
    values = [batch * s * s for s in LEVEL_SIZES]
    assert [m.last_bind_status for m in norms] == ['conv'] * 8  # compensated: bound to its conv
    for m in norms:
        histories = list(m.call_histories)
        if norm == 'cbn-percall':
            # one history per level, each with its 3 iterations of that level's values only
            assert len(histories) == 5
            for h, n in zip(histories, values):
                assert [float(e.count) for e in h.entries()] == [n] * 3
            means = torch.stack([h.entries()[0].mean for h in histories])
            assert not torch.allclose(means[0], means[4])  # levels differ: they are kept apart
        else:
            assert len(histories) == 1
            assert [float(e.count) for e in histories[0].entries()] == [sum(values)] * 3


@pytest.mark.slow
@pytest.mark.parametrize('path', DEMO_CONFIGS)
def test_demo_variant_trains_and_evaluates(path, tiny_demo_data, tmp_path):
    """tools/train.py: 2 iterations on the tiny demo data with CBN on from the first iteration
    (burn-in 0), then COCO evaluation; the head's CBN state as trained (per level or pooled)."""
    _, norm, _ = _expect(path)
    config = tmp_path / 'single_stage_tiny.py'
    hooks = "dict(type='RNGStateHook'), dict(type='DumpCBNStateHook')"
    if norm not in ('gn', 'bn'):
        hooks = "dict(type='CBNBurnInHook', burn_in=0, by_epoch=False), " + hooks
    config.write_text(f'''
_base_ = [{osp.join(REPO, path)!r}]
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo', 'dump_cbn_state_hook'],
                      allow_failed_imports=False)
custom_hooks = [{hooks}]
# untrained focal-loss heads score below mmdet's 0.05: keep every box, so that COCO evaluation runs
model = dict(test_cfg=dict(score_thr=0.0))
''')
    work_dir = tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1',
               PYTHONPATH=os.pathsep.join([REPO, osp.join(REPO, 'tests', 'helpers')]))
    proc = subprocess.run([sys.executable, 'tools/train.py', str(config), '--work-dir', str(work_dir),
                           '--cfg-options', *tiny_overrides(tiny_demo_data, 2, config=osp.join(REPO, path))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert re.search(r'Iter\(train\) \[2/2\]', log), log[-3000:]
    metrics = read_final_metrics(str(work_dir))
    assert metrics is not None and metrics['coco/bbox_mAP'] >= 0, log[-3000:]
    state = torch.load(work_dir / 'cbn_state_rank0.pt', weights_only=True)
    if norm in ('gn', 'bn'):
        assert state == {}
        return
    assert 'CBNBurnInHook: 8 CBN layers now use CBN with window 4' in log, log[-3000:]
    assert sorted(state) == sorted(f'bbox_head.{branch}_convs.{i}.bn' for branch in ('cls', 'reg')
                                   for i in range(4))
    # the tiny data's 64 px images are resized to the config's 128 px: P3-P7 are 16x16 ... 1x1,
    # 2 images per batch; both iterations recorded
    values = [2 * s * s for s in LEVEL_SIZES]
    for name, layer in state.items():
        def newest_count(prefix):
            index = layer[prefix + 'history_index']
            assert int(index[1]) == 2, f'{name}: {prefix or "call0_"} holds {int(index[1])} entries'
            return float(layer[prefix + 'history_count'][int(index[0])])

        if norm == 'cbn-percall':
            assert [newest_count('' if i == 0 else f'call{i}_') for i in range(5)] == values, name
        else:
            assert not any(key.startswith('call') for key in layer), name
            assert newest_count('') == sum(values), name


@pytest.mark.slow
@pytest.mark.parametrize('path', [p for p in COCO_CONFIGS if 'percall' in p])
def test_coco_config_smoke_trains_and_evaluates(path, tiny_demo_data, tmp_path):
    """tools/smoke_config.py makes a COCO single-stage config's smoke version (the R50 detector and
    hooks as configured, tiny data): 2 iterations through tools/train.py, then COCO evaluation."""
    smoke = str(tmp_path / 'smoke.py')
    work_dir = str(tmp_path / 'work')
    env = dict(os.environ, PYTHONPATH=REPO)
    subprocess.run([sys.executable, 'tools/smoke_config.py', path, smoke, '--data-root',
                    tiny_demo_data], cwd=REPO, env=env, check=True, capture_output=True)
    proc = subprocess.run([sys.executable, 'tools/train.py', smoke, '--work-dir', work_dir],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert 'Epoch(train) [1][2/2]' in log, log[-3000:]
    # the burn-in ends after 1 iteration: the 8 head layers then run CBN, once per level
    assert 'CBNBurnInHook: 8 CBN layers now use CBN with window 4' in log, log[-3000:]
    metrics = read_final_metrics(work_dir)
    assert metrics is not None and metrics['coco/bbox_mAP'] >= 0, log[-3000:]
