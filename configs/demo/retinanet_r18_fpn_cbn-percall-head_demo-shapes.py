# retinanet_r18_fpn_demo-shapes.py with one CBN history per FPN level in the shared head: the i-th
# call of the head's norm layers in an iteration (level P(3+i)) is normalised with the i-th calls of
# the past iterations. per_call is the number of calls per forward = the neck's num_outs (5).
_base_ = './retinanet_r18_fpn_demo-shapes.py'
head_norm_cfg = dict(
    type='CBN', window=4, per_call={{_base_.model.neck.num_outs}}, requires_grad=True)
model = dict(bbox_head=dict(norm_cfg=head_norm_cfg))
