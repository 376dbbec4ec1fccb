"""Packaging facts that must agree across files."""
import os.path as osp
import re
import subprocess
import sys

import cbn_mmdet

from conftest import REPO_ROOT as REPO  # noqa: E402


def test_one_version_everywhere():
    setup_version = subprocess.run([sys.executable, 'setup.py', '--version'], cwd=REPO,
                                   capture_output=True, text=True, check=True).stdout.split()[-1]
    citation = open(osp.join(REPO, 'CITATION.cff')).read()
    assert setup_version == cbn_mmdet.__version__
    assert re.search(r'^version: (\S+)$', citation, re.M).group(1) == cbn_mmdet.__version__


def test_license_and_citation_are_there():
    license_text = open(osp.join(REPO, 'LICENSE')).read()
    assert 'Apache License' in license_text and 'Version 2.0' in license_text
    assert 'OpenMMLab' in license_text  # the tools derived from mmdet say so
    assert 'Cross-Iteration Batch Normalization' in open(osp.join(REPO, 'CITATION.cff')).read()


def test_configs_are_findable_from_the_package():
    from cbn_mmdet.configs import config_file
    path = config_file('cbn_paper/faster-rcnn_r50_fpn_cbn-head_1x_coco.py')
    assert osp.isfile(path)
    import pytest
    with pytest.raises(FileNotFoundError, match='no config'):
        config_file('cbn_paper/nothing.py')


def test_built_wheel_carries_both_packages_and_the_configs(tmp_path):
    """A non-editable install has cbn_mmdet, cbn_mmdet_demo (the demo configs' dataset) and the
    configs under cbn_mmdet/.mim/configs (mmdet's layout)."""
    import shutil
    import zipfile
    src = tmp_path / 'src'
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        '.venv', '.git', 'work_dirs', 'data', '__pycache__', '*.egg-info', 'build', 'dist'))
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
                    '-w', str(tmp_path / 'dist'), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / 'dist').glob('cbn_mmdet-*.whl'))
    names = zipfile.ZipFile(wheel).namelist()
    assert 'cbn_mmdet/.mim/configs/cbn_paper/faster-rcnn_r50_fpn_cbn-head_1x_coco.py' in names
    assert 'cbn_mmdet/.mim/configs/cbn_paper/_base_/paper_1x.py' in names
    assert 'cbn_mmdet/.mim/configs/cbn_paper/metafile.yml' in names
    assert 'cbn_mmdet/.mim/configs/cbn_paper/paper_results.yml' in names
    assert 'cbn_mmdet/.mim/configs/cbn_imagenet/paper_results.yml' in names
    assert 'cbn_mmdet/.mim/configs/cbn_imagenet/_base_/schedule_100e_cosine.py' in names
    for module in ('cbn_mmdet/__init__.py', 'cbn_mmdet_demo/__init__.py', 'cbn_mmdet_demo/shapes.py',
                   'cbn_mmdet_demo/shapes_dataset.py', 'cbn_mmdet_demo/shapes_classification.py',
                   'cbn_mmdet_demo/shapes_classification_dataset.py',
                   'cbn_mmdet/ops/csrc/cbn_cpu.cpp', 'cbn_mmdet/ops/csrc/cbn_cpu.h',
                   'cbn_mmdet/ops/csrc/train_step.cpp'):
        assert module in names, module
