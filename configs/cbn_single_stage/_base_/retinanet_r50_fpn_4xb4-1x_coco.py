# RetinaNet R50-FPN, 1x COCO, as mmdet's retinanet_r50_fpn_1x_coco.py (no normalizer in the FPN or the
# head, fixed-BN backbone, SGD lr 0.01 for 16 images, 12 epochs, steps at epochs 8 and 11), laid out
# as 4 GPUs x 4 images like configs/cbn_paper: the family base of the retinanet_* configs here, which
# only add a normalizer to the head's stacked convs. 4 images per GPU is what makes the CBN leaves'
# window k = 4 the paper's rule min(ceil(16 / images per GPU), 8).
#
# Pretrained weights: torchvision's ResNet-50 (ImageNet, BN). Train on 4 GPUs with
#   tools/dist_train.sh CONFIG 4
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
# in the model family base, so that swapping the schedule keeps the plugin
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        # the file mmengine's 'torchvision://resnet50' names, by its URL: no torchvision needed
        init_cfg=dict(type='Pretrained',
                      checkpoint='https://download.pytorch.org/models/resnet50-0676ba61.pth')))

train_dataloader = dict(batch_size=4, num_workers=4)
