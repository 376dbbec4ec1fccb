from setuptools import find_packages, setup

setup(
    name='cbn_mmdet',
    version='0.1.0',
    description='Cross-Iteration Batch Normalization (CBN) for mmdetection 3.x',
    packages=find_packages(include=['cbn_mmdet', 'cbn_mmdet.*']),
    python_requires='>=3.9',
    install_requires=['torch>=2.0', 'mmcv>=2.0.0,<2.2.0', 'mmengine>=0.10.0', 'mmdet>=3.3.0',
                      'pycocotools'],
)
