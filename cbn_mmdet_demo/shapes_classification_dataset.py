"""``DemoShapesClassification``: mmpretrain's ImageNet dataset over the generated classification shapes.

Importing this module registers the dataset in mmpretrain's ``DATASETS``; the classification demo
configs do so with ``custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo.shapes_classification_dataset'],
allow_failed_imports=False)`` (``import cbn_mmdet_demo`` alone does not import mmpretrain, whose import
takes seconds).
"""
from __future__ import annotations

from typing import Union

from mmpretrain.datasets import ImageNet
from mmpretrain.registry import DATASETS

from .shapes_classification import (CLASSES, FORMAT_VERSION, make_classification_dataset,
                                    normalize_classification_args, read_classification_args,
                                    read_format_version)


@DATASETS.register_module()
class DemoShapesClassification(ImageNet):
    """The classification demo shapes (see :mod:`cbn_mmdet_demo.shapes_classification`), ImageNet layout.

    It behaves as :class:`mmpretrain.datasets.ImageNet` with the shape classes, and generates the
    data under ``data_root`` first if it is missing. Data already there that was generated with other
    arguments than ``generate``, or by another version of the generator, is refused rather than
    silently used: delete ``data_root`` or point it elsewhere.

    Args:
        generate (bool | dict): ``True`` (default) generates with the default arguments when the
            data is missing; a dict gives keyword arguments of
            :func:`~cbn_mmdet_demo.shapes_classification.make_classification_dataset`
            (``num_train``, ``num_val``, ``image_size``, ``seed``...); ``False`` never generates and
            never checks (a plain ImageNet-format loader with the shape classes).
        data_root (str): The directory that holds ``meta/``, ``train/`` and ``val/``.
        split (str): ``'train'`` or ``'val'``.
        **kwargs: As :class:`mmpretrain.datasets.ImageNet`.

    Example:
        >>> dataset = DATASETS.build(dict(
        ...     type='DemoShapesClassification', data_root='data/demo_shapes_cls/', split='val',
        ...     generate=dict(num_train=100, num_val=50, image_size=32), pipeline=[]))
    """

    METAINFO = {'classes': CLASSES}

    def __init__(self, data_root: str = '', split: str = '', *args,
                 generate: Union[bool, dict] = True, **kwargs) -> None:
        if isinstance(generate, bool):
            generation_args = normalize_classification_args() if generate else None
        elif isinstance(generate, dict):
            generation_args = normalize_classification_args(**generate)
        else:
            raise TypeError(f'generate must be a bool or a dict, got {type(generate).__name__}')
        if generation_args is not None:
            # before ImageNet's constructor, which looks for meta/<split>.txt
            self._prepare_data(data_root, generation_args)
        self.generation_args = generation_args
        super().__init__(data_root, split, *args, **kwargs)

    @staticmethod
    def _prepare_data(root: str, generation_args: dict) -> None:
        if not root:
            raise ValueError('DemoShapesClassification needs data_root (the directory the data is '
                             'generated in) when generate is not False')
        recorded = read_classification_args(root)
        if recorded is None:
            make_classification_dataset(root, **generation_args)
            recorded = read_classification_args(root)
        version = read_format_version(root)
        if version != FORMAT_VERSION:
            raise ValueError(
                f'the demo data in {root} was written by version {version} of the generator, this '
                f'is version {FORMAT_VERSION} (other images); delete {root} to regenerate it')
        if recorded != generation_args:
            raise ValueError(
                f'the demo data in {root} was generated with {recorded}, but this dataset asks for '
                f'{generation_args}; delete {root} to regenerate it, or use another data_root')
