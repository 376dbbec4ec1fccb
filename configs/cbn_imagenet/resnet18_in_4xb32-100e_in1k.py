# ResNet-18, 32 images per GPU x 4 GPUs, IN (instance normalization, affine) in every layer.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
norm_cfg = dict(type='IN', affine=True)
model = dict(backbone=dict(norm_cfg=norm_cfg))
