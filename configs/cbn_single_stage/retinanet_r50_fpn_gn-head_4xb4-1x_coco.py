# RetinaNet R50-FPN with GN (32 groups) in the head's 4 + 4 stacked convs (shared across the 5 FPN
# levels): the baseline of the CBN configs here (mmdet's RetinaNet has no normalizer in its head).
# Pretrained: torchvision's ResNet-50.
_base_ = './_base_/retinanet_r50_fpn_4xb4-1x_coco.py'
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
