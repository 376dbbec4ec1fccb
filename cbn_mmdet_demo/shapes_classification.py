"""A deterministic generator of a small ImageNet-format classification dataset of shapes.

The classification counterpart of :mod:`cbn_mmdet_demo.shapes`: each image holds one filled shape
(its class, one of :data:`~cbn_mmdet_demo.shapes.CLASSES`) of varied size, colour, rotation and
position over a smooth, noisy background. The shape is always lighter than its background, in every
channel: with the shape's and the background's colours both drawn at random, figure and ground are
not told apart by any local patch (a square's corner seen from outside is a cross's inner corner),
and a CNN that pools its features globally stays near chance. The classes are
balanced (image ``i`` of a split shows class ``i % 5``) and each image is drawn from its own random
stream derived from ``(seed, split, index)``, so the splits never share an image and the first ``n``
images of a split do not depend on how many the split has. numpy and the standard library only.

Layout written by :func:`make_classification_dataset`, that of ImageNet as mmpretrain reads it
(``ImageNet(data_root=root, split='train' | 'val')``)::

    root/
      meta/train.txt        "circle/000000.png 0" per line
      meta/val.txt          "000000.png 0" per line
      meta/generator.json   the generation arguments
      train/circle/000000.png ...
      val/000000.png ...

Example:
    >>> from cbn_mmdet_demo.shapes_classification import make_classification_dataset
    >>> make_classification_dataset('data/demo_shapes_cls', num_train=20, num_val=10)
"""
from __future__ import annotations

import inspect
import json
import os
import os.path as osp
from typing import Dict, List, Optional, Tuple

import numpy as np

from .shapes import CLASSES, SPLITS, _coverage, _smooth_noise, encode_png, generate_in_place

__all__ = ['CLASSES', 'generate_classification_split', 'make_classification_dataset',
           'normalize_classification_args', 'default_classification_args',
           'read_classification_args', 'read_format_version', 'is_complete', 'FORMAT_VERSION']

# 2: the shape lighter than its background (version 1 drew both colours at random: not learnable
# by a ResNet in minutes). Data of another version is refused, not reused.
FORMAT_VERSION = 2
# Different from the detection generator's split ids, so the two datasets share no image.
_SPLIT_IDS = {'train': 10, 'val': 11}
# Background: a base colour per channel in this range, plus blotches (cells, amplitude); at most
# 87 + 20 + 11 = 118 before the pixel noise.
_BACKGROUND_BASE = (8.0, 87.0)
_BACKGROUND_BLOTCHES = ((2, 20.0), (6, 11.0))
# Shape colour per channel, before its shading (×0.88 … ×1.12): at least 132, above any background.
_SHAPE_COLOUR = (150.0, 255.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, dark RGB background (float32, at most 118 in every channel): a base colour and
    low-frequency blotches. (The detection demo's stripes, checkerboards and clutter lines are left
    out: with one small image per label they drown the shape's outline.)"""
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = rng.uniform(_BACKGROUND_BASE[0], _BACKGROUND_BASE[1], size=3)
    for cells, amp in _BACKGROUND_BLOTCHES:
        for c in range(3):
            img[..., c] += amp * _smooth_noise(rng, size, size, cells)
    return img


def _render(rng: np.random.Generator, label: int, size: int, min_size: float,
            max_size: float) -> Tuple[np.ndarray, np.ndarray]:
    """One (size, size, 3) uint8 image of a shape of class ``label``: a light shape (every channel
    of its colour in 150..255, shaded by about ±12 % at most) on a dark background, plus pixel
    noise; and the (size, size) fraction of each pixel the shape covers."""
    img = _background(rng, size)
    diameter = size * np.exp(rng.uniform(np.log(min_size), np.log(max_size)))
    radius = diameter / 2
    # the centre keeps at least 80 % of the circumradius inside the image: the shape stays readable
    cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
    cov = _coverage(CLASSES[label], cx, cy, radius, rng.uniform(0, 2 * np.pi), size, size)
    ys, xs = np.nonzero(cov)
    colour = rng.uniform(_SHAPE_COLOUR[0], _SHAPE_COLOUR[1], size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    g = rng.uniform(-1, 1, size=2) * rng.uniform(0, 0.15)
    shade = 1.0 + g[0] * (xx - xs.mean()) / size + g[1] * (yy - ys.mean()) / size
    fill = colour[None, None, :] * shade[..., None] + rng.normal(0, 6, size=(size, size, 3))
    alpha = cov[..., None]
    img = img * (1 - alpha) + fill * alpha + rng.normal(0, 7, size=(size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cov


def generate_classification_split(split: str, num_images: int, image_size: int = 64, seed: int = 0,
                                  min_size: float = 0.35, max_size: float = 0.8
                                  ) -> Tuple[List[int], List[np.ndarray]]:
    """Generate one split in memory: its labels and images (RGB uint8), without writing."""
    if split not in _SPLIT_IDS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    labels, images = [], []
    for index in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]))
        label = index % len(CLASSES)
        labels.append(label)
        images.append(_render(rng, label, image_size, min_size, max_size)[0])
    return labels, images


def default_classification_args() -> Dict:
    """The default generation arguments of :func:`make_classification_dataset` (a fresh dict)."""
    params = inspect.signature(make_classification_dataset).parameters
    return {name: p.default for name, p in params.items() if name not in ('root', 'overwrite')}


def normalize_classification_args(**kwargs) -> Dict:
    """Complete ``kwargs`` with the defaults, check them and give them canonical (JSON) types: what
    ``meta/generator.json`` records, so a dataset can tell whether existing data matches."""
    defaults = default_classification_args()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f'unknown generation arguments {sorted(unknown)}; '
                        f'expected some of {sorted(defaults)}')
    args = dict(defaults, **kwargs)
    for key in ('num_train', 'num_val', 'image_size', 'seed'):
        args[key] = int(args[key])
    for key in ('min_size', 'max_size'):
        args[key] = float(args[key])
    for key in ('num_train', 'num_val'):
        if args[key] < 0:
            raise ValueError(f'{key} must be >= 0, got {args[key]}')
    if args['image_size'] < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {args['image_size']}")
    if not 0 < args['min_size'] <= args['max_size'] <= 1:
        raise ValueError('need 0 < min_size <= max_size <= 1 (fractions of the side), got '
                         f"{args['min_size']} and {args['max_size']}")
    return args


def _write(root: str, args: Dict) -> None:
    gen_kwargs = {k: v for k, v in args.items() if k not in ('num_train', 'num_val')}
    os.makedirs(osp.join(root, 'meta'))
    for split in SPLITS:
        labels, images = generate_classification_split(split, args[f'num_{split}'], **gen_kwargs)
        lines = []
        for index, (label, img) in enumerate(zip(labels, images)):
            # train: one folder per class; val: flat, as ImageNet's
            name = (f'{CLASSES[label]}/{index:06d}.png' if split == 'train'
                    else f'{index:06d}.png')
            path = osp.join(root, split, name)
            os.makedirs(osp.dirname(path), exist_ok=True)
            with open(path, 'wb') as f:
                f.write(encode_png(img))
            lines.append(f'{name} {label}\n')
        os.makedirs(osp.join(root, split), exist_ok=True)   # also for an empty split
        with open(osp.join(root, 'meta', f'{split}.txt'), 'w') as f:
            f.writelines(lines)
    with open(osp.join(root, 'meta', 'generator.json'), 'w') as f:
        json.dump(dict(args, format_version=FORMAT_VERSION, classes=list(CLASSES)), f)


def is_complete(root: str) -> bool:
    """Whether ``root`` holds a generated dataset (its ``meta/generator.json`` exists)."""
    return osp.isfile(osp.join(root, 'meta', 'generator.json'))


def read_format_version(root: str) -> Optional[int]:
    """The :data:`FORMAT_VERSION` of the generator that wrote the dataset under ``root`` (None if
    there is none)."""
    if not is_complete(root):
        return None
    with open(osp.join(root, 'meta', 'generator.json')) as f:
        return json.load(f).get('format_version')


def read_classification_args(root: str) -> Optional[Dict]:
    """The arguments a dataset under ``root`` was generated with (None if there is none)."""
    if not is_complete(root):
        return None
    with open(osp.join(root, 'meta', 'generator.json')) as f:
        recorded = json.load(f)
    return {k: v for k, v in recorded.items() if k not in ('format_version', 'classes')}


def make_classification_dataset(root: str, num_train: int = 1000, num_val: int = 250,
                                image_size: int = 64, seed: int = 0, min_size: float = 0.35,
                                max_size: float = 0.8, overwrite: bool = False) -> str:
    """Generate the classification demo dataset under ``root`` (layout: see the module docstring).

    Safe when several processes call it at once, as :func:`cbn_mmdet_demo.shapes.make_demo_dataset`:
    they take turns on a lock file in ``root``; the data is written into a temporary directory and
    moved into place with ``meta/`` last, so a reader that sees ``meta/generator.json`` sees all of it.

    Args:
        root: Output directory (created if missing).
        num_train: Number of training images (classes balanced).
        num_val: Number of validation images (classes balanced).
        image_size: Side of the square images in pixels.
        seed: Random seed; the same arguments give byte-identical files.
        min_size: Smallest shape diameter as a fraction of the side.
        max_size: Largest shape diameter as a fraction of the side.
        overwrite: Regenerate even if ``root`` already holds a complete dataset.

    Returns:
        ``root``.
    """
    args = normalize_classification_args(num_train=num_train, num_val=num_val,
                                         image_size=image_size, seed=seed, min_size=min_size,
                                         max_size=max_size)
    return generate_in_place(root, lambda tmp: _write(tmp, args), SPLITS, 'meta',
                             lambda: is_complete(root), overwrite)
