# ResNet-18, 8 images per GPU x 4 GPUs, CBN in every layer, window k=2 (N * k = 16 >= 16), burn-in
# 25 epochs with k=1.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
norm_cfg = dict(type='CBN', window=2)
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=8)
optim_wrapper = dict(optimizer=dict(lr=0.025))  # 0.1 * 8 / 32
custom_hooks = [dict(type='CBNBurnInHook', burn_in=25, by_epoch=True)]
