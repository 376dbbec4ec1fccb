# ResNet-18, 32 images per GPU x 4 GPUs, CBN in every layer, window k=1 (N * k = 32 >= 16), burn-
# in 25 epochs with k=1.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
norm_cfg = dict(type='CBN', window=1)
model = dict(backbone=dict(norm_cfg=norm_cfg))
custom_hooks = [dict(type='CBNBurnInHook', burn_in=25, by_epoch=True)]
