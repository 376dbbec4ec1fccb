"""Every config under configs/ parses with mmengine and builds its model with its toolbox's registry
(mmdet's, or mmpretrain's for the classification configs, through the config's default_scope).

Configs that need GPUs or datasets are only parsed and built (nothing is run or loaded).
"""
import glob
import os.path as osp

import pytest

from conftest import REPO_ROOT as REPO  # noqa: E402
CONFIGS = sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'configs', '**', '*.py'), recursive=True)
    if '_base_' not in osp.relpath(p, REPO).split(osp.sep))
DEMOS = [p for p in CONFIGS if p.startswith('configs/demo/')]
# the classification demos (mmpretrain) are named *_demo-shapes-cls.py; the rest are detectors
CLASSIFICATION_DEMOS = [p for p in DEMOS if p.endswith('_demo-shapes-cls.py')]
DETECTION_DEMOS = [p for p in DEMOS if p not in CLASSIFICATION_DEMOS]


def test_configs_are_found():
    assert 'configs/demo/faster-rcnn_r18_fpn_demo-shapes.py' in CONFIGS
    assert 'configs/demo/mask-rcnn_r18_fpn_demo-shapes.py' in CONFIGS
    assert CLASSIFICATION_DEMOS == ['configs/demo/resnet18_cbn_demo-shapes-cls.py']
    assert 'configs/cbn_imagenet/resnet18_cbn-k4_4xb4-100e_in1k.py' in CONFIGS


def _load(path):
    from mmengine.config import Config
    return Config.fromfile(osp.join(REPO, path))


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_model(path):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    cfg = _load(path)
    if path in CLASSIFICATION_DEMOS:
        plugins = ['cbn_mmdet', 'cbn_mmdet_demo.shapes_classification_dataset']
    elif path in DETECTION_DEMOS:
        plugins = ['cbn_mmdet', 'cbn_mmdet_demo']
    elif cfg.model.get('backbone', {}).get('type') == 'InceptionV3WithNormCfg':
        plugins = ['cbn_mmdet', 'cbn_mmdet.mmpretrain_models']   # where that backbone is registered
    else:
        plugins = ['cbn_mmdet']
    assert cfg.custom_imports == dict(imports=plugins, allow_failed_imports=False)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model = MODELS.build(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    # No pretrained weights can be downloaded here: nothing may ask for them, except the COCO configs
    # (building a model loads nothing; tests/test_configs/test_paper_configs.py and
    # test_single_stage.py check their weights).
    if not path.startswith(('configs/cbn_paper/', 'configs/cbn_single_stage/')):
        assert 'Pretrained' not in repr(cfg.model), f'{path} asks for pretrained weights'


def _norm_cfgs(model_cfg):
    """(where, norm_cfg) for the neck and the RoI heads of a two-stage detector config, the head of
    a single-stage one (whose FPN has no normalizer, as in mmdet)."""
    if 'roi_head' not in model_cfg:
        return [('bbox_head', model_cfg.bbox_head.get('norm_cfg'))]
    out = [('neck', model_cfg.neck.get('norm_cfg'))]
    for head in ('bbox_head', 'mask_head'):
        if head in model_cfg.roi_head:
            out.append((head, model_cfg.roi_head[head].get('norm_cfg')))
    return out


@pytest.mark.parametrize('path', DETECTION_DEMOS)
def test_demo_configs_use_one_head_norm_variable(path):
    cfg = _load(path)
    assert 'head_norm_cfg' in cfg
    for where, norm_cfg in _norm_cfgs(cfg.model):
        assert norm_cfg == cfg.head_norm_cfg, f'{path}: {where} norm {norm_cfg}'
    if 'roi_head' in cfg.model:
        assert cfg.model.roi_head.bbox_head.type == 'Shared4Conv1FCBBoxHead'
    assert cfg.model.backbone.init_cfg is None
    # Trains from scratch: the backbone norm layers learn and update their statistics.
    assert cfg.model.backbone.frozen_stages == -1 and cfg.model.backbone.norm_eval is False


@pytest.mark.parametrize('path', DETECTION_DEMOS)
def test_demo_configs_data_settings(path):
    cfg = _load(path)
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        assert loader.dataset.type == 'DemoShapesDataset'
        # persistent_workers=True with num_workers=0 makes the DataLoader raise.
        assert loader.num_workers > 0 or not loader.persistent_workers
        # Train and val must ask for the same generated data.
        assert loader.dataset.generate == cfg.train_dataloader.dataset.generate
    metrics = cfg.val_evaluator.metric
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    assert cfg.val_evaluator.type == 'CocoMetric'
    assert metrics == (['bbox', 'segm'] if 'mask_head' in cfg.model.get('roi_head', {}) else ['bbox'])
    assert cfg.val_evaluator.ann_file == (cfg.val_dataloader.dataset.data_root
                                          + cfg.val_dataloader.dataset.ann_file)


def test_main_demo_config_uses_the_default_generation_arguments():
    # `tools/make_demo_data.py` with no arguments must make the data this config expects: the dataset
    # refuses data under its data_root that was generated with other arguments.
    from cbn_mmdet_demo.shapes import default_generation_args, normalize_generation_args
    cfg = _load('configs/demo/faster-rcnn_r18_fpn_demo-shapes.py')
    assert cfg.train_dataloader.dataset.data_root.rstrip('/') == 'data/demo_shapes'
    generate = normalize_generation_args(**cfg.train_dataloader.dataset.generate)
    assert generate == default_generation_args()


@pytest.mark.parametrize('path', CLASSIFICATION_DEMOS)
def test_classification_demo_settings(path):
    cfg = _load(path)
    assert cfg.default_scope == 'mmpretrain'
    # one norm variable for the whole network, trained from scratch
    assert cfg.model.backbone.norm_cfg == cfg.norm_cfg and cfg.norm_cfg.type == 'CBN'
    assert cfg.model.backbone.get('init_cfg') is None and 'Pretrained' not in repr(cfg.model)
    assert cfg.model.head.num_classes == cfg.data_preprocessor.num_classes == 5
    assert cfg.model.head.in_channels == cfg.width * 8
    generate = cfg.train_dataloader.dataset.generate
    for split, loader_name in (('train', 'train_dataloader'), ('val', 'val_dataloader'),
                               ('val', 'test_dataloader')):
        loader = cfg[loader_name]
        assert loader.dataset.type == 'DemoShapesClassification' and loader.dataset.split == split
        assert loader.dataset.generate == generate   # the same generated data
        assert loader.num_workers > 0 or not loader.persistent_workers
    assert cfg.val_evaluator == dict(type='Accuracy', topk=(1, ))
    burn_in = next(h for h in cfg.custom_hooks if h.type == 'CBNBurnInHook')
    assert burn_in.burn_in == cfg.max_iters // 4 and burn_in.by_epoch is False
