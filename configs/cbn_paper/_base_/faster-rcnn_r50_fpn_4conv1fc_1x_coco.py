# Faster R-CNN R50-FPN in the paper's COCO setting (Section 4.2), "head" setting with no normalizer:
# the family base of every configs/cbn_paper/faster-rcnn_* config; the leaves only add a normalizer.
#
# * Box head: 4conv1fc (`Shared4Conv1FCBBoxHead`: 4 shared 3x3 convs + 1 fc of 1024) instead of 2fc.
#   The leaves normalize the FPN and the box head ("head" = neck + RoI heads, as in Wu & He's GN
#   paper and the authors' code; mmdet's RPN head has no normalizer).
# * Backbone "fixed BN" = mmdet's default, which is also the authors' mmdet-0.6 default: stem and
#   stage 1 frozen (`frozen_stages=1`), BN statistics frozen (`norm_eval=True`), BN affine parameters
#   trainable (`requires_grad=True`; mmdet-0.6's `frozen=False`).
# * Schedule, optimizer: _base_/paper_1x.py. 4 images per GPU here.
#
# Pretrained weights: torchvision's ResNet-50 (ImageNet, BN). Train on 4 GPUs with
#   tools/dist_train.sh CONFIG 4     or tools/run_table.py (README: "Reproducing the paper").
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
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
