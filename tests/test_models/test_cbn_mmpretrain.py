"""CBN inside stock mmpretrain models, built from mmpretrain's own configs, with no patched model code.

``import cbn_mmdet`` registers CBN in mmengine's root ``MODELS``, which mmpretrain's registry falls back
to, so ``norm_cfg=dict(type='CBN', ...)`` in an ``mmpretrain::`` config needs nothing else.
"""
import contextlib
import warnings

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import load_state_dict

import cbn_mmdet  # noqa: F401  (registers CBN and the hooks)
from cbn_mmdet import CBNWarning
from cbn_mmdet.models import BindStatus, CrossIterationBatchNorm2d as CBN

pytest.importorskip('mmpretrain', reason='mmpretrain is an optional extra')

RESNET18_CHILD = """
_base_ = 'mmpretrain::resnet/resnet18_8xb32_in1k.py'
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)
model = dict(backbone=dict(norm_cfg=dict(type='CBN', window=4)))
"""


def build_classifier(tmp_path, text=RESNET18_CHILD, **backbone):
    """Build the model of a config written to ``tmp_path`` (an ``mmpretrain::`` child)."""
    path = tmp_path / 'child.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    for key, value in backbone.items():   # replaced, not merged (ConfigDict.update merges dicts)
        cfg.model.backbone[key] = value
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    return MODELS.build(cfg.model)


def train_steps(model, steps, num_classes=1000, size=64, batch=4):
    from mmpretrain.structures import DataSample
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01,
                            momentum=0.9)
    model.train()
    for step in range(steps):
        torch.manual_seed(step)
        inputs = torch.randn(batch, 3, size, size)
        samples = [DataSample().set_gt_label(int(label))
                   for label in torch.randint(num_classes, (batch,))]
        loss = model.loss(inputs, samples)['loss']
        optim.zero_grad()
        loss.backward()
        optim.step()
        assert torch.isfinite(loss)


def cbn_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, CBN)}


def test_resnet18_config_child_builds_cbn_everywhere_and_every_cbn_compensates(tmp_path):
    model = build_classifier(tmp_path)
    norms = cbn_layers(model)
    # stem 1 + 8 basic blocks x 2 + 3 downsample norms
    assert len(norms) == 20
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, CBN)
                   for m in model.modules())
    assert all(m.window == 4 for m in norms.values())
    # mmcv's abbreviation: the keys of an ImageNet BN checkpoint
    assert 'backbone.bn1' in norms and 'backbone.layer2.0.downsample.1' in norms
    train_steps(model, 3)
    # each CBN normalizes a trainable conv's direct output, so it takes the compensated path
    assert {m.last_bind_status for m in norms.values()} == {BindStatus.CONV}
    assert all(int(m.num_batches_tracked) == 3 for m in norms.values())


def test_norm_eval_and_frozen_stages_treat_cbn_as_bn(tmp_path):
    model = build_classifier(tmp_path, norm_eval=True, frozen_stages=1)
    model.train()
    norms = cbn_layers(model)
    assert norms and not any(m.training for m in norms.values())
    assert not model.backbone.layer1[0].bn1.weight.requires_grad   # frozen stage
    assert model.backbone.layer2[0].bn1.weight.requires_grad

    model = build_classifier(tmp_path, norm_eval=False, frozen_stages=1)
    model.train()
    training = [n for n, m in cbn_layers(model).items() if m.training]
    # frozen: the stem (1) and stage 1 (2 blocks x 2) stay in eval mode
    assert len(training) == 20 - 1 - 4
    assert 'backbone.bn1' not in training and 'backbone.layer2.0.bn1' in training


def test_checkpoint_round_trip_keeps_the_window_history(tmp_path):
    from mmengine.runner.checkpoint import load_checkpoint, save_checkpoint
    model = build_classifier(tmp_path)
    train_steps(model, 2)
    path = str(tmp_path / 'cbn.pth')
    save_checkpoint(model.state_dict(), path)
    restored = build_classifier(tmp_path)
    load_checkpoint(restored, path, strict=True)
    saved, loaded = model.state_dict(), restored.state_dict()
    assert saved.keys() == loaded.keys()
    history_keys = [k for k in saved if k.startswith('backbone.bn1.') and k not in (
        'backbone.bn1.weight', 'backbone.bn1.bias', 'backbone.bn1.running_mean',
        'backbone.bn1.running_var', 'backbone.bn1.num_batches_tracked')]
    assert history_keys   # CBN's window history is part of the checkpoint
    for key in saved:
        torch.testing.assert_close(loaded[key], saved[key], rtol=0, atol=0)
    model.eval()
    restored.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(restored.extract_feat(x), model.extract_feat(x))


def test_bn_checkpoint_loads_into_cbn_resnet18_strictly(tmp_path):
    bn_model = build_classifier(tmp_path, norm_cfg=dict(type='BN'))
    cbn_model = build_classifier(tmp_path)
    result = cbn_model.load_state_dict(bn_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # mmengine's loader (load_from, init_cfg=Pretrained) reports nothing either
    messages = []
    load_state_dict(cbn_model, bn_model.state_dict(), strict=False,
                    logger=type('L', (), {'warning': messages.append})())
    assert not messages


# Which path each CBN layer takes in the architectures of the paper's Table 4 that the detection
# side never met (``last_bind_status`` after training steps; docs/imagenet.md explains each):
# - MobileNet-v2's depthwise convs (groups = channels): compensated like any conv;
# - DenseNet's pre-activation norm1 normalises a concatenation of several layers' outputs (and the
#   transitions' and the final norm a block's concatenation): by default (``concat='fallback'``)
#   not a conv's output, so the BN fallback (current batch only); with ``concat='compensate'``
#   each slice from a layer's conv2, or from a transition (an average pool of its 1x1 conv), is
#   compensated with that conv, the max-pooled stem's channels in block 1 are used as recorded,
#   and block 1's first norm1, which sees only them, takes the BN fallback; each norm2 is
#   compensated;
# - Inception-v3's branches: every BasicConv2d is conv -> BN, all compensated once NormSwitchHook's
#   switch made them CBN (the conv taps find the conv of a layer swapped in after construction).
PATHS = {
    'mobilenet-v2': (dict(type='MobileNetV2', norm_cfg=dict(type='CBN', window=4)), 32,
                     {BindStatus.CONV: 52}),
    'densenet121': (dict(type='DenseNet', arch='121', norm_cfg=dict(type='CBN', window=4)), 32,
                    # 58 dense layers' norm2 + the stem; 58 norm1 + 3 transitions + the final norm
                    {BindStatus.CONV: 1 + 58, BindStatus.NOT_CONV: 58 + 3 + 1}),
    'densenet121-slices': (dict(type='DenseNet', arch='121',
                                norm_cfg=dict(type='CBN', window=4, concat='compensate')), 32,
                           # 57 norm1 + 3 transitions + the final norm; block 1's first norm1
                           {BindStatus.CONV: 1 + 58, BindStatus.CONCAT: 57 + 3 + 1,
                            BindStatus.NOT_CONV: 1}),
    'inception-v3': (dict(type='InceptionV3', num_classes=10, aux_logits=False), 80,
                     {BindStatus.CONV: 94}),
}


@pytest.mark.parametrize('arch', [pytest.param(a, marks=pytest.mark.slow) if a == 'inception-v3'
                                  else a for a in PATHS])
def test_which_path_cbn_takes(arch):
    from collections import Counter

    from mmpretrain.registry import MODELS

    from cbn_mmdet.engine.hooks.norm_switch_hook import switch_norm_layers
    init_default_scope('mmpretrain')
    cfg, size, expected = PATHS[arch]
    torch.manual_seed(0)
    net = MODELS.build(cfg)
    if arch == 'inception-v3':   # nn.BatchNorm2d in its code: switched as the configs' hook does
        assert switch_norm_layers(net, dict(type='CBN', window=4), [torch.nn.BatchNorm2d]) == 94
    net.train()
    optim = torch.optim.SGD(net.parameters(), lr=0.01)
    # a layer that falls back says so, once; so does one with channels used as recorded
    fallback = (warnings.catch_warnings(record=True) if BindStatus.NOT_CONV in expected
                else contextlib.nullcontext())
    with fallback as caught:
        if caught is not None:
            warnings.simplefilter('always', CBNWarning)
        for _ in range(2):   # the second step runs with a history
            out = net(torch.randn(2, 3, size, size))[-1]
            out.square().mean().backward()
            optim.step()
            optim.zero_grad()
    norms = [m for m in net.modules() if isinstance(m, CBN)]
    assert Counter(m.last_bind_status for m in norms) == expected
    if caught is not None:
        said = Counter(str(w.message).split(':')[1].split('(')[0].strip() for w in caught
                       if issubclass(w.category, CBNWarning))
        # densenet121: the 62 concatenation norms fall back to BN; with concat='compensate' block
        # 1's first norm1 does, and its other norm1s and transition use the stem's 64 channels as
        # recorded
        assert said == ({'input is not the output of a trainable conv': 62} if arch == 'densenet121'
                        else {'input is not the output of a trainable conv': 1,
                              'input is a concatenation': 5 + 1})
    if arch == 'mobilenet-v2':
        depthwise = [m for m in net.modules()
                     if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
        assert len(depthwise) == 17
    if arch == 'densenet121':
        layer = net.stages[1].block[3]   # norm1 over the concatenation of 4 + 1 inputs
        assert layer.norm1.last_bind_status == BindStatus.NOT_CONV
        assert layer.norm2.last_bind_status == BindStatus.CONV
    if arch == 'densenet121-slices':
        layer = net.stages[1].block[3]
        assert layer.norm1.last_bind_status == BindStatus.CONCAT
        assert layer.norm2.last_bind_status == BindStatus.CONV
        # the transition's 128 channels (its pooled 1x1 conv) and three conv2s, all compensated
        assert [key[:2] for key in layer.norm1.slice_histories[0].layout] == [
            (0, 128), (128, 32), (160, 32), (192, 32)]
        assert net.stages[0].block[0].norm1.last_bind_status == BindStatus.NOT_CONV


def test_densenet_checkpoint_round_trip_keeps_the_slice_histories():
    """A small DenseNet: the per-slice histories of its concatenation norms are saved and loaded
    strictly, and the restored model continues exactly."""
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    cfg = dict(type='DenseNet', arch=dict(growth_rate=4, depths=(2, 2), init_channels=8),
               norm_cfg=dict(type='CBN', window=3, concat='compensate'))
    torch.manual_seed(0)
    net = MODELS.build(cfg)
    net.train()
    optim = torch.optim.SGD(net.parameters(), lr=0.01)

    def step(model, opt, seed):
        torch.manual_seed(seed)
        out = model(torch.randn(2, 3, 32, 32))[-1]
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        return out.detach()

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', CBNWarning)
        for seed in range(3):
            step(net, optim, seed)
        state = net.state_dict()
        assert 'stages.1.block.1.norm1.slice1_history_var_grad' in state
        assert state['transitions.0.norm.history_slices'].tolist() == [[8, 4], [12, 4]]
        restored = MODELS.build(cfg)
        restored.train()
        assert not restored.load_state_dict(state, strict=True).unexpected_keys
        optim2 = torch.optim.SGD(restored.parameters(), lr=0.01)
        torch.testing.assert_close(step(restored, optim2, 7), step(net, optim, 7), rtol=0, atol=0)
