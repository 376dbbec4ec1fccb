"""Packaging facts that must agree across files."""
import os.path as osp
import re
import subprocess
import sys

import cbn_mmdet

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


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
