# Table 5, "fixed BN / -": Faster R-CNN R50-FPN, 4conv1fc box head and FPN without normalizer.
# Pretrained: torchvision's ResNet-50.
_base_ = './_base_/faster-rcnn_r50_fpn_4conv1fc_1x_coco.py'
