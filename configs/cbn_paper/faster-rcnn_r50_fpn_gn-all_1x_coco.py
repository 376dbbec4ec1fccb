# Table 5, "GN / GN" (all layers): GN also in ResNet stages 2-4 (res3-res5), which now train their
# norm layers (norm_eval=False); the stem and stage 1 (the paper's "conv1 and conv2 stages") stay
# frozen (frozen_stages=1). FPN and box head as in faster-rcnn_r50_fpn_gn-head_1x_coco.py.
# Pretrained: open-mmlab://detectron/resnet50_gn (Detectron's GN ResNet-50, as mmdet's gn/ configs
# use; it expects BGR input with std 1, hence the data preprocessor).
_base_ = './faster-rcnn_r50_fpn_gn-head_1x_coco.py'
model = dict(
    data_preprocessor=dict(mean=[103.530, 116.280, 123.675], std=[1.0, 1.0, 1.0], bgr_to_rgb=False),
    backbone=dict(
        frozen_stages=1,
        norm_cfg=_base_.norm_cfg,
        norm_eval=False,
        init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://detectron/resnet50_gn')))
