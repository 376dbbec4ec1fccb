# retinanet_r18_fpn_demo-shapes.py with BN in the shared head's stacked convs: the control of the CBN
# variants. Each call (FPN level) is normalised with its own batch statistics in training; the running
# statistics, one set per layer, take all levels' updates (BN's known trouble in shared heads, hence
# mmdet's GN default). No CBN layer, so no burn-in hook.
_base_ = './retinanet_r18_fpn_demo-shapes.py'
# _delete_: replace the base's CBN settings (window) instead of merging into them
head_norm_cfg = dict(_delete_=True, type='BN', requires_grad=True)
model = dict(bbox_head=dict(norm_cfg=head_norm_cfg))
custom_hooks = [dict(type='RNGStateHook')]
