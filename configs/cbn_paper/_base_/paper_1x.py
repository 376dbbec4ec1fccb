# The paper's training schedule for COCO (Section 4.2), shared by the Faster and Mask R-CNN family
# bases: 4 GPUs x 4 images (16 per iteration; the batch size per GPU is in the family bases),
# SGD lr 0.02 (= 0.02 * 16 / 16), momentum 0.9, weight decay 1e-4, 12 epochs.
#
# The paper decays the lr x0.1 "at the 9th and the 11th epochs". mmdet's 1x schedule (and the
# authors' mmdet-0.6 `step=[8, 11]`) does it with MultiStepLR milestones=[8, 11], epochs counted from
# 0: epochs 0-7 at 0.02, 8-10 at 0.002, epoch 11 (the 12th) at 0.0002. It is Detectron's 1x schedule
# (steps at 60k and 80k of 90k iterations of 16 images = during the 9th and the 11th epochs, at
# epochs 8.2 and 10.9) rounded to whole epochs. Linear warm-up over 500 iterations (mmdet 3.x default).
# Gradients are clipped at 35 (L2), as in the authors' released configs (mmdet v1 default).
# Norm statistics are per GPU: no `sync_bn` (only the SyncBN configs synchronise, by their norm type).
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    clip_grad=dict(max_norm=35, norm_type=2))
auto_scale_lr = dict(enable=False, base_batch_size=16)
