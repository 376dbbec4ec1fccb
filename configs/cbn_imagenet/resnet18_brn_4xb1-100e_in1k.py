# ResNet-18, 1 images per GPU x 4 GPUs, BRN (Batch Renormalization, cbn_mmdet's BRN with its
# default r_max/d_max) in every layer.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
norm_cfg = dict(type='BRN')
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=1)
optim_wrapper = dict(optimizer=dict(lr=0.003125))  # 0.1 * 1 / 32
