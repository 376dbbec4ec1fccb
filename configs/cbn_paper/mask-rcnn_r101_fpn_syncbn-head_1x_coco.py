# Table 6, R101: mask-rcnn_r50_fpn_syncbn-head_1x_coco.py with ResNet-101.
# Pretrained: torchvision's ResNet-101 (ImageNet, BN).
_base_ = './mask-rcnn_r50_fpn_syncbn-head_1x_coco.py'
model = dict(
    backbone=dict(depth=101, init_cfg=dict(
        type='Pretrained',
        checkpoint='https://download.pytorch.org/models/resnet101-63fe2227.pth')))
