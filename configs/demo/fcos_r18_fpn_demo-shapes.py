# FCOS, slim ResNet-18 + FPN (P3-P7), trained from scratch on the generated demo shapes dataset:
# retinanet_r18_fpn_demo-shapes.py (backbone, data, schedule, CBN pooled in the head, burn-in) with
# mmdet's FCOS neck settings and FCOSHead (4 cls + 4 reg 3x3 convs, shared across the 5 levels, so each
# of its 8 norm layers runs 5 times per forward). Variants: fcos_r18_fpn_cbn-percall-head_demo-shapes.py
# (one CBN history per level), fcos_r18_fpn_gn-head_demo-shapes.py (GN: mmdet's FCOS head default).
# No pretrained weights are used anywhere.
_base_ = './retinanet_r18_fpn_demo-shapes.py'

head_norm_cfg = dict(type='CBN', window=4, requires_grad=True)
fpn_channels = {{_base_.fpn_channels}}
num_classes = {{_base_.num_classes}}

model = dict(
    type='FCOS',
    # mmdet's fcos_r50-caffe_fpn_gn-head_1x_coco.py: P6 from P5, ReLU before the extra convs
    neck=dict(add_extra_convs='on_output', relu_before_extra_convs=True),
    bbox_head=dict(
        _delete_=True,
        type='FCOSHead',
        num_classes=num_classes,
        in_channels=fpn_channels,
        stacked_convs=4,
        feat_channels=fpn_channels,
        strides=[8, 16, 32, 64, 128],
        # mmdet's ranges (-1, 64, 128, 256, 512, inf) divided by 4 for 128 px images with 19-77 px
        # shapes, so that every level up to P6 gets objects
        regress_ranges=((-1, 16), (16, 32), (32, 64), (64, 128), (128, 1e8)),
        norm_cfg=head_norm_cfg,
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='IoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    train_cfg=None)  # FCOS has no assigner/sampler settings
