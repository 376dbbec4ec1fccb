# MobileNet-v2, 32 images per GPU x 4 GPUs, BN in every layer.
_base_ = './_base_/mobilenet-v2_4xb32-100e_in1k.py'
