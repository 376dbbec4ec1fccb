# fcos_r18_fpn_demo-shapes.py with GN (32 groups, mmdet's FCOSHead default) in the shared head's
# stacked convs: the baseline of the CBN variants. No CBN layer, so no burn-in hook.
_base_ = './fcos_r18_fpn_demo-shapes.py'
# _delete_: replace the base's CBN settings (window) instead of merging into them
head_norm_cfg = dict(_delete_=True, type='GN', num_groups=32, requires_grad=True)
model = dict(bbox_head=dict(norm_cfg=head_norm_cfg))
custom_hooks = [dict(type='RNGStateHook')]
