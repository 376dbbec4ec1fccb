"""The ImageNet configs (configs/cbn_imagenet) say what the paper did; each family trains end to end.

tests/test_configs/test_configs.py builds every config's model; here the resolved settings are checked
against the paper's (Section 4.1) and against what each config's name promises, without building
models. One representative per family (architecture with CBN, and each other normalizer of the
tables) trains two iterations and evaluates on a tiny generated ImageNet-format dataset (the
classification demo shapes), in this process (mmpretrain's import alone
takes seconds; a subprocess per family would pay it each time).
"""
import contextlib
import functools
import math
import os
import os.path as osp

import pytest

from conftest import REPO_ROOT as REPO  # noqa: E402
from collect_table import describe_imagenet_config, load_paper_results  # noqa: E402

pytest.importorskip('mmpretrain', reason='mmpretrain is an optional extra')

BENCH = load_paper_results().BENCHMARKS['imagenet']
CONFIG_DIR = osp.join(REPO, BENCH.config_dir)
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))


@functools.lru_cache(maxsize=None)
def _load(name):
    import cbn_mmdet  # noqa: F401
    from mmengine.config import Config
    return Config.fromfile(osp.join(CONFIG_DIR, name + '.py'))


def test_tables_and_configs_match():
    assert set(BENCH.all_configs()) == set(CONFIGS)
    assert list(BENCH.tables) == ['table2', 'table3', 'table4', 'table9', 'figure3a', 'figure4',
                                  'figure5a']
    assert len(BENCH.tables['table2'].rows) == 5 and len(BENCH.tables['table3'].rows) == 24
    # Table 4: 5 architectures x 5 columns (BN bs=32, BN, GN, BRN, CBN)
    assert len(BENCH.tables['table4'].rows) == 25
    t4 = {r.label: r.paper.get('top1') for r in BENCH.tables['table4'].rows}
    assert t4['Inception-v3 GN'] == 76.8
    for table in BENCH.tables.values():
        for row in table.rows:
            assert set(row.paper) <= {'top1'}, row
    # the paper's headline numbers, labelled as the paper's (Table 3, 4 and 2 images per GPU)
    t3 = {r.label: r.paper.get('top1') for r in BENCH.tables['table3'].rows}
    assert (t3['BN 4/GPU'], t3['BN 2/GPU'], t3['CBN 4/GPU'], t3['CBN 2/GPU']) == (65.1, 55.9, 70.0, 69.6)
    assert t3['BN 1/GPU'] is None and t3['CBN 1/GPU'] == 69.3


@pytest.mark.parametrize('name', CONFIGS)
def test_paper_settings_and_what_the_name_says(name):
    cfg = _load(name)
    what = describe_imagenet_config(name)
    n = what['images_per_gpu']
    assert cfg.default_scope == 'mmpretrain'
    # Inception-v3 with norms from norm_cfg is cbn_mmdet's subclass, registered by its own module
    subclass = cfg.model.backbone.type == 'InceptionV3WithNormCfg'
    assert cfg.custom_imports == dict(
        imports=['cbn_mmdet'] + (['cbn_mmdet.mmpretrain_models'] if subclass else []),
        allow_failed_imports=False)
    assert cfg.train_dataloader.batch_size == n
    # lr 0.1 for 32 images per GPU, scaled by N / 32; momentum 0.9; weight decay 1e-4 on all weights
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.type == 'SGD' and optimizer.momentum == 0.9
    assert math.isclose(optimizer.lr, 0.1 * n / 32) and optimizer.weight_decay == 1e-4
    assert 'paramwise_cfg' not in cfg.optim_wrapper   # nothing exempts γ and β from the decay
    assert cfg.train_cfg.max_epochs == 100 and cfg.train_cfg.val_interval == 1
    assert [s.type for s in cfg.param_scheduler] == ['CosineAnnealingLR']
    assert cfg.param_scheduler[0].T_max == 100 and cfg.param_scheduler[0].by_epoch
    assert cfg.auto_scale_lr.base_batch_size == 128 and not cfg.auto_scale_lr.get('enable', False)
    assert 'sync_bn' not in cfg   # statistics per GPU, as the paper
    assert 'Pretrained' not in repr(cfg.model)   # trained from scratch

    hooks = {h.type: h for h in cfg.get('custom_hooks', [])}
    inception = name.startswith('inception-v3')
    if inception and subclass:  # the norms are built from norm_cfg at construction
        norm_cfg = cfg.model.backbone.norm_cfg
        assert 'NormSwitchHook' not in hooks
        assert cfg.train_pipeline[1].scale == 299
    elif inception:
        # mmpretrain's Inception-v3 has no norm_cfg: its BN layers are switched before iteration 0
        norm_cfg = hooks['NormSwitchHook'].to if 'NormSwitchHook' in hooks else dict(type='BN')
        if 'NormSwitchHook' in hooks:
            assert hooks['NormSwitchHook'].switch_epoch == 0
        assert cfg.train_pipeline[1].scale == 299
    else:
        norm_cfg = cfg.model.backbone.get('norm_cfg', dict(type='BN'))
        assert 'NormSwitchHook' not in hooks
    expected_type = {'BN': 'BN', 'GN': 'GN', 'BRN': 'BRN', 'CBN': 'CBN', 'Naive CBN': 'CBN',
                     'IN': 'IN', 'LN': 'GN'}[what['normalizer']]
    assert norm_cfg['type'] == expected_type
    if what['normalizer'] == 'LN':
        assert norm_cfg['num_groups'] == 1
    if what['normalizer'] in ('CBN', 'Naive CBN'):
        assert norm_cfg['window'] == what['window']
        assert norm_cfg.get('compensate', True) is (what['normalizer'] == 'CBN')
        assert hooks['CBNBurnInHook'].burn_in == what['burn_in'] and hooks['CBNBurnInHook'].by_epoch
    else:
        assert 'CBNBurnInHook' not in hooks and what['window'] is None


def test_cbn_windows_follow_the_paper():
    """Table 3: N * k >= 16 with the smallest such k; Tables 4 and 9, Figures 4 and 5(a) at 4 per GPU."""
    for row in BENCH.tables['table3'].rows + BENCH.tables['table2'].rows:
        what = describe_imagenet_config(row.config)
        if what['normalizer'] == 'CBN':
            assert what['window'] == math.ceil(16 / what['images_per_gpu']), row
    for row in BENCH.tables['table9'].rows[1:]:
        assert describe_imagenet_config(row.config)['window'] == 3
    for row in BENCH.tables['figure5a'].rows:
        what = describe_imagenet_config(row.config)
        assert (what['window'], what['images_per_gpu']) == (4, 4)
        assert row.label == f"burn-in {what['burn_in']} epochs"


def test_readme_and_metafile_are_the_tools_output(tmp_path):
    import collect_table
    collect_table.main(['--benchmark', 'imagenet', '--format', 'csv', '--work-root',
                        str(tmp_path / 'none'), '--model-zoo', str(tmp_path)])
    for name in ('README.md', 'metafile.yml'):
        committed = open(osp.join(CONFIG_DIR, name)).read()
        assert (tmp_path / name).read_text() == committed, (
            'regenerate with: tools/collect_table.py --benchmark imagenet --model-zoo '
            f'configs/cbn_imagenet ({name})')


# ------------------------------------------------------------------------------------------------
# One representative per family: 2 iterations and an evaluation on the tiny generated data

TINY_CLS = dict(num_train=4, num_val=2, image_size=32, seed=0)
FAMILIES = {
    'resnet18_cbn-k4_4xb4-100e_in1k': 20,
    'mobilenet-v2_cbn-k4_4xb4-100e_in1k': 52,
    'resnet50_cbn-k4_4xb4-100e_in1k': 53,
    'densenet121_cbn-k4_4xb4-100e_in1k': 121,
    'inception-v3_cbn-k4_4xb4-100e_in1k': 94,
    'vgg16_cbn-k4_4xb4-100e_in1k': 13,
}
SLOW = {'resnet50_cbn-k4_4xb4-100e_in1k', 'densenet121_cbn-k4_4xb4-100e_in1k',
        'inception-v3_cbn-k4_4xb4-100e_in1k', 'vgg16_cbn-k4_4xb4-100e_in1k'}


@pytest.fixture(scope='module')
def tiny_cls_data(tmp_path_factory):
    from cbn_mmdet_demo.shapes_classification import make_classification_dataset
    return make_classification_dataset(str(tmp_path_factory.mktemp('tiny_cls')), **TINY_CLS)


def tiny_run_config(name, data_root, work_dir):
    """The config ``name`` reading the tiny data: one epoch of 2 iterations of 2 images, then a
    validation; CBN's burn-in at 0 so that its window is in use from the first iteration."""
    cfg = _load(name).copy()
    for loader, split in (('train_dataloader', 'train'), ('val_dataloader', 'val'),
                          ('test_dataloader', 'val')):
        cfg[loader].update(batch_size=2, num_workers=0, persistent_workers=False)
        cfg[loader].dataset = dict(type='DemoShapesClassification', data_root=data_root,
                                   split=split, generate=False,
                                   pipeline=cfg[loader].dataset.pipeline)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=1, val_interval=1)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=1, save_last=False,
                                        save_optimizer=False)
    cfg.custom_hooks = [dict(h, burn_in=0) if h.type == 'CBNBurnInHook' else h
                        for h in cfg.get('custom_hooks', [])]
    cfg.work_dir = work_dir
    cfg.experiment_name = name
    cfg.randomness = dict(seed=0)
    return cfg


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in FAMILIES])
def test_family_trains_two_iterations_and_evaluates(name, tiny_cls_data, tmp_path):
    import cbn_mmdet_demo.shapes_classification_dataset  # noqa: F401  (registers the dataset)
    from mmengine.runner import Runner

    from cbn_mmdet import CBNWarning
    from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN
    runner = Runner.from_cfg(tiny_run_config(name, tiny_cls_data, str(tmp_path)))
    # DenseNet's norms after a concatenation fall back to BN (docs/imagenet.md), and say so
    with (pytest.warns(CBNWarning, match="fallback='bn'") if name.startswith('densenet')
          else contextlib.nullcontext()):
        runner.train()
    assert runner.iter == 2
    model = runner.model
    norms = [m for m in model.modules() if isinstance(m, CBN)]
    assert len(norms) == FAMILIES[name]   # every norm layer is CBN (Inception's after the switch)
    assert all(m.window == 4 and int(m.num_batches_tracked) == 2 for m in norms)
    metrics = runner.val_loop.run()
    assert 0 <= metrics['accuracy/top1'] <= 100


def test_inception_v3_gn_is_built_at_construction():
    """The GN config's model holds GroupNorm, 16 groups, exactly where mmpretrain's Inception-v3
    has BN (same module names, so the same state-dict keys), before any hook runs: the model
    ``tools/test.py`` builds is the trained one."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    from torch import nn
    cfg = _load('inception-v3_gn_4xb4-100e_in1k')
    init_default_scope('mmpretrain')
    gn = MODELS.build(cfg.model)
    stock = MODELS.build(_load('inception-v3_bn_4xb4-100e_in1k').model)
    bn_layers = {n: m.num_features for n, m in stock.named_modules()
                 if isinstance(m, nn.BatchNorm2d)}
    gn_layers = {n: m.num_channels for n, m in gn.named_modules() if isinstance(m, nn.GroupNorm)}
    assert len(bn_layers) == 94 and gn_layers == bn_layers
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in gn.modules())
    assert {m.num_groups for m in gn.modules() if isinstance(m, nn.GroupNorm)} == {16}
    assert set(gn.state_dict()) == {k for k in stock.state_dict()
                                    if not k.endswith(('running_mean', 'running_var',
                                                       'num_batches_tracked'))}
    # the default norm_cfg is mmpretrain's own BN (eps 0.001); 32 groups do not fit its widths
    from cbn_mmdet.mmpretrain_models import InceptionV3WithNormCfg
    default = InceptionV3WithNormCfg(num_classes=10)
    assert all(type(m) is nn.BatchNorm2d and m.eps == 0.001
               for m in default.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
    with pytest.raises(ValueError, match='does not fit a layer of 80 channels'):
        InceptionV3WithNormCfg(num_classes=10, norm_cfg=dict(type='GN', num_groups=32))


# One config per other normalizer of the tables (ResNet-18; Inception-v3's hook switching to BRN,
# and its subclass building GN): the layer type the trained model holds, and (num_groups) for GN/LN
NORMALIZERS = {
    'resnet18_bn_4xb4-100e_in1k': ('BatchNorm2d', None),
    'resnet18_gn_4xb4-100e_in1k': ('GroupNorm', 32),
    'resnet18_ln_4xb32-100e_in1k': ('GroupNorm', 1),
    'resnet18_in_4xb32-100e_in1k': ('InstanceNorm2d', None),
    'resnet18_brn_4xb4-100e_in1k': ('BatchRenorm2d', None),
    'resnet18_naive-cbn-k3_4xb4-100e_in1k': ('CrossIterationBatchNorm2d', None),
    'inception-v3_brn_4xb4-100e_in1k': ('BatchRenorm2d', None),
    'inception-v3_gn_4xb4-100e_in1k': ('GroupNorm', 16),
}


@pytest.mark.parametrize('name', NORMALIZERS)
def test_normalizer_trains_two_iterations_and_evaluates(name, tiny_cls_data, tmp_path):
    import cbn_mmdet_demo.shapes_classification_dataset  # noqa: F401  (registers the dataset)
    from mmengine.runner import Runner
    from torch import nn
    runner = Runner.from_cfg(tiny_run_config(name, tiny_cls_data, str(tmp_path)))
    runner.train()
    assert runner.iter == 2
    kind, groups = NORMALIZERS[name]
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm)
    norms = [m for m in runner.model.modules() if isinstance(m, norm_types)]
    assert norms and {type(m).__name__ for m in norms} == {kind}
    if groups is not None:
        assert {m.num_groups for m in norms} == {groups}
    if kind == 'CrossIterationBatchNorm2d':   # Naive CBN: the window, uncompensated
        assert all(m.window == 3 and not m.compensate for m in norms)
    metrics = runner.val_loop.run()
    assert 0 <= metrics['accuracy/top1'] <= 100
