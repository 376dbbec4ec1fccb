# Figure 3, CBN k=2: faster-rcnn_r50_fpn_cbn-head_1x_coco.py (k=4) with window k=2
# after the 3-epoch burn-in (the hook sets every CBN layer's window). Pretrained: torchvision's ResNet-50.
_base_ = './faster-rcnn_r50_fpn_cbn-head_1x_coco.py'
custom_hooks = [dict(type='CBNBurnInHook', burn_in=3, window=2, by_epoch=True)]
