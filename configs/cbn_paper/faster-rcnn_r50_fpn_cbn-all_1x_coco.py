# Table 5, "CBN / CBN" (all layers): CBN also in ResNet stages 2-4 (res3-res5), which now train
# their norm layers (norm_eval=False); the stem and stage 1 (the paper's "conv1 and conv2 stages")
# stay frozen (frozen_stages=1). FPN and box head as in faster-rcnn_r50_fpn_cbn-head_1x_coco.py.
# Pretrained: torchvision's ResNet-50 (ImageNet BN weights; same state-dict keys in CBN).
_base_ = './faster-rcnn_r50_fpn_cbn-head_1x_coco.py'
model = dict(backbone=dict(frozen_stages=1, norm_cfg=_base_.norm_cfg, norm_eval=False))
