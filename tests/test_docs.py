"""What the README states about the code, checked against the code."""
import argparse
import ast
import inspect
import os.path as osp
import re
import shlex

import pytest
from mmengine.config import Config, DictAction

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine import hooks

from conftest import REPO_ROOT as REPO  # noqa: E402
README = open(osp.join(REPO, 'README.md')).read()


@pytest.mark.parametrize('hook', ['CBNBurnInHook', 'NormSwitchHook', 'CBNMonitorHook',
                                  'RNGStateHook'])
def test_readme_hook_signatures_show_the_code_defaults(hook):
    match = re.search(r'`' + hook + r'\(([^`]*)\)`', README)
    assert match, f'README shows no `{hook}(...)` signature'
    defaults = {name: p.default for name, p in
                inspect.signature(getattr(hooks, hook).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for item in filter(None, (a.strip() for a in re.split(r',\s*(?=\w+=)', match.group(1)))):
        name, value = item.split('=', 1)
        try:
            shown = ast.literal_eval(value)
        except ValueError:  # a set of allowed values, e.g. None|int|'auto'
            shown = ast.literal_eval(value.split('|')[0])
        assert name in defaults, f'{hook}: README shows {name}, the code has no such argument'
        assert shown == defaults[name], f'{hook}: README says {name}={value}, code {defaults[name]!r}'


def test_readme_smoke_run_reaches_cbn():
    """The demo smoke run the README gives trains some iterations after the burn-in."""
    args = re.search(r"DEMO_TRAIN_ARGS='--cfg-options ([^']*)'", README).group(1)
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_demo-shapes.py'))
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *shlex.split(args)]).cfg_options)
    burn_in = next(h for h in cfg.custom_hooks if h.type == 'CBNBurnInHook').burn_in
    assert burn_in < cfg.train_cfg.max_iters


def test_mmcv_build_time_is_stated_alike_everywhere():
    figures = {}
    for name in ('README.md', 'Makefile', '.ci/run', 'tools/setup_env.sh'):
        text = open(osp.join(REPO, name)).read()
        found = set(re.findall(r'(\d+)\s*[-–]\s*(\d+) minutes\W+on\W+2 cores', text))
        assert found, f'{name} states no build time'
        figures[name] = found
    assert len(set.union(*figures.values())) == 1, figures
