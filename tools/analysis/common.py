"""Shared pieces of the analysis scripts: data (scikit-learn's digits), small models, norm layers, output.

The data is scikit-learn's ``load_digits`` (1797 real 8×8 grey-level images of handwritten digits, shipped
inside the package, no download), upsampled bilinearly to ``size × size`` and standardised with the
training split's mean and std. The split is fixed (stratified, 1197 train / 600 test images, seed 0).
"""
import math
import os
import os.path as osp
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import cbn_mmdet  # noqa: E402,F401  (registers CBN / BRN in mmengine's MODELS registry)
from cbn_mmdet.models import CrossIterationBatchNorm2d  # noqa: E402

NUM_CLASSES = 10
NUM_TEST = 600


def load_digits_tensors(size: int = 16, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)``: digits upsampled to ``size``², float32, standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.long)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode='bilinear', align_corners=False)
    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(), test_size=NUM_TEST,
                                           stratify=labels.numpy(), random_state=seed)
    x_train, x_test = images[idx_train], images[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return ((x_train - mean) / std, labels[idx_train], (x_test - mean) / std, labels[idx_test])


def norm_factory(kind: str, *, window: int = 1, momentum: float = 0.1, running_stats: str = 'window',
                 gn_groups: int = 8, brn_iters=(0, 1, 1)) -> Callable[[int], nn.Module]:
    """``C -> norm layer`` through mmcv's ``build_norm_layer`` (the path an mmdet config takes).

    ``kind``: ``'BN'``, ``'GN'``, ``'BRN'``, ``'CBN'`` or ``'NaiveCBN'`` (CBN with ``compensate=False``).
    ``brn_iters``: BRN's ``(warmup_iters, rmax_iters, dmax_iters)``.
    """
    from mmcv.cnn import build_norm_layer

    def make(channels: int) -> nn.Module:
        if kind == 'BN':
            cfg = dict(type='BN', momentum=momentum)
        elif kind == 'GN':
            cfg = dict(type='GN', num_groups=min(gn_groups, channels))
        elif kind == 'BRN':
            warmup, rmax_iters, dmax_iters = brn_iters
            cfg = dict(type='BRN', momentum=momentum, warmup_iters=warmup, rmax_iters=rmax_iters,
                       dmax_iters=dmax_iters)
        elif kind in ('CBN', 'NaiveCBN'):
            cfg = dict(type='CBN', window=window, compensate=kind == 'CBN', momentum=momentum,
                       running_stats=running_stats)
        else:
            raise ValueError(f"unknown norm kind {kind!r}; allowed: 'BN', 'GN', 'BRN', 'CBN', 'NaiveCBN'")
        return build_norm_layer(cfg, channels)[1]

    return make


class ConvNormAct(nn.Sequential):
    """conv (no bias) → norm → ReLU."""

    def __init__(self, cin, cout, norm, stride=1):
        super().__init__(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm(cout), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-norm-ReLU-conv-norm + (conv1×1-norm) shortcut, ReLU."""

    def __init__(self, cin, cout, norm, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + identity, inplace=True)


class SmallResNet(nn.Module):
    """A small ResNet-style classifier: stem conv, three basic blocks (16, 32, 64 channels), GAP, fc."""

    def __init__(self, norm, widths=(16, 32, 64), in_channels=1, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = ConvNormAct(in_channels, widths[0], norm)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, norm, stride=1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """A plain CNN (item 3): conv-norm-ReLU layers, global average pool, linear classifier.

    Default: four layers, 16, 32, 64, 64 channels, strides 1, 2, 2, 1 (16×16 input: 16×16 … 4×4 maps).
    """

    def __init__(self, norm, widths=(16, 32, 64, 64), strides=(1, 2, 2, 1), in_channels=1,
                 num_classes=NUM_CLASSES):
        super().__init__()
        layers, cin = [], in_channels
        for w, s in zip(widths, strides):
            layers.append(ConvNormAct(cin, w, norm, stride=s))
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


#: item 3's models: the default CNN, and one whose last layers see 2×2 and 1×1 maps (16×16 input)
CNN_VARIANTS = {
    'cnn': dict(widths=(16, 32, 64, 64), strides=(1, 2, 2, 1)),
    'cnn-1x1': dict(widths=(16, 32, 64, 64, 64), strides=(1, 2, 2, 2, 2)),
}


class VGGNet(nn.Module):
    """A VGG-style plain conv net (item 2): [conv-norm-ReLU]×2 per stage, max-pool, 4 stages, GAP, fc."""

    def __init__(self, norm, widths=(16, 32, 64, 128), in_channels=1, num_classes=NUM_CLASSES):
        super().__init__()
        layers, cin = [], in_channels
        for i, w in enumerate(widths):
            if i:
                layers.append(nn.MaxPool2d(2))
            layers += [ConvNormAct(cin, w, norm), ConvNormAct(w, w, norm)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def cbn_layers(model: nn.Module) -> Dict[str, CrossIterationBatchNorm2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}


def set_active_window(model: nn.Module, window: int) -> None:
    for m in cbn_layers(model).values():
        m.active_window = min(window, m.window)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 200) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was_training)
    return correct / len(y)


def markdown_table(header: List[str], rows: List[List], align: Optional[str] = None) -> str:
    lines = ['| ' + ' | '.join(header) + ' |',
             '|' + '|'.join(['---'] * len(header) if align is None else align) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as pyplot
    return pyplot


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return f'{value:.{digits}g}' if abs(value) < 1e-3 and value != 0 else f'{value:.{digits}f}'
