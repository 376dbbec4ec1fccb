# RetinaNet R50-FPN with CBN (k=4, statistics per GPU) in the head's 4 + 4 stacked convs. The head is
# shared across the 5 FPN levels, so each CBN layer runs 5 times per forward; here the 5 calls of an
# iteration pool into one history entry (per_call=0, the layer's default). 3-epoch burn-in with k=1,
# as configs/cbn_paper. Pretrained: torchvision's ResNet-50.
_base_ = './_base_/retinanet_r50_fpn_4xb4-1x_coco.py'
norm_cfg = dict(type='CBN', window=4)
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
# The hook leaves each layer's window (norm_cfg) as it is and only runs the burn-in.
custom_hooks = [dict(type='CBNBurnInHook', burn_in=3, by_epoch=True)]
