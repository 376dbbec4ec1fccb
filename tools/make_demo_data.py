#!/usr/bin/env python
"""Generate the demo shapes dataset (COCO format, boxes and instance masks).

The demo configs generate it themselves on first use; this tool makes it ahead of time or with other
sizes. Example::

    python tools/make_demo_data.py --out data/demo_shapes --num-train 800 --num-val 200 \\
        --image-size 128 --seed 0
"""
import argparse
import json
import os.path as osp
import sys
import time

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

from cbn_mmdet_demo.shapes import (  # noqa: E402
    default_generation_args, is_complete, make_demo_dataset, read_generation_args)


def parse_args(argv=None):
    d = default_generation_args()
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='data/demo_shapes', help='output directory (data_root)')
    p.add_argument('--num-train', type=int, default=d['num_train'])
    p.add_argument('--num-val', type=int, default=d['num_val'])
    p.add_argument('--image-size', type=int, nargs='+', default=[d['image_size']],
                   help='side, or width height, in pixels')
    p.add_argument('--seed', type=int, default=d['seed'])
    p.add_argument('--min-objects', type=int, default=d['min_objects'])
    p.add_argument('--max-objects', type=int, default=d['max_objects'])
    p.add_argument('--min-size', type=float, default=d['min_size'],
                   help='smallest shape diameter, fraction of the short side')
    p.add_argument('--max-size', type=float, default=d['max_size'],
                   help='largest shape diameter, fraction of the short side')
    p.add_argument('--min-visible-fraction', type=float, default=d['min_visible_fraction'])
    p.add_argument('--overwrite', action='store_true', help='regenerate if the data exists')
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if len(a.image_size) not in (1, 2):
        raise SystemExit('--image-size takes one value (side) or two (width height)')
    image_size = a.image_size[0] if len(a.image_size) == 1 else a.image_size
    if is_complete(a.out) and not a.overwrite:
        print(f'{a.out} already holds a demo dataset generated with '
              f'{json.dumps(read_generation_args(a.out))}; pass --overwrite to regenerate')
        return
    start = time.time()
    make_demo_dataset(a.out, num_train=a.num_train, num_val=a.num_val, image_size=image_size,
                      seed=a.seed, min_objects=a.min_objects, max_objects=a.max_objects,
                      min_size=a.min_size, max_size=a.max_size,
                      min_visible_fraction=a.min_visible_fraction, overwrite=a.overwrite)
    for split in ('train', 'val'):
        with open(osp.join(a.out, 'annotations', f'instances_{split}.json')) as f:
            coco = json.load(f)
        print(f'{split}: {len(coco["images"])} images, {len(coco["annotations"])} instances')
    print(f'wrote {a.out} in {time.time() - start:.1f} s')


if __name__ == '__main__':
    main()
