# ResNet-18, 12 images per GPU x 4 GPUs, BN in every layer.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
train_dataloader = dict(batch_size=12)
optim_wrapper = dict(optimizer=dict(lr=0.037500000000000006))  # 0.1 * 12 / 32
