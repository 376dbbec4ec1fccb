# MobileNet-v2, 4 images per GPU x 4 GPUs, GN, 8 groups (some of its widths, e.g. 24, are not
# multiples of 32) in every layer.
_base_ = './_base_/mobilenet-v2_4xb32-100e_in1k.py'
norm_cfg = dict(type='GN', num_groups=8)
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))  # 0.1 * 4 / 32
