# Table 5, "fixed BN / GN"; Table 6, R50 Faster R-CNN GN: GN (32 groups) in the FPN and the 4conv1fc
# box head over the fixed-BN backbone. Pretrained: torchvision's ResNet-50 (the backbone is BN).
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
