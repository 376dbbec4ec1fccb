# Table 6, R50 Mask R-CNN CBN: CBN (k=4, burn-in 3 epochs) in the FPN, the 4conv1fc box head and
# the FCN mask head over the fixed-BN backbone (see _base_/mask-rcnn_r50_fpn_4conv1fc_1x_coco.py).
# Pretrained: torchvision's ResNet-50.
_base_ = './_base_/mask-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='CBN', window=4)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))
# The hook leaves each layer's window (norm_cfg) as it is and only runs the burn-in.
custom_hooks = [dict(type='CBNBurnInHook', burn_in=3, by_epoch=True)]
