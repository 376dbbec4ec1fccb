"""Write a CPU smoke-test version of a COCO config: same model and hooks, tiny data and run.

    .venv/bin/python tools/smoke_config.py CONFIG OUT.py --data-root DIR [--image-size 64]

The output trains the config's own detector (backbone, normalizers, 4conv1fc/mask heads, hooks) for
one short epoch on a demo-shapes dataset already generated under DIR (``tools/make_demo_data.py``),
then validates it with CocoMetric: no pretrained weights (``init_cfg=None``), 2 images per batch,
small images, few RoIs (or, for a single-stage detector, few candidates), 5 classes. Hooks that act on epochs act on iterations instead, so their
effect is seen in two iterations: ``CBNBurnInHook`` burns in for 1 iteration; ``NormSwitchHook``
switches at iteration 1 and, where it targets SyncBN (CUDA and several processes only), to CBN.
Use it to check a config end to end before a COCO run; tests/test_configs/test_paper_configs.py and
test_single_stage.py run it (Faster/Mask R-CNN, RetinaNet, FCOS).
"""
import argparse
import os.path as osp
import sys

TOOLS_DIR = osp.dirname(osp.abspath(__file__))
sys.path.insert(0, osp.dirname(TOOLS_DIR))
sys.path.insert(0, TOOLS_DIR)

from short_run import shrink_config  # noqa: E402


def _pipelines(image_size: int, with_mask: bool):
    load = dict(type='LoadAnnotations', with_bbox=True, with_mask=with_mask)
    resize = dict(type='Resize', scale=(image_size, image_size), keep_ratio=True)
    train = [dict(type='LoadImageFromFile'), load, resize, dict(type='PackDetInputs')]
    test = [dict(type='LoadImageFromFile'), resize, load,
            dict(type='PackDetInputs',
                 meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
    return train, test


def _demo_loader(pipeline, test_mode: bool):
    """A demo-shapes loader; :func:`shrink_config` points it at the data."""
    from mmengine.config import ConfigDict
    return ConfigDict(
        batch_size=2, drop_last=False, sampler=dict(type='DefaultSampler', shuffle=not test_mode),
        dataset=dict(type='DemoShapesDataset', test_mode=test_mode,
                     filter_cfg=None if test_mode else dict(filter_empty_gt=True), pipeline=pipeline))


def smoke_cfg(cfg, data_root: str, image_size: int = 64, num_classes: int = 5):
    """Shrink a loaded mmengine Config in place (see the module docstring); returns it."""
    from mmengine.config import ConfigDict
    roi = cfg.model.get('roi_head')  # None: a single-stage detector (RetinaNet, FCOS)
    with_mask = roi is not None and 'mask_head' in roi
    train_pipeline, test_pipeline = _pipelines(image_size, with_mask)
    cfg.train_dataloader = _demo_loader(train_pipeline, False)
    cfg.val_dataloader = _demo_loader(test_pipeline, True)
    cfg.test_dataloader = cfg.val_dataloader
    cfg.val_evaluator = ConfigDict(type='CocoMetric', metric=['bbox', 'segm'] if with_mask else 'bbox')
    cfg.test_evaluator = cfg.val_evaluator
    cfg.custom_imports = ConfigDict(imports=['cbn_mmdet', 'cbn_mmdet_demo'],  # + the demo dataset
                                    allow_failed_imports=False)
    shrink_config(cfg, data_root, rpn_samples=32, rcnn_samples=16)
    cfg.model.backbone.init_cfg = None
    if roi is None:
        cfg.model.bbox_head.num_classes = num_classes
        # untrained focal-loss heads score below the usual 0.05: keep every box, so that the
        # evaluation has detections to score
        cfg.model.test_cfg.score_thr = 0.0
    else:
        roi.bbox_head.num_classes = num_classes
        if with_mask:
            roi.mask_head.num_classes = num_classes
        cfg.model.rpn_head.anchor_generator.scales = [4]
    cfg.train_cfg = ConfigDict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=1)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=0, end=1)]
    cfg.optim_wrapper.optimizer.lr = 0.002
    cfg.default_hooks.logger = ConfigDict(type='LoggerHook', interval=1)
    # No checkpoint (an R50 checkpoint is hundreds of MB).
    cfg.default_hooks.checkpoint = ConfigDict(type='CheckpointHook', interval=-1, save_last=False)
    hooks = []
    for hook in cfg.get('custom_hooks', []):
        hook = ConfigDict(hook)
        if hook.type == 'CBNBurnInHook':
            hook.update(burn_in=1, by_epoch=False, ramp=0)
        elif hook.type == 'NormSwitchHook':
            hook.pop('switch_epoch', None)
            hook.switch_iter = 1
            if hook.get('to') in ('SyncBN', 'MMSyncBN'):
                hook.to = dict(type='CBN', window=4)
        hooks.append(hook)
    cfg.custom_hooks = hooks
    cfg.randomness = dict(seed=0)
    return cfg


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('out')
    parser.add_argument('--data-root', required=True)
    parser.add_argument('--image-size', type=int, default=64)
    args = parser.parse_args(argv)
    import cbn_mmdet  # noqa: F401  (registers CBN/BRN/hooks for the checks below)
    from mmengine.config import Config
    cfg = smoke_cfg(Config.fromfile(args.config), args.data_root, args.image_size)
    cfg.dump(args.out)
    print(args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
