# Figure 5, burn-in 5 epochs: faster-rcnn_r50_fpn_cbn-head_1x_coco.py (k=4, burn-in 3) with the
# window at k=1 (plain BN) for the first 5 epochs instead. Pretrained: torchvision's ResNet-50.
_base_ = './faster-rcnn_r50_fpn_cbn-head_1x_coco.py'
custom_hooks = [dict(type='CBNBurnInHook', burn_in=5, by_epoch=True)]
