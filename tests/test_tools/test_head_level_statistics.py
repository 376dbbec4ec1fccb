"""tools/analysis/head_level_statistics.py: recomputed per-level / shared statistics of a shared head's
BN-type norms, checked on the demo RetinaNet head with features of known per-level statistics."""
import os.path as osp
import sys

import pytest
import torch

from conftest import REPO_ROOT as REPO  # noqa: E402

sys.path.insert(0, osp.join(REPO, 'tools', 'analysis'))
import head_level_statistics as hls  # noqa: E402

LEVEL_SIZES = (16, 8, 4, 2, 1)


class FakeDetector(torch.nn.Module):
    """``data_preprocessor`` / ``extract_feat`` / ``bbox_head``, as the tool uses a detector: each
    "batch" is already the list of FPN features."""

    def __init__(self, head):
        super().__init__()
        self.bbox_head = head

    def data_preprocessor(self, data, training):
        return {'inputs': data}

    def extract_feat(self, inputs):
        return inputs


@pytest.fixture
def detector():
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    import cbn_mmdet  # noqa: F401
    init_default_scope('mmdet')
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'demo',
                                   'retinanet_r18_fpn_cbn-percall-head_demo-shapes.py'))
    torch.manual_seed(0)
    return FakeDetector(MODELS.build(cfg.model.bbox_head)).eval()


def _batches(channels, n=3):
    g = torch.Generator().manual_seed(1)
    # level i: offset 2 i, scale 1 + i, so that the levels' statistics differ
    return [[torch.randn(2, channels, s, s, generator=g) * (1 + i) + 2 * i
             for i, s in enumerate(LEVEL_SIZES)] for _ in range(n)]


def _first_conv_outputs(head, batches, level):
    conv = head.cls_convs[0].conv
    with torch.no_grad():
        return torch.cat([conv(b[level]).permute(1, 0, 2, 3).reshape(conv.out_channels, -1)
                          for b in batches], 1)


@pytest.mark.parametrize('per_level', [True, False])
def test_recomputed_statistics_are_those_of_the_inputs(detector, per_level):
    head = detector.bbox_head
    batches = _batches(head.in_channels)
    stats = hls.recompute(detector, batches, num_levels=5, per_level=per_level)
    assert len(stats) == 8  # 4 cls + 4 reg norms, depth by depth
    first = stats[0]
    assert first.layer is head.cls_convs[0].norm
    levels = range(5) if per_level else [None]
    for slot, level in enumerate(levels):
        x = (_first_conv_outputs(head, batches, level) if level is not None else
             torch.cat([_first_conv_outputs(head, batches, i) for i in range(5)], 1))
        torch.testing.assert_close(first.mean[slot], x.mean(1), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(first.var[slot], x.var(1), rtol=1e-3, atol=1e-4)
    if per_level:  # the levels were made to differ; the tool keeps them apart
        assert (first.mean[4] - first.mean[0]).abs().max() > 0.1


def test_per_level_statistics_normalise_each_level(detector):
    """Applied in evaluation, each level's first-norm output has zero mean and unit variance (before
    the affine) over the batches the statistics came from."""
    head = detector.bbox_head
    batches = _batches(head.in_channels)
    stats = hls.recompute(detector, batches, num_levels=5, per_level=True)
    norm = head.cls_convs[0].norm
    outputs = {i: [] for i in range(5)}
    calls = []
    hook = norm.register_forward_hook(
        lambda m, inp, out: outputs[len(calls) % 5].append(
            ((out - m.bias[None, :, None, None]) / m.weight[None, :, None, None]).detach())
        or calls.append(1))
    with torch.no_grad():
        for b in batches:
            for s in stats:
                s.reset()
            head(b)
    hook.remove()
    for i in range(5):
        y = torch.cat([o.permute(1, 0, 2, 3).reshape(o.shape[1], -1) for o in outputs[i]], 1)
        torch.testing.assert_close(y.mean(1), torch.zeros(y.shape[0]), atol=1e-3, rtol=0)
        torch.testing.assert_close(y.var(1), torch.ones(y.shape[0]), atol=2e-2, rtol=0)
