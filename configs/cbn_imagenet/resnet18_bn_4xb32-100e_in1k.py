# ResNet-18, 32 images per GPU x 4 GPUs, BN in every layer.
_base_ = './_base_/resnet18_4xb32-100e_in1k.py'
