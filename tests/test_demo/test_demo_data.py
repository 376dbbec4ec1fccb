"""The generated demo dataset: determinism, COCO validity, box/mask consistency, the mmdet dataset,
and its package kept apart from the layer library."""
import hashlib
import json
import multiprocessing as mp
import os
import os.path as osp
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cbn_mmdet_demo import shapes
from cbn_mmdet_demo.shapes import (CLASSES, encode_png, generate_split, make_demo_dataset,
                                   mask_to_bbox, mask_to_rle, rle_to_mask)
from conftest import REPO_ROOT

SMALL = dict(num_train=12, num_val=6, image_size=64, seed=0)


def _tree_digest(root):
    """{relative path: sha256} of every file under root, except the lock file."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = osp.join(dirpath, name)
            rel = osp.relpath(path, root)
            if rel == '.generate.lock':
                continue
            with open(path, 'rb') as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def small_root(tmp_path_factory):
    return make_demo_dataset(str(tmp_path_factory.mktemp('demo') / 'shapes'), **SMALL)


@pytest.fixture(scope='module')
def coco_train():
    # Enough images that every class occurs.
    return generate_split('train', 30, image_size=64, seed=0)


def test_layout(small_root):
    digest = _tree_digest(small_root)
    assert sorted(k for k in digest if k.startswith('annotations')) == [
        'annotations/instances_train.json', 'annotations/instances_val.json']
    assert sum(k.startswith('train/') for k in digest) == SMALL['num_train']
    assert sum(k.startswith('val/') for k in digest) == SMALL['num_val']
    # No temporary directory left behind.
    assert sorted(os.listdir(small_root)) == ['.generate.lock', 'annotations', 'train', 'val']


def test_same_arguments_give_identical_files(small_root, tmp_path):
    again = make_demo_dataset(str(tmp_path / 'again'), **SMALL)
    assert _tree_digest(again) == _tree_digest(small_root)


def test_different_seed_gives_different_data(small_root, tmp_path):
    other = make_demo_dataset(str(tmp_path / 'other'), **dict(SMALL, seed=1))
    a, b = _tree_digest(small_root), _tree_digest(other)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a)


def test_images_do_not_depend_on_split_length():
    coco3, imgs3 = generate_split('val', 3, image_size=64, seed=5)
    coco5, imgs5 = generate_split('val', 5, image_size=64, seed=5)
    for a, b in zip(imgs3, imgs5):
        np.testing.assert_array_equal(a, b)
    assert coco3['annotations'] == coco5['annotations'][:len(coco3['annotations'])]


def test_train_and_val_are_disjoint(small_root):
    digest = _tree_digest(small_root)
    train = {v for k, v in digest.items() if k.startswith('train/')}
    val = {v for k, v in digest.items() if k.startswith('val/')}
    assert len(train) == SMALL['num_train'] and len(val) == SMALL['num_val']
    assert not train & val


def test_png_files_hold_the_generated_pixels(small_root):
    import mmcv
    _, imgs = generate_split('val', SMALL['num_val'], image_size=64, seed=0)
    for i, expected in enumerate(imgs):
        img = mmcv.imread(osp.join(small_root, 'val', f'{i:06d}.png'), channel_order='rgb')
        np.testing.assert_array_equal(img, expected)


def test_json_loads_with_pycocotools_and_boxes_match_masks(small_root):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    coco = COCO(osp.join(small_root, 'annotations', 'instances_train.json'))
    assert len(coco.getImgIds()) == SMALL['num_train']
    assert [c['name'] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns
    for ann in anns:
        rle = coco.annToRLE(ann)
        mask = mask_utils.decode(rle)
        assert mask.shape == (64, 64)
        assert ann['area'] > 0 and ann['area'] == int(mask.sum()) == int(mask_utils.area(rle))
        np.testing.assert_array_equal(ann['bbox'], mask_utils.toBbox(rle))
        assert ann['bbox'] == mask_to_bbox(mask)
        assert ann['iscrowd'] == 0


def test_masks_are_the_visible_parts(coco_train):
    coco, _ = coco_train
    by_image = {}
    for ann in coco['annotations']:
        by_image.setdefault(ann['image_id'], []).append(rle_to_mask(ann['segmentation']))
    overlapping_boxes = 0
    for masks in by_image.values():
        total = np.sum(masks, axis=0)
        assert total.max() <= 1, 'visible masks of one image must not overlap'
        boxes = [mask_to_bbox(m) for m in masks]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                (x1, y1, w1, h1), (x2, y2, w2, h2) = boxes[i], boxes[j]
                overlapping_boxes += x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1
    assert overlapping_boxes > 0, 'the data should contain overlapping / occluding shapes'


def test_every_class_occurs_with_varied_sizes(coco_train):
    coco, _ = coco_train
    labels = [a['category_id'] for a in coco['annotations']]
    assert sorted(set(labels)) == list(range(1, len(CLASSES) + 1))
    sides = [max(a['bbox'][2:]) for a in coco['annotations']]
    assert min(sides) < 0.25 * 64 < 0.45 * 64 < max(sides)


def test_rle_round_trip():
    rng = np.random.default_rng(0)
    for first in (False, True):
        mask = rng.random((7, 5)) > 0.5
        mask[0, 0] = first
        rle = mask_to_rle(mask)
        assert rle['size'] == [7, 5] and sum(rle['counts']) == 35
        np.testing.assert_array_equal(rle_to_mask(rle), mask)


def test_encode_png_rejects_bad_input():
    with pytest.raises(ValueError, match='uint8'):
        encode_png(np.zeros((4, 4, 3), np.float32))


@pytest.mark.parametrize('bad', [dict(num_train=-1), dict(min_objects=3, max_objects=2),
                                 dict(min_size=0.7, max_size=0.5), dict(image_size=16),
                                 dict(min_visible_fraction=1.5)])
def test_invalid_arguments_raise(tmp_path, bad):
    with pytest.raises(ValueError):
        make_demo_dataset(str(tmp_path / 'x'), **dict(SMALL, **bad))
    assert not osp.exists(tmp_path / 'x' / 'annotations')


def _generate_in_process(root):
    make_demo_dataset(root, **SMALL)


def test_concurrent_generation_is_safe(small_root, tmp_path):
    root = str(tmp_path / 'shared')
    ctx = mp.get_context('fork')
    procs = [ctx.Process(target=_generate_in_process, args=(root, )) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert _tree_digest(root) == _tree_digest(small_root)
    assert not [n for n in os.listdir(root) if n.startswith('.generating-')]


def test_generation_replaces_leftovers_of_a_crashed_run(small_root, tmp_path):
    root = tmp_path / 'crashed'
    (root / 'train').mkdir(parents=True)
    (root / 'train' / 'stale.png').write_bytes(b'junk')
    make_demo_dataset(str(root), **SMALL)
    assert _tree_digest(str(root)) == _tree_digest(small_root)


def _val_cfg(root, **kwargs):
    return dict(type='DemoShapesDataset', data_root=str(root),
                ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
                pipeline=[dict(type='LoadImageFromFile'),
                          dict(type='LoadAnnotations', with_bbox=True, with_mask=True)],
                **kwargs)


def test_registered_dataset_generates_on_first_use(tmp_path):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')

    root = tmp_path / 'demo'
    assert not root.exists()
    dataset = DATASETS.build(_val_cfg(root, generate=SMALL))
    assert (root / 'annotations' / 'instances_train.json').is_file()
    assert len(dataset) == SMALL['num_val']
    assert dataset.metainfo['classes'] == CLASSES
    assert len(dataset.metainfo['palette']) == len(CLASSES)
    with open(root / 'annotations' / 'instances_val.json') as f:
        n_anns = len(json.load(f)['annotations'])
    results = [dataset[i] for i in range(len(dataset))]
    assert sum(len(r['gt_bboxes_labels']) for r in results) == n_anns
    sample = results[0]
    assert sample['img'].shape == (64, 64, 3)
    masks = sample['gt_masks'].to_ndarray()
    assert masks.shape == (len(sample['gt_bboxes_labels']), 64, 64)
    # Boxes are the masks' extents (mmdet boxes are x1, y1, x2, y2 with x2 = last pixel + 1).
    for box, mask in zip(sample['gt_bboxes'].numpy(), masks):
        x, y, w, h = mask_to_bbox(mask)
        np.testing.assert_allclose(box, [x, y, x + w, y + h])


def test_registered_dataset_rejects_data_from_other_arguments(small_root):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')

    assert len(DATASETS.build(_val_cfg(small_root, generate=SMALL))) == SMALL['num_val']
    with pytest.raises(ValueError, match='generated with'):
        DATASETS.build(_val_cfg(small_root, generate=dict(SMALL, seed=3)))
    # generate=False: a plain COCO loader, no check.
    assert len(DATASETS.build(_val_cfg(small_root, generate=False))) == SMALL['num_val']


def test_make_demo_data_tool(tmp_path, small_root, capsys):
    import importlib.util
    path = osp.join(REPO_ROOT, 'tools', 'make_demo_data.py')
    spec = importlib.util.spec_from_file_location('make_demo_data', path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / 'tool')
    args = ['--out', out, '--num-train', '12', '--num-val', '6', '--image-size', '64', '--seed', '0']
    tool.main(args)
    assert 'val: 6 images' in capsys.readouterr().out
    assert _tree_digest(out) == _tree_digest(small_root)
    tool.main(args)  # second time: nothing regenerated
    assert 'already holds' in capsys.readouterr().out


def test_module_has_no_mmdet_dependency():
    # The generator is usable without the OpenMMLab stack (only numpy and the standard library).
    with open(shapes.__file__) as f:
        source = f.read()
    assert 'import mm' not in source and 'from mm' not in source


def _run_python(script):
    """Runs ``script`` in a fresh interpreter from the repository root; returns its stdout."""
    repo = REPO_ROOT
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(script)], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_layer_library_does_not_bring_the_demo_dataset():
    """``import cbn_mmdet`` leaves the demo package out; ``import cbn_mmdet_demo`` registers it."""
    out = _run_python('''
        import sys
        import cbn_mmdet
        from mmdet.registry import DATASETS
        assert 'cbn_mmdet_demo' not in sys.modules
        assert 'DemoShapesDataset' not in DATASETS.module_dict
        import cbn_mmdet_demo
        assert DATASETS.module_dict['DemoShapesDataset'] is cbn_mmdet_demo.DemoShapesDataset
        print('OK')
    ''')
    assert out.strip() == 'OK'


def test_generator_works_without_openmmlab(tmp_path):
    out = _run_python(f'''
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('mmcv', 'mmengine', 'mmdet', 'torch'):
                    raise ModuleNotFoundError(f'No module named {{name!r}} (blocked by the test)')
                return None

        sys.meta_path.insert(0, Block())
        import cbn_mmdet_demo
        assert 'DemoShapesDataset' not in cbn_mmdet_demo.__all__
        cbn_mmdet_demo.make_demo_dataset({str(tmp_path / 'demo')!r}, num_train=2, num_val=1,
                                         image_size=64)
        print('OK')
    ''')
    assert out.strip() == 'OK'
