# Inception-v3, 4 images per GPU x 4 GPUs, CBN in every layer, window k=4 (N * k = 16 >= 16),
# burn-in 25 epochs with k=1.
_base_ = './_base_/inception-v3_4xb32-100e_in1k.py'
# mmpretrain's Inception-v3 builds nn.BatchNorm2d directly (no norm_cfg): the hook turns them
# into this normalizer before the first iteration, keeping their tensors.
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))  # 0.1 * 4 / 32
custom_hooks = [
    dict(type='NormSwitchHook', switch_epoch=0, to=dict(type='CBN', window=4)),
    dict(type='CBNBurnInHook', burn_in=25, by_epoch=True),
]
