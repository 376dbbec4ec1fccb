# ResNet-50 on ImageNet with the paper's settings (Section 4.1): mmpretrain's model and data
# pipeline, 4 GPUs x 32 images, the 100-epoch cosine schedule; BN, statistics per GPU (no
# sync_bn). The configs of this folder change the normalizer and the images per GPU (with the lr,
# 0.1 * N / 32).
_base_ = [
    'mmpretrain::_base_/models/resnet50.py',
    'mmpretrain::_base_/datasets/imagenet_bs32.py',
    './schedule_100e_cosine.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)

train_dataloader = dict(batch_size=32)
