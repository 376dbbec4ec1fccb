"""Sphinx configuration of the cbn_mmdet documentation (``make docs``)."""
import os.path as osp
import re
import sys

DOCS = osp.dirname(osp.abspath(__file__))
REPO = osp.dirname(DOCS)
sys.path.insert(0, REPO)  # autodoc imports cbn_mmdet from this checkout


def read_version():
    """cbn_mmdet/version.py's version, read as text (no torch import for the title)."""
    with open(osp.join(REPO, 'cbn_mmdet', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


project = 'cbn_mmdet'
author = 'cbn_mmdet contributors'
copyright = 'cbn_mmdet contributors, Apache-2.0'
release = version = read_version()

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
root_doc = 'index'
exclude_patterns = ['_build']

myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3

# MathJax from a copy under _static (its SOURCE.txt says which): the equations render offline and
# without a CDN.
mathjax_path = 'mathjax/tex-svg.js'

autodoc_member_order = 'bysource'
# torch's own docstrings (e.g. autograd.Function.forward) refer to labels of torch's site
autodoc_inherit_docstrings = False
autodoc_typehints = 'description'
autodoc_default_options = {'members': True, 'show-inheritance': True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = 'alabaster'
html_title = f'cbn_mmdet {release}'
html_static_path = ['_static']
html_theme_options = {
    'description': f'Cross-Iteration Batch Normalization for mmdetection 3.x (version {release})',
    'page_width': '1240px', 'sidebar_width': '240px',
}
