"""CBN inside stock mmdet/mmcv models, with no forked or patched model code."""
import copy
import os

import pytest
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule, build_norm_layer
from mmengine.config import Config
from mmengine.registry import DefaultScope, init_default_scope
from mmengine.runner.checkpoint import load_state_dict

import cbn_mmdet  # noqa: F401  (registers CBN)
from cbn_mmdet.models import BindStatus, CrossIterationBatchNorm2d as CBN


@pytest.mark.parametrize('scope', [None, 'mmdet'])
def test_build_norm_layer_resolves_cbn_and_names_it_bn(scope):
    cfg = dict(type='CBN', window=2, requires_grad=True)
    if scope is None:
        name, layer = build_norm_layer(cfg, 16, postfix=1)
    else:
        with DefaultScope.overwrite_default_scope(scope):
            name, layer = build_norm_layer(cfg, 16, postfix=1)
    assert name == 'bn1' and isinstance(layer, CBN) and layer.window == 2
    assert isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)


def test_build_norm_layer_rejects_bad_window():
    with pytest.raises(ValueError, match='window'):
        build_norm_layer(dict(type='CBN', window=0), 8)
    with pytest.raises(TypeError, match='windw'):
        build_norm_layer(dict(type='CBN', windw=4), 8)


def _faster_rcnn_cfg(norm_cfg):
    import mmdet
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                                       'faster_rcnn', 'faster-rcnn_r50_fpn_1x_coco.py'))
    model = cfg.model
    model.backbone.update(norm_cfg=norm_cfg, norm_eval=False, frozen_stages=1, init_cfg=None)
    model.neck.update(norm_cfg=norm_cfg)
    model.roi_head.bbox_head = dict(
        type='Shared4Conv1FCBBoxHead', conv_out_channels=64, fc_out_channels=64, in_channels=256,
        roi_feat_size=7, num_classes=80, norm_cfg=norm_cfg,
        bbox_coder=model.roi_head.bbox_head.bbox_coder, reg_class_agnostic=False,
        loss_cls=model.roi_head.bbox_head.loss_cls, loss_bbox=model.roi_head.bbox_head.loss_bbox)
    model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=100)
    model.train_cfg.rcnn.sampler.num = 32
    return model


def _demo_batch(model, seed):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(seed)
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 128)] * 2, num_items=[3, 2],
                            num_classes=80)
    return model.data_preprocessor(packed, True)


def test_faster_rcnn_r50_fpn_all_layers_trains_and_every_cbn_finds_its_conv():
    """Backbone (stages 2-4), FPN and 4conv1fc head with CBN: all training-mode CBNs bind a conv."""
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(_faster_rcnn_cfg(dict(type='CBN', window=3, requires_grad=True)))
    model.train()
    optim = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(3):
        data = _demo_batch(model, step)
        losses = model.loss(data['inputs'], data['data_samples'])
        loss, _ = model.parse_losses(losses)
        optim.zero_grad()
        loss.backward()
        optim.step()
        assert torch.isfinite(loss)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, CBN)}
    training = {n: m for n, m in norms.items() if m.training}
    # R50 stages 2-4: (4 + 6 + 3) blocks x 3 norms + 3 downsample norms = 42; FPN: 4 lateral + 4
    # output convs = 8; head: 4 convs = 4. Stem and stage 1 are frozen (frozen_stages=1, eval).
    assert len(training) == 42 + 8 + 4
    assert len(norms) - len(training) == 1 + 3 * 3 + 1
    unbound = {n: m.last_bind_status for n, m in training.items()
               if m.last_bind_status != BindStatus.CONV}
    assert not unbound
    assert all(m.history_length == 2 for m in training.values())
    assert all(m.last_bind_status is None for n, m in norms.items() if n not in training)
    # and names are BN's, so ImageNet BN checkpoints map onto it
    assert 'backbone.layer2.0.bn1' in norms and 'backbone.layer2.0.downsample.1' in norms


def test_norm_eval_and_frozen_stages_treat_cbn_as_bn():
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    backbone = MODELS.build(dict(type='ResNet', depth=18, norm_cfg=dict(type='CBN', window=2),
                                 norm_eval=True, frozen_stages=1, init_cfg=None))
    backbone.train()
    norms = [m for m in backbone.modules() if isinstance(m, CBN)]
    assert norms and not any(m.training for m in norms)
    assert not backbone.layer1[0].bn1.weight.requires_grad  # frozen stage


def test_bn_checkpoint_loads_into_cbn_resnet_strictly():
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    bn_net = MODELS.build(dict(type='ResNet', depth=18, init_cfg=None))
    cbn_net = MODELS.build(dict(type='ResNet', depth=18, norm_cfg=dict(type='CBN', window=4),
                                init_cfg=None))
    result = cbn_net.load_state_dict(bn_net.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # mmengine's loader (used by load_from / resume) also reports nothing
    messages = []
    load_state_dict(cbn_net, bn_net.state_dict(), strict=False,
                    logger=type('L', (), {'warning': messages.append})())
    assert not messages


def test_fuse_conv_bn_folds_cbn_in_eval():
    from mmcv.cnn import fuse_conv_bn
    torch.manual_seed(0)
    block = nn.Sequential(ConvModule(3, 8, 3, padding=1, norm_cfg=dict(type='CBN', window=2)),
                          ConvModule(8, 4, 1, norm_cfg=dict(type='CBN', window=2)))
    optim = torch.optim.SGD(block.parameters(), lr=0.1)
    for _ in range(3):
        block(torch.randn(2, 3, 8, 8)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    block.eval()
    x = torch.randn(2, 3, 8, 8)
    ref = block(x)
    fused = fuse_conv_bn(copy.deepcopy(block))
    assert not any(isinstance(m, CBN) for m in fused.modules())
    torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-5)


def test_norm_decay_mult_applies_to_cbn():
    from mmengine.optim import build_optim_wrapper
    init_default_scope('mmdet')
    model = nn.Sequential(ConvModule(3, 8, 3, norm_cfg=dict(type='CBN', window=2)))
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
        paramwise_cfg=dict(norm_decay_mult=0.0)))
    decay = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert decay[id(model[0].bn.weight)] == 0.0 and decay[id(model[0].conv.weight)] == 1e-4
