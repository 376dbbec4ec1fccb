# Figure 3, CBN k=1: faster-rcnn_r50_fpn_cbn-head_1x_coco.py (k=4) with window k=1
# in every CBN layer, after the 3-epoch burn-in. Pretrained: torchvision's ResNet-50.
# k=1 uses the current batch only: plain BN (the paper's k=1 point), whatever the compensation.
_base_ = './faster-rcnn_r50_fpn_cbn-head_1x_coco.py'
norm_cfg = dict(type='CBN', window=1)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
