"""mmengine's ``compile=True`` with CBN: the demo detector trains with its CBN layers traced into the
compiled graphs (aot_eager backend), each bound to its conv, and evaluates."""
import warnings

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models import window_history
from short_run import shrink_config
from tiny_runs import CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 4),
    reason="torch 2.1 under torch.compile skips the optimizer step hooks CBN's clock counts")]


def test_mmengine_compile_traces_the_cbn_layers_of_the_demo_detector(tiny_demo_data, tmp_path,
                                                                     monkeypatch):
    traced_records = []  # the traced forward's record (an eager forward takes another path)
    record_at_cursor = window_history.WindowHistory._record_at_cursor

    def counted(self, *args):
        traced_records.append(1)
        return record_at_cursor(self, *args)
    monkeypatch.setattr(window_history.WindowHistory, '_record_at_cursor', counted)
    torch._dynamo.reset()
    cfg = Config.fromfile(CONFIG)
    shrink_config(cfg, tiny_demo_data)
    iters = 3  # burn-in, the first window iteration, one in steady state: a graph each
    cfg.train_cfg.max_iters, cfg.train_cfg.val_interval = iters, iters
    cfg.default_hooks.checkpoint.interval = iters
    cfg.custom_hooks = [h for h in cfg.custom_hooks if h['type'] != 'CBNBurnInHook'] + [
        dict(type='CBNBurnInHook', burn_in=1, by_epoch=False)]
    cfg.compile = dict(backend='aot_eager')
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        runner.train()
    # the graph breaks are mmcv's C++ ops in mmdet's RoI head (nms, RoIAlign), none in CBN
    breaks = [str(w.message) for w in caught if 'Dynamo does not know how to trace' in str(w.message)]
    assert all('mmcv._ext' in message for message in breaks), breaks
    for w in caught:  # the others go through the suite's filters as if not caught
        if 'Dynamo does not know how to trace' not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    norms = [m for m in runner.model.modules() if isinstance(m, CBN)]
    assert len(norms) == 12  # FPN and the 4conv1fc box head
    assert {m.last_bind_status for m in norms} == {'conv'}
    assert [m.history_length for m in norms] == [iters - 1] * len(norms)
    # every CBN forward after burn-in ran inside a compiled graph
    assert len(traced_records) == len(norms) * (iters - 1)
    assert 'val/coco/bbox_mAP' in runner.message_hub.log_scalars
