# Figure 3, CBN k=2: faster-rcnn_r50_fpn_cbn-head_1x_coco.py (k=4) with window k=2
# in every CBN layer, after the 3-epoch burn-in. Pretrained: torchvision's ResNet-50.
_base_ = './faster-rcnn_r50_fpn_cbn-head_1x_coco.py'
norm_cfg = dict(type='CBN', window=2)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
