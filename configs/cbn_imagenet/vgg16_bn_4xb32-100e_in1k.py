# VGG-16, 32 images per GPU x 4 GPUs, BN in every layer.
_base_ = './_base_/vgg16_4xb32-100e_in1k.py'
