import os
import os.path as osp
import re
import shutil
import sys

from setuptools import find_packages, setup

if sys.version_info < (3, 9):
    sys.exit(f'cbn_mmdet needs Python >= 3.9 (this is {sys.version.split()[0]})')

HERE = osp.dirname(osp.abspath(__file__))


def read_version():
    """The version from cbn_mmdet/version.py, without importing the package (and torch)."""
    with open(osp.join(HERE, 'cbn_mmdet', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


def add_configs_to_package():
    """Copy configs/ into cbn_mmdet/.mim/configs for built distributions (mmdet's layout), so an
    installed package carries them; an editable install reads the repository's configs/."""
    if not {'bdist_wheel', 'sdist', 'build', 'build_py'} & set(sys.argv):
        return
    target = osp.join(HERE, 'cbn_mmdet', '.mim', 'configs')
    if osp.lexists(target):
        shutil.rmtree(target) if osp.isdir(target) and not osp.islink(target) else os.remove(target)
    shutil.copytree(osp.join(HERE, 'configs'), target)


add_configs_to_package()
setup(
    name='cbn_mmdet',
    version=read_version(),
    description='Cross-Iteration Batch Normalization (CBN) for PyTorch and mmdetection 3.x',
    license='Apache-2.0',
    # cbn_mmdet_demo: the demo configs' dataset, a package of its own (cbn_mmdet does not import it)
    packages=find_packages(include=['cbn_mmdet', 'cbn_mmdet.*', 'cbn_mmdet_demo']),
    # ops/csrc: the fused CPU ops' source, built on first use (cbn_mmdet/ops/fused.py)
    package_data={'cbn_mmdet': ['.mim/configs/**/*.py', '.mim/configs/**/*.md',
                                '.mim/configs/**/*.yml', 'ops/csrc/*.cpp',
                                'ops/csrc/*.h']},
    python_requires='>=3.9',
    # the layers need torch only; the OpenMMLab stack is an extra, so installing into an existing
    # mmdet environment never replaces the user's torch, mmcv or mmdet
    install_requires=['torch>=2.1'],
    extras_require={
        'mmdet': ['mmcv>=2.0.0,<2.2.0', 'mmengine>=0.10.0', 'mmdet>=3.3.0', 'pycocotools'],
        # classification (configs/cbn_imagenet/); torchvision: mmpretrain's transforms import it
        'mmpretrain': ['mmcv>=2.0.0,<2.2.0', 'mmengine>=0.10.0', 'mmpretrain>=1.2.0', 'torchvision'],
        'tests': ['pytest', 'expecttest'],  # expecttest: torch.testing._internal
        'analysis': ['matplotlib', 'scikit-learn'],
        'docs': ['sphinx>=9,<10', 'myst-parser>=5,<6'],
    },
)
