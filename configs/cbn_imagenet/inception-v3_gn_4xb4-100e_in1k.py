# Inception-v3, 4 images per GPU x 4 GPUs, GN, 16 groups in every layer (every width of
# Inception-v3 is a multiple of 16; 48 and 80 are not multiples of 32).
_base_ = './_base_/inception-v3_4xb32-100e_in1k.py'
# mmpretrain's Inception-v3 builds nn.BatchNorm2d in its code; cbn_mmdet's subclass builds its
# norms from norm_cfg when it is constructed (tools/test.py builds the same layers).
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet.mmpretrain_models'],
                      allow_failed_imports=False)
norm_cfg = dict(type='GN', num_groups=16)
model = dict(backbone=dict(type='InceptionV3WithNormCfg', norm_cfg=norm_cfg))
train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.0125))  # 0.1 * 4 / 32
