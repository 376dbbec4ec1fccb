# RetinaNet, slim ResNet-18 + FPN (P3-P7), trained from scratch on the generated demo shapes dataset:
# the single-stage counterpart of faster-rcnn_r18_fpn_demo-shapes.py (same backbone, data, images per
# iteration and schedule shape). No pretrained weights are used anywhere.
#
# The head (mmdet's RetinaHead: 4 cls + 4 reg 3x3 convs) is shared across the 5 FPN levels, so each of
# its 8 norm layers runs 5 times per forward. Here they are CBN with the calls of an iteration pooled
# into one history entry (per_call=0, the layer's default);
# retinanet_r18_fpn_cbn-percall-head_demo-shapes.py keeps one history per level, and
# retinanet_r18_fpn_gn-head_demo-shapes.py is the GN baseline. The FPN has no normalizer (mmdet's
# RetinaNet/FCOS default), so "head" is the head's stacked convs only.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../_base_/datasets/demo_shapes_detection.py',
    'mmdet::_base_/default_runtime.py',
]
# cbn_mmdet: the CBN layers and hooks; cbn_mmdet_demo: the demo dataset.
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo'], allow_failed_imports=False)

# The normalizer of the head's stacked convs: the one place to switch between GN, CBN...
# (mmengine resolves variables when a file is parsed: a config that inherits this one must set
# model.bbox_head.norm_cfg too, not only head_norm_cfg.)
head_norm_cfg = dict(type='CBN', window=4, requires_grad=True)
backbone_norm_cfg = dict(type='BN', requires_grad=True)

width = 32  # ResNet base width (64 in the standard ResNet-18)
fpn_channels = 64
num_classes = 5
max_iters = 1200

model = dict(
    backbone=dict(
        depth=18,
        base_channels=width,
        frozen_stages=-1,
        norm_cfg=backbone_norm_cfg,
        norm_eval=False,
        init_cfg=None),
    neck=dict(
        in_channels=[width, width * 2, width * 4, width * 8],
        out_channels=fpn_channels),
    bbox_head=dict(
        num_classes=num_classes,
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        norm_cfg=head_norm_cfg,
        # Shapes are 19-77 px in 128 px images: anchors of 16-406 px (mmdet: 32-813 px).
        anchor_generator=dict(octave_base_scale=2)),
    test_cfg=dict(max_per_img=50))

# Iteration-based schedule: linear warm-up, then steps at 75% and 90%; evaluated half way and at the
# end. lr 0.02 is half the Faster R-CNN demo's 0.04, as mmdet's single-stage 1x configs (0.01) are
# half its two-stage ones (0.02).
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters // 2)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
train_dataloader = dict(sampler=dict(type='InfiniteSampler', shuffle=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=200),
    dict(
        type='MultiStepLR',
        by_epoch=False,
        begin=0,
        end=max_iters,
        milestones=[int(max_iters * 0.75), int(max_iters * 0.9)],
        gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)

# CBN: plain BN (window 1) for the first quarter of training, then the window of head_norm_cfg (as in
# faster-rcnn_r18_fpn_demo-shapes.py; the GN variant has no CBN layer and drops the hook).
custom_hooks = [
    dict(type='CBNBurnInHook', burn_in=max_iters // 4, by_epoch=False),
    dict(type='RNGStateHook'),
]
