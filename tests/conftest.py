"""Shared fixtures and paths. The test tree mirrors the code: ``test_models``, ``test_ops``,
``test_engine`` (cbn_mmdet), ``test_tools``, ``test_configs``, ``test_demo`` (cbn_mmdet_demo)."""
import os.path as osp
import sys

import pytest

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(REPO_ROOT, 'tools')
HELPERS = osp.join(REPO_ROOT, 'tests', 'helpers')
# the tools are scripts, not a package; the helpers are stand-ins and subprocess workers
for path in (TOOLS, HELPERS):
    if path not in sys.path:
        sys.path.insert(0, path)

#: Generation arguments of :func:`tiny_demo_data`: 4 train / 2 val images of 64 px.
TINY_DEMO_ARGS = dict(num_train=4, num_val=2, image_size=64, seed=0, min_objects=1, max_objects=3)


@pytest.fixture(scope='session')
def tiny_demo_data(tmp_path_factory):
    """A tiny demo-shapes dataset (COCO layout) generated once per session; returns its root.

    Layout: ``root/annotations/instances_{train,val}.json``, ``root/{train,val}/*.png``. Configs
    use it with ``data_root=root`` and ``generate=False`` (or ``generate=TINY_DEMO_ARGS``).
    """
    from cbn_mmdet_demo.shapes import make_demo_dataset
    root = str(tmp_path_factory.mktemp('tiny_demo_shapes'))
    make_demo_dataset(root, **TINY_DEMO_ARGS)
    return root
