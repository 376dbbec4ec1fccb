"""``make demo`` with the classification demo config: its data generated, trained, evaluated and
top-1 printed, as a user runs it (the recipe's set-up step included)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CONFIG = 'configs/demo/resnet18_cbn_demo-shapes-cls.py'
# four iterations, the window on after two (the demo's schedule is 1200 with a 300-iteration burn-in)
SHORT = ('--cfg-options train_cfg.max_iters=4 train_cfg.val_interval=4 '
         'default_hooks.checkpoint.interval=4 default_hooks.logger.interval=1 '
         'custom_hooks.0.burn_in=2')


@pytest.mark.slow
def test_make_demo_trains_and_evaluates_the_classification_demo(tmp_path):
    pytest.importorskip('mmpretrain')
    if shutil.which('make') is None:
        pytest.skip('make is not installed')
    work = tmp_path / 'demo'
    done = subprocess.run(
        ['make', '--no-print-directory', 'demo', f'PYTHON={sys.executable}', f'DEMO_CONFIG={CONFIG}',
         f'DEMO_WORK_DIR={work}', f'DEMO_TRAIN_ARGS={SHORT}'],
        cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '[demo] top-1 accuracy of' in done.stdout
    # what the evaluation of the checkpoint prints (the training's own validation comes before)
    evaluation = done.stdout.split('[demo] top-1 accuracy of', 1)[1]
    top1 = re.search(r'accuracy/top1: (\d+\.\d+)', evaluation)
    assert top1 is not None and 0 <= float(top1.group(1)) <= 100
    log = next(work.glob('*/*.log')).read_text()
    assert 'Iter(train) [4/4]' in log
    assert re.search(r'\d+ CBN layers now use CBN with window 4 at iteration 2', log)
