# ResNet-18 (half width) with CBN in every layer, trained from scratch on the generated classification
# demo shapes (64 x 64 pixels, five classes) at 16 images per iteration: the classification
# counterpart of the detection demo. No pretrained weights are used anywhere.
_base_ = [
    'mmpretrain::_base_/models/resnet18.py',
    '../_base_/datasets/demo_shapes_classification.py',
    'mmpretrain::_base_/default_runtime.py',
]
# cbn_mmdet: the CBN layers and hooks; the dataset module registers DemoShapesClassification.
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo.shapes_classification_dataset'],
                      allow_failed_imports=False)

# The normalizer of the whole network: the one place to switch between BN, GN, CBN...
norm_cfg = dict(type='CBN', window=4, requires_grad=True)
width = 32  # ResNet base width (64 in the standard ResNet-18)
num_classes = 5
max_iters = 1200

model = dict(
    backbone=dict(stem_channels=width, base_channels=width, norm_cfg=norm_cfg),
    head=dict(num_classes=num_classes, in_channels=width * 8, topk=(1, )))

# Iteration-based schedule: linear warm-up, then cosine decay (the paper's ImageNet schedule, in
# iterations); evaluated half way and at the end.
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters // 2)
val_cfg = dict()
test_cfg = dict()
train_dataloader = dict(sampler=dict(type='InfiniteSampler', shuffle=True))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=50, end=max_iters, T_max=max_iters - 50),
]
# lr 0.1 x N / 32 for N = 16 images per iteration; weight decay on every weight including γ and β
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=1e-4))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)

# CBN: plain BN (window 1) for the first quarter of training while the weights change fast, then the
# window of norm_cfg (Section 3.3's burn-in, in iterations). RNGStateHook makes --resume repeat the
# uninterrupted run exactly.
custom_hooks = [
    dict(type='CBNBurnInHook', burn_in=max_iters // 4, by_epoch=False),
    dict(type='RNGStateHook'),
]
