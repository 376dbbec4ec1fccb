# Faster R-CNN, slim ResNet-18 + FPN, 4conv1fc box head, trained from scratch on the generated demo
# shapes dataset: a CPU demo (about 10 minutes on 2 cores, COCO evaluation included) that learns
# for real. No pretrained weights are used anywhere.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/demo_shapes_detection.py',
    'mmdet::_base_/default_runtime.py',
]
# cbn_mmdet: the CBN layers and hooks; cbn_mmdet_demo: the demo dataset.
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo'], allow_failed_imports=False)

# The normalizer of the neck (FPN) and the box head: the one place to switch between BN, GN, CBN...
head_norm_cfg = dict(type='CBN', window=4, requires_grad=True)
# (mmengine resolves variables when a file is parsed: a config that inherits this one must set the
# norm_cfg of each module, not head_norm_cfg.)
# The backbone is trained from scratch, so it normalizes (and updates its statistics) too.
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
        out_channels=fpn_channels,
        norm_cfg=head_norm_cfg),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        # Shapes are 19-77 px in 128 px images: anchors of 16-256 px.
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            in_channels=fpn_channels,
            conv_out_channels=fpn_channels,
            fc_out_channels=256,
            num_classes=num_classes,
            norm_cfg=head_norm_cfg)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=128)),
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=32))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=50)))

# Iteration-based schedule: linear warm-up, then steps at 75% and 90%; evaluated half way and at the
# end.
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
    optimizer=dict(type='SGD', lr=0.04, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=8)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)

# CBN: plain BN (window 1) for the first quarter of training while the weights change fast, then the
# window of head_norm_cfg (Section 3.3's burn-in, here in iterations). RNGStateHook makes --resume
# repeat the uninterrupted run exactly.
custom_hooks = [
    dict(type='CBNBurnInHook', burn_in=max_iters // 4, by_epoch=False),
    dict(type='RNGStateHook'),
]
