"""Tiny training runs of the demo configs through tools/train.py (shared by the tool, resume,
distributed and single-stage config tests; the demo Faster R-CNN config unless told otherwise)."""
import os.path as osp

from mmengine.config import Config

from short_run import shrink_config

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'faster-rcnn_r18_fpn_demo-shapes.py')


def changed_options(before, after, prefix=''):
    """``(dotted key, value)`` for every value ``after`` sets differently from ``before`` (dicts are
    entered, anything else is compared whole)."""
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            yield from changed_options(old, value, f'{prefix}{key}.')
        elif value != old:
            yield f'{prefix}{key}', value


def schedule_overrides(max_iters, interval):
    """--cfg-options: train ``max_iters`` iterations, validate and save a checkpoint every ``interval``."""
    return [f'train_cfg.max_iters={max_iters}', f'train_cfg.val_interval={interval}',
            f'default_hooks.checkpoint.interval={interval}', 'default_hooks.checkpoint.max_keep_ckpts=-1',
            'default_hooks.logger.interval=1', 'randomness.seed=0']


def tiny_overrides(data_root, max_iters, interval=2, config=CONFIG):
    """--cfg-options that make the demo config ``config`` :func:`short_run.shrink_config`'s on
    ``data_root``, with :func:`schedule_overrides`. Single-stage detectors (no RPN) keep their
    numbers of detections (``few_rois`` is about proposals)."""
    original = Config.fromfile(config)
    tiny = shrink_config(Config.fromfile(config), data_root, few_rois='rpn_head' in original.model)
    shrink = changed_options(original.to_dict(), tiny.to_dict())
    return [f'{key}={value}' for key, value in shrink] + schedule_overrides(max_iters, interval)
