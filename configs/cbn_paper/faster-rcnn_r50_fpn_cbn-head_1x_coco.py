# Table 5, "fixed BN / CBN"; Table 6, R50 Faster R-CNN CBN; Figure 3 k=4; Figure 5 burn-in 3:
# CBN (statistics per GPU) in the FPN and the 4conv1fc box head over the fixed-BN backbone.
# Window k=4 (= min(ceil(16 / 4 images per GPU), 8)) after a burn-in of 3 epochs with k=1.
# Pretrained: torchvision's ResNet-50.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='CBN', window=4)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
# The hook leaves each layer's window (norm_cfg) as it is and only runs the burn-in.
custom_hooks = [dict(type='CBNBurnInHook', burn_in=3, by_epoch=True)]
