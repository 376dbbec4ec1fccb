# ResNet-18, 4 images per GPU x 4 GPUs, Naive CBN (statistics of the last k iterations averaged
# without the Taylor compensation; compensate=False) in every layer, window k=8, burn-in 25 epochs
# with k=1.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
norm_cfg = dict(type='CBN', window=8, compensate=False)
model = dict(backbone=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))  # 0.1 * 4 / 32
custom_hooks = [dict(type='CBNBurnInHook', burn_in=25, by_epoch=True)]
