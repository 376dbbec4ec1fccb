"""``DemoShapesDataset``: mmdet's COCO dataset over the generated demo shapes, made on first use."""
from __future__ import annotations

import json
import os.path as osp
from typing import Union

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS

from .shapes import CLASSES, PALETTE, make_demo_dataset, normalize_generation_args


@DATASETS.register_module()
class DemoShapesDataset(CocoDataset):
    """The demo shapes dataset (see :mod:`cbn_mmdet_demo.shapes`) in COCO format.

    It behaves as :class:`mmdet.datasets.CocoDataset` with the shape classes, and generates the data
    under ``data_root`` the first time it is loaded if the annotation file is missing. Several
    processes (dataloader workers, distributed ranks, train and val datasets) may do so at once:
    :func:`~cbn_mmdet_demo.shapes.make_demo_dataset` serialises them on a lock file and
    moves the finished data into place atomically.

    If the data already exists but was generated with other arguments than ``generate``, loading
    fails rather than silently training or evaluating on different data: delete ``data_root`` or
    point it elsewhere.

    Args:
        generate (bool | dict): ``True`` (default) generates with the default arguments when the
            annotation file is missing; a dict gives keyword arguments of
            :func:`~cbn_mmdet_demo.shapes.make_demo_dataset` (``num_train``, ``num_val``,
            ``image_size``, ``seed``...; the rest take their defaults); ``False`` never generates
            and never checks (a plain COCO loader with the shape classes).
        *args, **kwargs: As :class:`mmdet.datasets.CocoDataset`. ``data_root`` is the directory
            that holds ``annotations/``, ``train/`` and ``val/``; ``ann_file`` is normally
            ``'annotations/instances_train.json'`` or ``'annotations/instances_val.json'``.

    Example:
        >>> dataset = DATASETS.build(dict(
        ...     type='DemoShapesDataset', data_root='data/demo_shapes/',
        ...     ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
        ...     generate=dict(num_train=800, num_val=200, image_size=128, seed=0), pipeline=[]))
    """

    METAINFO = {'classes': CLASSES, 'palette': PALETTE}

    def __init__(self, *args, generate: Union[bool, dict] = True, **kwargs) -> None:
        if isinstance(generate, bool):
            self.generation_args = normalize_generation_args() if generate else None
        elif isinstance(generate, dict):
            self.generation_args = normalize_generation_args(**generate)
        else:
            raise TypeError(f'generate must be a bool or a dict, got {type(generate).__name__}')
        super().__init__(*args, **kwargs)

    def load_data_list(self):
        if self.generation_args is not None:
            self._prepare_data()
        return super().load_data_list()

    def _prepare_data(self) -> None:
        root = self.data_root
        if not root:
            raise ValueError('DemoShapesDataset needs data_root (the directory the data is '
                             'generated in) when generate is not False')
        if not osp.isfile(self.ann_file):
            make_demo_dataset(root, **self.generation_args)
            if not osp.isfile(self.ann_file):
                raise FileNotFoundError(
                    f'{self.ann_file} is still missing after generating the demo data in {root}; '
                    'ann_file should be annotations/instances_{train,val}.json under data_root')
        with open(self.ann_file) as f:
            recorded = json.load(f).get('info', {}).get('generator')
        if recorded is not None:
            recorded = {k: v for k, v in recorded.items() if k != 'split'}
        if recorded != self.generation_args:
            raise ValueError(
                f'the demo data in {root} was generated with {recorded}, but this dataset asks for '
                f'{self.generation_args}; delete {root} to regenerate it, or use another data_root')
