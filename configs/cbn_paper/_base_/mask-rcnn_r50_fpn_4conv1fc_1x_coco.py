# Mask R-CNN R50-FPN in the paper's COCO setting, "head" setting with no normalizer: the family base
# of every configs/cbn_paper/mask-rcnn_* config. As faster-rcnn_r50_fpn_4conv1fc_1x_coco.py
# (4conv1fc box head, fixed-BN backbone, 4 images per GPU, _base_/paper_1x.py), plus mmdet's FCN mask
# head (4 convs), which the leaves normalize like the FPN and the box head. Evaluated on boxes and
# masks.
#
# Pretrained weights: torchvision's ResNet-50 (ImageNet, BN).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/default_runtime.py',
    './paper_1x.py',
]
# in the model family base, so that swapping the schedule base keeps the plugin
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)

# No normalizer in the FPN and the RoI heads (their defaults); a leaf's norm_cfg merges in.
model = dict(
    backbone=dict(
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        # the file mmengine's 'torchvision://resnet50' names, by its URL: no torchvision needed
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://download.pytorch.org/models/resnet50-0676ba61.pth')),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256)))

train_dataloader = dict(batch_size=4, num_workers=4)
