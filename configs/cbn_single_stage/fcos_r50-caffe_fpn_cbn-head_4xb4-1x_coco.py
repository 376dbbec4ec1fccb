# FCOS R50-caffe-FPN, 1x COCO (mmdet's fcos_r50-caffe_fpn_gn-head_1x_coco.py: GN head, caffe-style
# fixed-BN backbone, lr 0.01 for 16 images, 12 epochs) at 4 GPUs x 4 images, with CBN (k=4, statistics
# per GPU) instead of GN in the head's 4 + 4 stacked convs. The head is shared across the 5 FPN levels,
# so each CBN layer runs 5 times per forward; here the 5 calls of an iteration pool into one history
# entry (per_call=0, the layer's default). 3-epoch burn-in with k=1, as configs/cbn_paper. The GN
# baseline is mmdet's own fcos_r50-caffe_fpn_gn-head_4xb4-1x_coco.py (the same settings with GN).
# Pretrained: open-mmlab://detectron/resnet50_caffe (mmdet's FCOS weights, caffe-style BN ResNet-50).
_base_ = 'mmdet::fcos/fcos_r50-caffe_fpn_gn-head_1x_coco.py'
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)
norm_cfg = dict(type='CBN', window=4)
# (mmdet's FCOS config leaves FCOSHead's default GN norm_cfg unset, so this replaces it whole)
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=4, num_workers=4)
# The hook leaves each layer's window (norm_cfg) as it is and only runs the burn-in.
custom_hooks = [dict(type='CBNBurnInHook', burn_in=3, by_epoch=True)]
