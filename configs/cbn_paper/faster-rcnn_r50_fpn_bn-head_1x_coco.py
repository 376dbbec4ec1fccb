# Table 5, "fixed BN / BN"; base of Table 7: Faster R-CNN R50-FPN, BN (statistics per GPU, 4 images)
# in the FPN and the 4conv1fc box head over the fixed-BN backbone. Pretrained: torchvision's ResNet-50.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
