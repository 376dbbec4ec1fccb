"""Where the project's configs are: inside an installed package, or in the repository."""
import os.path as osp

__all__ = ['config_dir', 'config_file']

_PACKAGE = osp.dirname(osp.abspath(__file__))


def config_dir() -> str:
    """``cbn_mmdet/.mim/configs`` of an installed package, else the repository's ``configs/``."""
    installed = osp.join(_PACKAGE, '.mim', 'configs')
    return installed if osp.isdir(installed) else osp.join(osp.dirname(_PACKAGE), 'configs')


def config_file(name: str) -> str:
    """Absolute path of a config by its name under ``configs/``, e.g.
    ``config_file('cbn_paper/faster-rcnn_r50_fpn_cbn-head_1x_coco.py')``."""
    path = osp.join(config_dir(), name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'no config {name!r} under {config_dir()}')
    return path
