# DenseNet-121, 4 images per GPU x 4 GPUs, GN, 32 groups in every layer.
_base_ = './_base_/densenet121_4xb32-100e_in1k.py'
norm_cfg = dict(type='GN', num_groups=32)
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))  # 0.1 * 4 / 32
