# Inception-v3, 4 images per GPU x 4 GPUs, BRN (Batch Renormalization, cbn_mmdet's BRN with its
# default r_max/d_max) in every layer.
_base_ = './_base_/inception-v3_4xb32-100e_in1k.py'
# mmpretrain's Inception-v3 builds nn.BatchNorm2d directly (no norm_cfg): the hook turns them
# into this normalizer before the first iteration, keeping their tensors.
custom_hooks = [dict(type='NormSwitchHook', switch_epoch=0, to=dict(type='BRN'))]
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))  # 0.1 * 4 / 32
