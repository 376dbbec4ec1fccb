# The paper's ImageNet schedule (Section 4.1): 100 epochs, SGD with momentum 0.9, cosine decay of
# the lr, weight decay 1e-4 on every weight including the normalizers' γ and β (no paramwise_cfg:
# mmengine then decays all parameters alike). The lr here, 0.1, is the paper's for 32 images per
# GPU; each config with N images per GPU sets 0.1 * N / 32. Validated every epoch (Figure 4's test
# curves).
max_epochs = 100
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
val_cfg = dict()
test_cfg = dict()
param_scheduler = [
    dict(type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0, end=max_epochs)
]
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=1e-4))
# 4 GPUs x 32 images; the lr is set per config, never rescaled (enable with --auto-scale-lr only
# when the number of GPUs differs from the paper's 4)
auto_scale_lr = dict(base_batch_size=128)
