# ResNet-50, 32 images per GPU x 4 GPUs, BN in every layer.
_base_ = './_base_/resnet50_4xb32-100e_in1k.py'
