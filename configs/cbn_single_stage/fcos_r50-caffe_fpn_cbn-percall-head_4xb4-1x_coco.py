# fcos_r50-caffe_fpn_cbn-head_4xb4-1x_coco.py with one CBN history per FPN level: the i-th call of an
# iteration (level P(3+i)) is normalised with the i-th calls of the past iterations. per_call = the
# number of calls per forward = the neck's num_outs (5), read from the base when this file is parsed
# (a --cfg-options change of model.neck.num_outs must set model.bbox_head.norm_cfg.per_call too).
# Pretrained: open-mmlab://detectron/resnet50_caffe.
_base_ = './fcos_r50-caffe_fpn_cbn-head_4xb4-1x_coco.py'
norm_cfg = dict(type='CBN', window=4, per_call={{_base_.model.neck.num_outs}})
model = dict(bbox_head=dict(norm_cfg=norm_cfg))
