"""Shared pieces of the analysis scripts: options and outputs, data, models, the demo detector.

The data is scikit-learn's ``load_digits`` (1797 real 8×8 grey-level images of handwritten digits, shipped
inside the package, no download), upsampled bilinearly to ``size × size`` and standardised with the
training split's mean and std. The split is fixed (stratified, 1197 train / 600 test images, seed 0).
"""
import argparse
import json
import math
import os
import os.path as osp
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOOLS_DIR = osp.join(REPO_ROOT, 'tools')
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
if TOOLS_DIR not in sys.path:
    sys.path.append(TOOLS_DIR)  # last: its train.py and test.py must not shadow other modules

import cbn_mmdet  # noqa: E402,F401  (registers CBN / BRN in mmengine's MODELS registry)
from cbn_mmdet.models import CrossIterationBatchNorm2d  # noqa: E402
from seed_stats import format_mean_std, mean_std  # noqa: E402,F401  (tools/seed_stats.py)
from short_run import shrink_config  # noqa: E402  (tools/short_run.py)

#: where the scripts write their outputs by default
EVIDENCE_DIR = osp.join(REPO_ROOT, 'docs', 'evidence')

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
    """A plain CNN (the batch-size study): conv-norm-ReLU layers, global average pool, linear classifier.

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


#: the batch-size study's models: the default CNN, and one whose last layers see 2×2 and 1×1 maps (16×16 input)
CNN_VARIANTS = {
    'cnn': dict(widths=(16, 32, 64, 64), strides=(1, 2, 2, 1)),
    'cnn-1x1': dict(widths=(16, 32, 64, 64, 64), strides=(1, 2, 2, 2, 2)),
}


class VGGNet(nn.Module):
    """A VGG-style plain conv net (the gradient-ratio study): [conv-norm-ReLU]×2 per stage, max-pool, 4 stages, GAP, fc."""

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


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Lay out ``fig``, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt().close(fig)


def fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '–'
    return f'{value:.{digits}g}' if abs(value) < 1e-3 and value != 0 else f'{value:.{digits}f}'


def mean(values) -> float:
    """The mean of ``values``; NaN when there is none."""
    values = list(values)
    return sum(values) / len(values) if values else float('nan')


# ---------------------------------------------------------------------------------- options, outputs
def analysis_parser(doc: str, quick: str, out: Optional[str] = EVIDENCE_DIR, out_help: Optional[str] = None,
                    threads: str = 'torch threads') -> argparse.ArgumentParser:
    """An argument parser with the options of every analysis script.

    ``--out`` (default ``out``, help ``out_help``), ``--threads`` (default 1, help ``threads``) and
    ``--quick`` (help ``quick``). The description is the first line of ``doc``.
    """
    parser = argparse.ArgumentParser(description=doc.split('\n')[0])
    parser.add_argument('--out', default=out, help=out_help)
    parser.add_argument('--threads', type=int, default=1, help=threads)
    parser.add_argument('--quick', action='store_true', help=quick)
    return parser


class Report:
    """A study's outputs ``OUT/NAME.{md,json,png}``, and the wall time since the report was made."""

    def __init__(self, out: str, name: str):
        self.out, self.name = out, name
        self.start = time.time()

    @property
    def seconds(self) -> float:
        """Wall-clock seconds since the report was made."""
        return time.time() - self.start

    def path(self, suffix: str) -> str:
        """``OUT/NAME<suffix>``."""
        return osp.join(self.out, self.name + suffix)

    def write(self, md: str, data: dict, plot: Optional[Callable[[str], None]] = None,
              indent: Optional[int] = None) -> None:
        """Print ``md`` and write it to ``NAME.md``, ``data`` to ``NAME.json`` and, with ``plot``,
        ``plot(path of NAME.png)``."""
        print(md)
        ensure_dir(self.out)
        with open(self.path('.md'), 'w') as f:
            f.write(md)
        with open(self.path('.json'), 'w') as f:
            json.dump(data, f, indent=indent)
        if plot is not None:
            plot(self.path('.png'))


# ---------------------------------------------------------------------------------- statistics studies
#: the estimates of a CBN layer's window statistics that the statistics studies compare with an oracle
ESTIMATES = ('CBN', 'Naive CBN', 'BN', 'Own-layer exact')
#: those drawn over the iterations (own-layer exact is a diagnostic)
PLOTTED_ESTIMATES = ('CBN', 'Naive CBN', 'BN')
ERROR_STYLES = {'CBN': '-', 'Naive CBN': '--', 'BN': ':', 'Own-layer exact': '-.'}
ERROR_LABELS = {'e_mu': 'e_μ (mean error / σ*)', 'e_sigma': 'e_σ (relative σ error)'}


def errors(est_mean, est_var, o_mean, o_var, eps=1e-12):
    """``(e_μ, e_σ)`` of the estimate ``(est_mean, est_var)`` against the oracle's ``(o_mean, o_var)``:
    ``rms_c((μ − μ*)/σ*)`` and ``rms_c((σ − σ*)/σ*)``."""
    o_std = o_var.clamp_min(eps).sqrt()
    e_mu = (((est_mean - o_mean) / o_std) ** 2).mean().sqrt()
    e_sigma = (((est_var.clamp_min(0).sqrt() - o_std) / o_std) ** 2).mean().sqrt()
    return float(e_mu), float(e_sigma)


def plot_errors(ax, records, ks, methods, key, colours, layers=None, tick_labels=None) -> None:
    """The mean ``key`` (``'e_mu'`` or ``'e_sigma'``) of ``records``, a line per window k and method,
    on a log axis: over the iterations, or per layer of ``layers`` (ticks ``tick_labels``)."""
    per_layer = layers is not None
    for k in ks:
        x = list(range(len(layers))) if per_layer else sorted({r['iter'] for r in records if r['k'] == k})
        for method in methods:
            sel = [r for r in records if r['k'] == k and r['method'] == method]
            if per_layer:
                ys = [mean(r[key] for r in sel if r['layer'] == name) for name in layers]
            else:
                ys = [mean(r[key] for r in sel if r['iter'] == i) for i in x]
            markers = dict(marker='o', ms=3) if per_layer else {}
            ax.plot(x, ys, ERROR_STYLES[method], color=colours[k], label=f'{method}, k={k}', **markers)
    if per_layer:
        ax.set_xticks(list(range(len(layers))))
        ax.set_xticklabels(tick_labels or layers, rotation=60, fontsize=7)
    else:
        ax.set_xlabel('iteration')
        ax.set_ylabel(ERROR_LABELS[key])
    ax.set_yscale('log')
    ax.grid(True, which='both', alpha=0.3)


# ---------------------------------------------------------------------------------- the demo detector
class TrainingLosses(Hook):
    """Keeps the loss of every training iteration in ``losses``."""
    priority = 'LOWEST'

    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        loss = (outputs or {}).get('loss')
        if loss is not None:
            self.losses.append(float(loss.detach() if hasattr(loss, 'detach') else loss))


class RunRecord(TrainingLosses):
    """Training losses, the start times of training and evaluation, and the evaluation's metrics."""

    def __init__(self):
        super().__init__()
        self.times, self.metrics = {}, None

    def before_train(self, runner):
        self.times['train_start'] = time.perf_counter()

    def before_val(self, runner):
        self.times['val_start'] = time.perf_counter()

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics or {})
        self.times['val_end'] = time.perf_counter()


#: the detector the detector studies train from scratch
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'faster-rcnn_r18_fpn_demo-shapes.py')
#: the demo dataset (configs/_base_/datasets/demo_shapes_detection.py) and the tiny one of --quick
DEMO_DATA = dict(num_train=800, num_val=200, image_size=128, seed=0)
QUICK_DATA = dict(num_train=8, num_val=4, image_size=64, seed=0, min_objects=1, max_objects=3)


def detector_parser(doc: str, name: str, iters: int, quick: str, work_dir: str,
                    threads: str = 'torch threads') -> argparse.ArgumentParser:
    """:func:`analysis_parser` with the options of a study that trains the demo detector.

    ``name`` names the default work directory, ``iters`` is the default of ``--iters``, ``work_dir``
    says what goes under ``--work-dir``; ``quick`` and ``threads`` are the help of those options.
    """
    parser = analysis_parser(doc, quick, out=None, out_help='default docs/evidence (--quick: WORK_DIR)',
                             threads=threads)
    parser.add_argument('--work-dir', default=None,
                        help=f'{work_dir} (default work_dirs/{name}, work_dirs/{name}_quick with --quick)')
    parser.add_argument('--iters', type=int, default=None, help=f'training iterations (default {iters})')
    parser.add_argument('--burn-in', type=int, default=None,
                        help='iterations with CBN window 1 (default: iters // 4)')
    parser.add_argument('--warmup', type=int, default=None,
                        help='linear warm-up iterations (default: iters // 8)')
    parser.add_argument('--batch-size', type=int, default=2, help='images per iteration (1 process)')
    parser.add_argument('--lr', type=float, default=None,
                        help='default 0.04 · sqrt(batch size / 8): 0.02 at 2 images')
    parser.add_argument('--data-root', default=None,
                        help='default data/demo_shapes (the demo data; --quick: WORK_DIR/data, tiny)')
    return parser


def resolve_detector_args(args, name: str, iters: int, quick_iters: int) -> None:
    """Fill in the defaults of :func:`detector_parser`'s options (see their help), in place.

    Also sets ``args.generation``, the demo data's generation arguments (:data:`QUICK_DATA` with
    ``--quick``, else :data:`DEMO_DATA` at ``args.image_size`` where the script has that option).
    """
    if args.quick:
        args.iters = args.iters or quick_iters
        args.generation = QUICK_DATA
        args.work_dir = args.work_dir or osp.join(REPO_ROOT, 'work_dirs', f'{name}_quick')
        args.data_root = args.data_root or osp.join(args.work_dir, 'data')
    else:
        size = getattr(args, 'image_size', DEMO_DATA['image_size'])
        args.iters = args.iters or iters
        args.generation = dict(DEMO_DATA, image_size=size)
        args.work_dir = args.work_dir or osp.join(REPO_ROOT, 'work_dirs', name)
        suffix = '' if size == DEMO_DATA['image_size'] else f'_{size}'
        args.data_root = args.data_root or osp.join(REPO_ROOT, 'data', 'demo_shapes' + suffix)
    args.work_dir = osp.abspath(args.work_dir)
    args.data_root = osp.abspath(args.data_root)
    args.out = args.out or (args.work_dir if args.quick else EVIDENCE_DIR)
    args.burn_in = args.iters // 4 if args.burn_in is None else args.burn_in
    args.warmup = max(1, args.iters // 8) if args.warmup is None else args.warmup
    args.lr = round(0.04 * math.sqrt(args.batch_size / 8), 4) if args.lr is None else args.lr


def demo_detector_config(head_norm: dict, *, backbone_norm: Optional[dict] = None,
                         burn_in: Optional[int], iters: int, warmup: int, lr: float, seed: int,
                         batch_size: int, data_root: str, generation: dict, few_rois: bool,
                         evaluate: bool = True):
    """The demo detector (:data:`DEMO_CONFIG`) set up for one study run: an mmengine ``Config``.

    Args:
        head_norm: ``norm_cfg`` of the FPN and the box head.
        backbone_norm: ``norm_cfg`` of the backbone; None keeps the config's (BN).
        burn_in: ``CBNBurnInHook``'s iterations; None: no burn-in hook.
        iters: training iterations; SGD with the config's momentum, weight decay and clipping.
        warmup: linear warm-up iterations; the rate drops ×0.1 at 75 % and 90 % of ``iters``.
        lr: the learning rate.
        seed: ``randomness.seed``.
        batch_size: images per iteration.
        data_root: where the demo data is (or is generated).
        generation: the data's generation arguments (``DemoShapesDataset(generate=...)``).
        few_rois: fewer proposals and detections (:func:`short_run.shrink_config`).
        evaluate: evaluate once, after the last iteration; else no val or test loop at all.
    """
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO_CONFIG)
    # (the demo config's head_norm_cfg variable was resolved when it was parsed: set each module's)
    if backbone_norm is not None:
        cfg.model.backbone.norm_cfg = backbone_norm
    cfg.model.neck.norm_cfg = head_norm
    cfg.model.roi_head.bbox_head.norm_cfg = head_norm
    hooks = [h for h in cfg.custom_hooks if h['type'] != 'CBNBurnInHook']
    if burn_in is not None:
        hooks.insert(0, dict(type='CBNBurnInHook', burn_in=burn_in, by_epoch=False))
    cfg.custom_hooks = hooks

    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                         val_interval=iters if evaluate else iters + 1)
    if not evaluate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
        cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=warmup),
        dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters,
             milestones=[int(iters * 0.75), int(iters * 0.9)], gamma=0.1)]
    cfg.optim_wrapper.optimizer.lr = lr
    cfg.randomness = dict(seed=seed)
    cfg.default_hooks.checkpoint = None  # nothing is evaluated later: no checkpoint
    cfg.default_hooks.logger.interval = max(1, min(50, iters // 10))
    return shrink_config(cfg, data_root, generate=generation, image_size=generation['image_size'],
                         batch_size=batch_size, few_rois=few_rois)
