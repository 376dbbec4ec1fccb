# Mask R-CNN, slim ResNet-18 + FPN, 4conv1fc box head and 4conv mask head, trained from scratch on
# the generated demo shapes dataset (boxes + instance masks): faster-rcnn_r18_fpn_demo-shapes.py (same
# model, data and schedule) plus the mask branch and the mask annotations. No pretrained weights are
# used anywhere.
_base_ = './faster-rcnn_r18_fpn_demo-shapes.py'

# The mask head is normalized like the neck and the box head.
head_norm_cfg = {{_base_.head_norm_cfg}}
fpn_channels = {{_base_.fpn_channels}}
num_classes = {{_base_.num_classes}}
image_size = {{_base_.image_size}}
backend_args = {{_base_.backend_args}}

# What mmdet's mask-rcnn_r50_fpn.py adds to its faster-rcnn_r50_fpn.py, at this model's width.
model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(pad_mask=True),
    roi_head=dict(
        mask_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels=fpn_channels,
            featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead',
            num_convs=4,
            in_channels=fpn_channels,
            conv_out_channels=fpn_channels,
            num_classes=num_classes,
            loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0),
            norm_cfg=head_norm_cfg)),
    train_cfg=dict(rcnn=dict(assigner=dict(match_low_quality=True), mask_size=28)),
    test_cfg=dict(rcnn=dict(mask_thr_binary=0.5)))

# The data of demo_shapes_detection.py with the instance masks loaded; evaluated on boxes and masks.
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile', backend_args=backend_args),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(metric=['bbox', 'segm'])
test_evaluator = val_evaluator
