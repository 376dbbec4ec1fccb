# ResNet-18, 32 images per GPU x 4 GPUs, LN (layer normalization over C, H, W: GN with one group)
# in every layer.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
norm_cfg = dict(type='GN', num_groups=1)
model = dict(backbone=dict(norm_cfg=norm_cfg))
