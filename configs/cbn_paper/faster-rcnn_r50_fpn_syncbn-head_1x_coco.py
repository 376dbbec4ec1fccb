# Table 5, "fixed BN / syncBN"; Table 6, R50 Faster R-CNN syncBN: SyncBN (statistics over the 4 GPUs,
# 16 images) in the FPN and the 4conv1fc box head over the fixed-BN backbone. Needs a distributed run
# (tools/dist_train.sh). Pretrained: torchvision's ResNet-50.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(neck=dict(norm_cfg=norm_cfg), roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))
