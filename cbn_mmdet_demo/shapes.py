"""A deterministic generator of a small COCO-format detection / instance-segmentation dataset.

The "demo shapes" dataset stands in for COCO on machines without data or network: images of filled
geometric shapes (:data:`CLASSES`) of varied size, colour and rotation over textured, noisy
backgrounds with clutter lines, where shapes overlap and occlude each other. Every annotation
describes what is *visible*: its ``segmentation`` is the visible part of the shape (uncompressed COCO
RLE, exact, so occluded shapes that split into several pieces stay exact), its ``bbox`` is the extent
of that visible mask and its ``area`` the number of visible pixels. A shape is only placed when every
shape already in the image keeps at least ``min_visible_fraction`` of its area visible.

Only numpy and the standard library are used (PNG files are written with :mod:`zlib`), so the same
arguments give byte-identical files with any version of Pillow/OpenCV. Each image is drawn from its
own random stream derived from ``(seed, split, index)``: the train and val splits never share an
image, and the first ``n`` images of a split do not depend on how many images the split has.

Layout written by :func:`make_demo_dataset`::

    root/
      annotations/instances_train.json
      annotations/instances_val.json
      train/000000.png ...
      val/000000.png ...

Example:
    >>> from cbn_mmdet_demo.shapes import make_demo_dataset
    >>> make_demo_dataset('data/demo_shapes', num_train=8, num_val=4, image_size=128, seed=0)
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import os.path as osp
import shutil
import struct
import tempfile
import zlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

CLASSES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'cross')
# One RGB colour per class, for visualisation only (mmdet's ``METAINFO['palette']``).
PALETTE: List[Tuple[int, int, int]] = [(220, 20, 60), (0, 0, 230), (0, 160, 0), (250, 170, 30),
                                       (160, 0, 200)]
SPLITS: Tuple[str, ...] = ('train', 'val')
FORMAT_VERSION = 1

_SPLIT_IDS = {'train': 0, 'val': 1}
_SUPERSAMPLE = 3  # sub-pixel samples per axis used to anti-alias shape edges


# --------------------------------------------------------------------------------------------------
# Geometry and rasterisation
# --------------------------------------------------------------------------------------------------
def _regular_polygon(n: int, radius: float, angle: float) -> np.ndarray:
    t = angle + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _shape_outline(name: str, radius: float, angle: float) -> Optional[np.ndarray]:
    """Vertices (M, 2) of a shape centred at the origin, or None for a circle.

    ``radius`` is the circumradius: every shape fits in the disc of that radius.
    """
    if name == 'circle':
        return None
    if name == 'square':
        return _regular_polygon(4, radius, angle)
    if name == 'triangle':
        return _regular_polygon(3, radius, angle)
    if name == 'star':
        outer = _regular_polygon(5, radius, angle)
        inner = _regular_polygon(5, 0.45 * radius, angle + np.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if name == 'cross':
        w = 0.32 * radius  # half width of an arm; arm tips lie on the circumcircle
        a = np.sqrt(radius ** 2 - w ** 2)
        pts = np.array([[w, w], [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w], [-w, -a],
                        [w, -a], [w, -w], [a, -w], [a, w]])
        c, s = np.cos(angle), np.sin(angle)
        return pts @ np.array([[c, s], [-s, c]])
    raise ValueError(f'unknown shape {name!r}; expected one of {CLASSES}')


def _points_in_polygon(px: np.ndarray, py: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test for arrays of points (any shape)."""
    inside = np.zeros(px.shape, dtype=bool)
    xj, yj = poly[-1]
    for xi, yi in poly:
        if yi != yj:
            crosses = (yi > py) != (yj > py)
            x_at = (xj - xi) * (py - yi) / (yj - yi) + xi
            inside ^= crosses & (px < x_at)
        xj, yj = xi, yi
    return inside


def _coverage(name: str, cx: float, cy: float, radius: float, angle: float, width: int,
              height: int) -> np.ndarray:
    """Fraction (H, W) of each pixel covered by the shape, by supersampling its bounding square."""
    x0, x1 = max(int(np.floor(cx - radius)), 0), min(int(np.ceil(cx + radius)), width)
    y0, y1 = max(int(np.floor(cy - radius)), 0), min(int(np.ceil(cy + radius)), height)
    cov = np.zeros((height, width), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return cov
    ss = _SUPERSAMPLE
    sub = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1) - cx
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1) - cy
    px, py = np.meshgrid(xs, ys)
    outline = _shape_outline(name, radius, angle)
    if outline is None:
        inside = px * px + py * py <= radius * radius
    else:
        inside = _points_in_polygon(px, py, outline)
    cov[y0:y1, x0:x1] = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return cov


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random ``cells x cells`` grid upsampled bilinearly."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    gy = np.linspace(0, cells, height)
    gx = np.linspace(0, cells, width)
    iy = np.minimum(gy.astype(int), cells - 1)
    ix = np.minimum(gx.astype(int), cells - 1)
    fy = (gy - iy)[:, None]
    fx = (gx - ix)[None, :]
    g00 = grid[iy][:, ix]
    g01 = grid[iy][:, ix + 1]
    g10 = grid[iy + 1][:, ix]
    g11 = grid[iy + 1][:, ix + 1]
    return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx) + g11 * fy * fx)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured RGB background (float32, 0..255): base colour, smooth blotches, a texture."""
    base = rng.uniform(40, 215, size=3)
    img = np.empty((height, width, 3), dtype=np.float32)
    img[:] = base
    for cells, amp in ((2, 45.0), (6, 25.0)):
        for c in range(3):
            img[..., c] += amp * _smooth_noise(rng, height, width, cells)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes at a random angle
        t = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        wave = np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period)
        img += (rng.uniform(8, 22) * wave)[..., None]
    elif kind == 1:  # checkerboard
        period = int(rng.integers(8, 24))
        checker = ((xx // period + yy // period) % 2) * 2 - 1
        img += (rng.uniform(6, 18) * checker)[..., None]
    # kind == 2: blotches only
    # Clutter: a few unlabelled thin lines.
    for _ in range(int(rng.integers(0, 4))):
        p = rng.uniform(0, [width, height])
        q = rng.uniform(0, [width, height])
        d = q - p
        t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
        dist = np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1])
        alpha = np.clip(rng.uniform(0.8, 2.0) - dist, 0, 1)[..., None]
        img = img * (1 - alpha) + rng.uniform(0, 255, size=3) * alpha
    return img


def _object_colour(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    """A random colour at least some distance away from ``avoid`` (the local background)."""
    for _ in range(50):
        colour = rng.uniform(0, 255, size=3)
        if np.linalg.norm(colour - avoid) > 110:
            return colour
    return np.where(avoid > 127, 20.0, 235.0)


def _render_image(rng: np.random.Generator, width: int, height: int, min_objects: int,
                  max_objects: int, min_size: float, max_size: float,
                  min_visible_fraction: float) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image (H, W, 3) uint8 and its objects as ``(class_index, visible_mask)``."""
    img = _background(rng, height, width)
    short = min(width, height)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    shapes = []  # (label, full_mask, coverage)
    visible: List[np.ndarray] = []
    for _ in range(n_objects):
        for _attempt in range(30):
            label = int(rng.integers(0, len(CLASSES)))
            diameter = short * np.exp(rng.uniform(np.log(min_size), np.log(max_size)))
            radius = diameter / 2
            cx = rng.uniform(radius * 0.8, width - radius * 0.8)
            cy = rng.uniform(radius * 0.8, height - radius * 0.8)
            angle = rng.uniform(0, 2 * np.pi)
            cov = _coverage(CLASSES[label], cx, cy, radius, angle, width, height)
            full = cov >= 0.5
            if full.sum() < 16:
                continue
            # Every shape already there must stay visible enough under the new one.
            if all((vis & ~full).sum() >= min_visible_fraction * old[1].sum()
                   for vis, old in zip(visible, shapes)):
                break
        else:
            continue  # no room for another shape
        visible = [vis & ~full for vis in visible]
        visible.append(full.copy())
        shapes.append((label, full, cov))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for label, _full, cov in shapes:
        ys, xs = np.nonzero(cov)
        local_bg = img[ys, xs].mean(axis=0)
        colour = _object_colour(rng, local_bg)
        # Shading: a linear gradient across the shape plus per-pixel noise.
        g = rng.uniform(-1, 1, size=2) * rng.uniform(0, 0.6)
        shade = 1.0 + g[0] * (xx - xs.mean()) / short + g[1] * (yy - ys.mean()) / short
        fill = colour[None, None, :] * shade[..., None]
        fill += rng.normal(0, 6, size=(height, width, 3))
        alpha = cov[..., None]
        img = img * (1 - alpha) + fill * alpha
    img += rng.normal(0, 7, size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return img, [(label, vis) for (label, _, _), vis in zip(shapes, visible)]


# --------------------------------------------------------------------------------------------------
# Encoding: masks to COCO RLE, images to PNG
# --------------------------------------------------------------------------------------------------
def mask_to_rle(mask: np.ndarray) -> Dict:
    """Uncompressed COCO RLE (``{'size': [h, w], 'counts': [...]}``, column-major, zeros first)."""
    flat = np.asarray(mask, dtype=bool).flatten(order='F')
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {'size': [int(mask.shape[0]), int(mask.shape[1])], 'counts': counts}


def rle_to_mask(rle: Dict) -> np.ndarray:
    """Inverse of :func:`mask_to_rle` (uncompressed RLE only)."""
    h, w = rle['size']
    values = np.arange(len(rle['counts'])) % 2 == 1
    flat = np.repeat(values, rle['counts'])
    if flat.size != h * w:
        raise ValueError(f'RLE counts sum to {flat.size}, expected {h} * {w} = {h * w}')
    return flat.reshape((h, w), order='F')


def mask_to_bbox(mask: np.ndarray) -> List[int]:
    """COCO ``[x, y, w, h]`` of a binary mask's extent (the same convention as pycocotools)."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return [0, 0, 0, 0]
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def encode_png(img: np.ndarray, level: int = 6) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image (filter 0, zlib; deterministic for a zlib build)."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f'expected an (H, W, 3) uint8 image, got {img.dtype} {img.shape}')
    h, w = img.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack('>I', len(data)) + tag + data
                + struct.pack('>I', zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(raw, level))
            + chunk(b'IEND', b''))


# --------------------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------------------
def _image_size(image_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(image_size, int):
        width = height = image_size
    else:
        width, height = (int(v) for v in image_size)
    if width < 32 or height < 32:
        raise ValueError(f'image_size must be at least 32 pixels, got {image_size}')
    return width, height


def _check_args(args: Dict) -> None:
    for key in ('num_train', 'num_val'):
        if args[key] < 0:
            raise ValueError(f'{key} must be >= 0, got {args[key]}')
    if not 1 <= args['min_objects'] <= args['max_objects']:
        raise ValueError('need 1 <= min_objects <= max_objects, got '
                         f"{args['min_objects']} and {args['max_objects']}")
    if not 0 < args['min_size'] <= args['max_size'] <= 1:
        raise ValueError('need 0 < min_size <= max_size <= 1 (fractions of the short side), got '
                         f"{args['min_size']} and {args['max_size']}")
    if not 0 <= args['min_visible_fraction'] <= 1:
        raise ValueError(f"min_visible_fraction must be in [0, 1], got {args['min_visible_fraction']}")


def generate_split(split: str, num_images: int, image_size: Union[int, Sequence[int]] = 128,
                   seed: int = 0, min_objects: int = 1, max_objects: int = 5,
                   min_size: float = 0.15, max_size: float = 0.6,
                   min_visible_fraction: float = 0.4) -> Tuple[Dict, List[np.ndarray]]:
    """Generate one split in memory: its COCO dict and its images (RGB uint8), without writing."""
    if split not in _SPLIT_IDS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    width, height = _image_size(image_size)
    images, annotations, arrays = [], [], []
    for index in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index]))
        img, objects = _render_image(rng, width, height, min_objects, max_objects, min_size,
                                     max_size, min_visible_fraction)
        image_id = index + 1
        images.append(dict(id=image_id, file_name=f'{index:06d}.png', width=width, height=height))
        for label, mask in objects:
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id,
                                    category_id=label + 1, bbox=mask_to_bbox(mask),
                                    area=int(mask.sum()), iscrowd=0,
                                    segmentation=mask_to_rle(mask)))
        arrays.append(img)
    coco = dict(
        info=dict(description='cbn_mmdet demo shapes (generated)', version=str(FORMAT_VERSION)),
        images=images,
        annotations=annotations,
        categories=[dict(id=i + 1, name=name, supercategory='shape')
                    for i, name in enumerate(CLASSES)])
    return coco, arrays


def normalize_generation_args(**kwargs) -> Dict:
    """Complete ``kwargs`` with the defaults, check them and give them canonical (JSON) types.

    The result is what :func:`make_demo_dataset` records in the annotation files' ``info``, so
    :class:`~cbn_mmdet_demo.DemoShapesDataset` can tell whether existing data matches.
    """
    defaults = default_generation_args()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f'unknown generation arguments {sorted(unknown)}; '
                        f'expected some of {sorted(defaults)}')
    args = dict(defaults, **kwargs)
    for key in ('num_train', 'num_val', 'seed', 'min_objects', 'max_objects'):
        args[key] = int(args[key])
    for key in ('min_size', 'max_size', 'min_visible_fraction'):
        args[key] = float(args[key])
    if isinstance(args['image_size'], (list, tuple)):
        args['image_size'] = [int(v) for v in args['image_size']]
    else:
        args['image_size'] = int(args['image_size'])
    _check_args(args)
    _image_size(args['image_size'])
    return args


def _write_dataset(root: str, args: Dict) -> None:
    gen_kwargs = {k: v for k, v in args.items() if k not in ('num_train', 'num_val')}
    os.makedirs(osp.join(root, 'annotations'), exist_ok=True)
    for split in SPLITS:
        coco, arrays = generate_split(split, args[f'num_{split}'], **gen_kwargs)
        coco['info']['generator'] = dict(args, split=split)
        img_dir = osp.join(root, split)
        os.makedirs(img_dir, exist_ok=True)
        for info, img in zip(coco['images'], arrays):
            with open(osp.join(img_dir, info['file_name']), 'wb') as f:
                f.write(encode_png(img))
        with open(osp.join(root, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f, separators=(',', ':'))


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive advisory lock on ``path`` (blocking), so concurrent generators take turns."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no locking, atomic renames still apply
        yield
        return
    with open(path, 'a+') as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def is_complete(root: str) -> bool:
    """Whether ``root`` holds a generated dataset (both annotation files exist)."""
    return all(osp.isfile(osp.join(root, 'annotations', f'instances_{s}.json')) for s in SPLITS)


def read_generation_args(root: str) -> Optional[Dict]:
    """The arguments a dataset under ``root`` was generated with (None if unknown)."""
    path = osp.join(root, 'annotations', 'instances_train.json')
    if not osp.isfile(path):
        return None
    with open(path) as f:
        gen = json.load(f).get('info', {}).get('generator')
    if gen is None:
        return None
    gen = dict(gen)
    gen.pop('split', None)
    return gen


def make_demo_dataset(root: str, num_train: int = 800, num_val: int = 200,
                      image_size: Union[int, Sequence[int]] = 128, seed: int = 0,
                      min_objects: int = 1, max_objects: int = 5, min_size: float = 0.15,
                      max_size: float = 0.6, min_visible_fraction: float = 0.4,
                      overwrite: bool = False) -> str:
    """Generate the demo dataset under ``root`` (see the module docstring for the layout).

    Safe when several processes call it at once: they serialise on a lock file in ``root``; the
    first one writes everything into a temporary directory inside ``root`` and renames it into
    place, the annotation directory last, so a reader that sees ``annotations/`` sees a complete
    dataset. The others find the dataset complete and return.

    Args:
        root: Output directory (created if missing).
        num_train: Number of training images.
        num_val: Number of validation images.
        image_size: Side in pixels, or ``(width, height)``.
        seed: Random seed; the same arguments give byte-identical files.
        min_objects: Fewest shapes per image.
        max_objects: Most shapes per image (fewer when no placement keeps the others visible).
        min_size: Smallest shape diameter as a fraction of the image's short side.
        max_size: Largest shape diameter as a fraction of the image's short side.
        min_visible_fraction: Fraction of each shape's area that later shapes must leave visible.
        overwrite: Regenerate even if ``root`` already holds a complete dataset.

    Returns:
        ``root``.
    """
    args = normalize_generation_args(
        num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
        min_objects=min_objects, max_objects=max_objects, min_size=min_size, max_size=max_size,
        min_visible_fraction=min_visible_fraction)
    return generate_in_place(root, lambda tmp: _write_dataset(tmp, args), SPLITS, 'annotations',
                             lambda: is_complete(root), overwrite)


def generate_in_place(root: str, write: Callable[[str], None], folders: Sequence[str],
                      marker: str, complete: Callable[[], bool], overwrite: bool) -> str:
    """Write a dataset's ``folders`` and its ``marker`` folder with ``write(tmp)`` into a temporary
    directory in ``root``, then move them into place, the marker last, under a lock file: processes
    that call this at once take turns, and a reader that sees the marker sees everything."""
    os.makedirs(root, exist_ok=True)
    with _file_lock(osp.join(root, '.generate.lock')):
        if complete() and not overwrite:
            return root
        tmp = tempfile.mkdtemp(prefix='.generating-', dir=root)
        try:
            write(tmp)
            # what an earlier (crashed or overwritten) run left goes first, the marker before the
            # rest, so the dataset never looks complete while it is being replaced
            for name in (marker, ) + tuple(folders):
                if osp.isdir(osp.join(root, name)):
                    shutil.rmtree(osp.join(root, name))
            for name in tuple(folders) + (marker, ):
                os.replace(osp.join(tmp, name), osp.join(root, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_generation_args() -> Dict:
    """The default generation arguments of :func:`make_demo_dataset` (a fresh dict)."""
    params = inspect.signature(make_demo_dataset).parameters
    return {name: p.default for name, p in params.items() if name not in ('root', 'overwrite')}
