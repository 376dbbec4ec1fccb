# Table 5, "fixed BN / BRN": Batch Renormalization (cbn_mmdet's BRN, default r_max/d_max) in the FPN
# and the 4conv1fc box head over the fixed-BN backbone. Pretrained: torchvision's ResNet-50.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='BRN')
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
