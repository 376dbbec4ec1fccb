# Inception-v3 on ImageNet with the paper's settings (Section 4.1): mmpretrain's model and data
# pipeline, 4 GPUs x 32 images, the 100-epoch cosine schedule; BN, statistics per GPU (no
# sync_bn). The configs of this folder change the normalizer and the images per GPU (with the lr,
# 0.1 * N / 32).
_base_ = [
    'mmpretrain::_base_/models/inception_v3.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    './schedule_100e_cosine.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)

# Inception-v3's input size (299), as mmpretrain's inception-v3_8xb32_in1k.py
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=299),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=342, edge='short'),
    dict(type='CenterCrop', crop_size=299),
    dict(type='PackInputs'),
]
train_dataloader = dict(batch_size=32, dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
