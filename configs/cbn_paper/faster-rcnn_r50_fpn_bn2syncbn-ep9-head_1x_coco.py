# Table 7, "Epoch-9": BN in the FPN and the box head, switched to SyncBN before runner.epoch 9
# (9 epochs BN, 3 SyncBN). See faster-rcnn_r50_fpn_bn2syncbn-ep8-head_1x_coco.py for the
# epoch numbering. Pretrained: torchvision's ResNet-50.
_base_ = './faster-rcnn_r50_fpn_bn2syncbn-ep8-head_1x_coco.py'
switch_epoch = 9
custom_hooks = [
    dict(type='NormSwitchHook', switch_epoch=switch_epoch, to='SyncBN',
         parts=('neck', 'roi_head.bbox_head'))
]
