# Figure 3, Naive CBN k=1: faster-rcnn_r50_fpn_naive-cbn-head_1x_coco.py (k=4) with window k=1
# after the 3-epoch burn-in (the hook sets every CBN layer's window). Pretrained: torchvision's ResNet-50.
# k=1 uses the current batch only: plain BN (the paper's k=1 point), whatever the compensation.
_base_ = './faster-rcnn_r50_fpn_naive-cbn-head_1x_coco.py'
custom_hooks = [dict(type='CBNBurnInHook', burn_in=3, window=1, by_epoch=True)]
