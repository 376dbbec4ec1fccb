# Table 7, "Epoch-8": faster-rcnn_r50_fpn_bn-head_1x_coco.py (BN with per-GPU statistics in the FPN
# and the box head), switched to SyncBN for the rest of training by NormSwitchHook.
#
# Epoch numbering: the paper's "switch at epoch N" is read in the convention of its lr schedule
# (the authors' `step=[8, 11]`, mmdet's MultiStepLR milestones): N epochs are trained with BN and the
# switch happens before runner.epoch N (0-based), so `switch_epoch=N`. Epoch-8 = 8 epochs BN, 4
# SyncBN (the last 4, which include both lr decays); Epoch-11 = SyncBN in the 12th epoch only.
# The backbone's frozen BN is not touched (only the FPN and the RoI head are switched).
# Needs a distributed run (SyncBN). Pretrained: torchvision's ResNet-50.
_base_ = './faster-rcnn_r50_fpn_bn-head_1x_coco.py'
switch_epoch = 8
custom_hooks = [
    dict(type='NormSwitchHook', switch_epoch=switch_epoch, to='SyncBN',
         parts=('neck', 'roi_head.bbox_head'))
]
