"""cbn_mmdet_demo: the generated demo shapes dataset of the demo configs (``configs/demo``).

It is not part of the layer library: ``import cbn_mmdet`` does not import it. The generator
(:mod:`cbn_mmdet_demo.shapes`) needs numpy only. Where mmdet is installed, importing this package
also registers :class:`DemoShapesDataset` in mmdet's ``DATASETS``; the demo configs do so with
``custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo'], allow_failed_imports=False)``.

The classification counterpart (:mod:`cbn_mmdet_demo.shapes_classification`, an ImageNet-format
dataset of one shape per image; numpy only) has its mmpretrain dataset in
:mod:`cbn_mmdet_demo.shapes_classification_dataset`, which the classification demo config imports
itself: this package does not import mmpretrain (seconds of import time the detection demo would pay).
"""
import importlib.util

from .shapes import CLASSES, PALETTE, generate_split, make_demo_dataset

__all__ = ['CLASSES', 'PALETTE', 'generate_split', 'make_demo_dataset']


def _mmdet_installed() -> bool:
    try:
        return importlib.util.find_spec('mmdet') is not None
    except ImportError:  # an import hook that hides the package
        return False


if _mmdet_installed():
    from .shapes_dataset import DemoShapesDataset  # registers it in mmdet's DATASETS
    __all__.append('DemoShapesDataset')
