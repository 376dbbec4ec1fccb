# Figure 3, Naive CBN k=4: faster-rcnn_r50_fpn_cbn-head_1x_coco.py without the Taylor compensation
# (statistics of the last k iterations averaged as they were computed; compensate=False).
# Pretrained: torchvision's ResNet-50.
_base_ = './faster-rcnn_r50_fpn_cbn-head_1x_coco.py'
norm_cfg = dict(type='CBN', window=4, compensate=False)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
