"""The generated classification demo dataset: determinism, the ImageNet layout mmpretrain reads,
balanced classes, figure and ground told apart by brightness, and the mmpretrain dataset that
generates it on first use."""
import hashlib
import os
import os.path as osp

import numpy as np
import pytest

from cbn_mmdet_demo import shapes_classification
from cbn_mmdet_demo.shapes import CLASSES
from cbn_mmdet_demo.shapes_classification import (generate_classification_split,
                                                  make_classification_dataset,
                                                  read_classification_args)

SMALL = dict(num_train=10, num_val=5, image_size=32, seed=0)
VAL = shapes_classification._SPLIT_IDS['val']  # the val split's random streams


def _tree_digest(root):
    """{relative path: sha256} of every file under root, except the lock file."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = osp.relpath(osp.join(dirpath, name), root)
            if rel != '.generate.lock':
                with open(osp.join(dirpath, name), 'rb') as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    return make_classification_dataset(str(tmp_path_factory.mktemp('cls') / 'shapes'), **SMALL)


def test_imagenet_layout(small_root):
    files = set(_tree_digest(small_root))
    assert {'meta/train.txt', 'meta/val.txt', 'meta/generator.json'} <= files
    with open(osp.join(small_root, 'meta', 'train.txt')) as f:
        train = [line.split() for line in f]
    with open(osp.join(small_root, 'meta', 'val.txt')) as f:
        val = [line.split() for line in f]
    assert len(train) == 10 and len(val) == 5
    # train: a folder per class, named after it; val: flat files, as ImageNet's
    for name, label in train:
        assert name.split('/')[0] == CLASSES[int(label)] and f'train/{name}' in files
    for name, label in val:
        assert '/' not in name and f'val/{name}' in files
    assert len(files) == 3 + 10 + 5
    assert read_classification_args(small_root) == dict(SMALL, min_size=0.35, max_size=0.8)


def test_same_arguments_give_identical_files_and_another_seed_does_not(small_root, tmp_path):
    assert _tree_digest(make_classification_dataset(str(tmp_path / 'a'), **SMALL)) == \
        _tree_digest(small_root)
    other = _tree_digest(make_classification_dataset(str(tmp_path / 'b'), **dict(SMALL, seed=1)))
    assert other['val/000000.png'] != _tree_digest(small_root)['val/000000.png']


def test_classes_balanced_and_splits_disjoint():
    labels, images = generate_classification_split('train', 20, image_size=32)
    assert np.bincount(labels).tolist() == [4] * len(CLASSES)
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in images)
    _, val = generate_classification_split('val', 20, image_size=32)
    assert not any(np.array_equal(a, b) for a in images for b in val)
    # the first images of a split do not depend on its length
    _, fewer = generate_classification_split('train', 5, image_size=32)
    assert all(np.array_equal(a, b) for a, b in zip(fewer, images))


def test_shape_lighter_than_background_in_every_channel():
    # With both colours drawn at random no local patch tells figure from ground (a square's corner
    # seen from outside is a cross's inner corner) and the demo ResNet stayed at chance. Every
    # channel of the shape is lighter than the background; pixel noise blurs only the extremes.
    for index in range(50):
        rng = np.random.default_rng(np.random.SeedSequence([0, VAL, index]))
        img, cov = shapes_classification._render(rng, index % len(CLASSES), 64, 0.35, 0.8)
        inside, outside = img[cov == 1], img[cov == 0]
        assert len(inside) > 50 and len(outside) > 1000
        assert (np.percentile(inside, 5, axis=0) > np.percentile(outside, 95, axis=0)).all()
    # the same pixels as the split generator's
    _, images = generate_classification_split('val', 1, image_size=64)
    rng = np.random.default_rng(np.random.SeedSequence([0, VAL, 0]))
    np.testing.assert_array_equal(shapes_classification._render(rng, 0, 64, 0.35, 0.8)[0], images[0])


def test_png_files_hold_the_generated_pixels(small_root):
    from PIL import Image
    _, images = generate_classification_split('val', 5, image_size=32)
    for index, img in enumerate(images):
        np.testing.assert_array_equal(
            np.asarray(Image.open(osp.join(small_root, 'val', f'{index:06d}.png'))), img)


@pytest.mark.parametrize('bad', [dict(num_train=-1), dict(image_size=8), dict(min_size=0.9),
                                 dict(max_size=1.5), dict(colour=3)])
def test_invalid_arguments_raise(tmp_path, bad):
    with pytest.raises((ValueError, TypeError)):
        make_classification_dataset(str(tmp_path / 'x'), **dict(SMALL, **bad))


def test_generator_has_no_openmmlab_dependency():
    with open(shapes_classification.__file__) as f:
        source = f.read()
    assert 'import mm' not in source and 'from mm' not in source and 'torch' not in source


def _val_cfg(root, generate):
    return dict(type='DemoShapesClassification', data_root=str(root), split='val',
                generate=generate, pipeline=[dict(type='LoadImageFromFile'), dict(type='PackInputs')])


def test_registered_dataset_generates_on_first_use_and_loads_labels(tmp_path):
    pytest.importorskip('mmpretrain')
    import cbn_mmdet_demo.shapes_classification_dataset  # noqa: F401  (registers the dataset)
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import DATASETS
    init_default_scope('mmpretrain')
    root = tmp_path / 'cls'
    dataset = DATASETS.build(_val_cfg(root, SMALL))
    assert (root / 'meta' / 'generator.json').is_file()
    assert len(dataset) == SMALL['num_val'] and dataset.metainfo['classes'] == CLASSES
    assert [int(dataset[i]['data_samples'].gt_label) for i in range(5)] == [0, 1, 2, 3, 4]
    assert tuple(dataset[0]['inputs'].shape) == (3, 32, 32)
    train = DATASETS.build(dict(_val_cfg(root, SMALL), split='train'))
    assert len(train) == SMALL['num_train']


def test_registered_dataset_rejects_data_from_other_arguments(small_root):
    pytest.importorskip('mmpretrain')
    import cbn_mmdet_demo.shapes_classification_dataset  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import DATASETS
    init_default_scope('mmpretrain')
    assert len(DATASETS.build(_val_cfg(small_root, SMALL))) == SMALL['num_val']
    with pytest.raises(ValueError, match='generated with'):
        DATASETS.build(_val_cfg(small_root, dict(SMALL, seed=3)))
    # generate=False: a plain ImageNet-format loader, no check
    assert len(DATASETS.build(_val_cfg(small_root, False))) == SMALL['num_val']


def test_registered_dataset_rejects_data_of_another_generator_version(small_root, tmp_path):
    pytest.importorskip('mmpretrain')
    import json
    import shutil

    import cbn_mmdet_demo.shapes_classification_dataset  # noqa: F401
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import DATASETS
    init_default_scope('mmpretrain')
    old = str(tmp_path / 'old')
    shutil.copytree(small_root, old)
    meta = osp.join(old, 'meta', 'generator.json')
    with open(meta) as f:
        recorded = json.load(f)
    with open(meta, 'w') as f:
        json.dump(dict(recorded, format_version=shapes_classification.FORMAT_VERSION - 1), f)
    with pytest.raises(ValueError, match='version'):
        DATASETS.build(_val_cfg(old, SMALL))
