"""Evaluate a single-stage detector whose shared head has BN-type norms (BN, CBN with any ``per_call``)
with the running statistics as trained, and with statistics recomputed per FPN level or over all levels.

    OMP_NUM_THREADS=1 .venv/bin/python tools/analysis/head_level_statistics.py CONFIG CHECKPOINT \\
        [--batches 25] [--out result.json] [--cfg-options k=v ...]

Why: RetinaNet's and FCOS's stacked head convs are called once per FPN level, but BN (and CBN with
``per_call=0``) has one ``running_mean``/``running_var``. In training BN normalises each level with
that level's statistics; the running statistics are an exponential average over the calls in level
order (P3 first, P7 last, momentum 0.1 each), so evaluation normalises every level with one set,
weighted towards the last levels. CBN with ``per_call=N`` keeps running statistics per call. CBN with ``per_call=0`` normalises each level with its own batch
plus the pooled past of all levels, which is closer to what evaluation does.

Three evaluations of the same checkpoint (COCO bbox metrics of the config's test loader):

* ``running``: as trained (what ``tools/test.py`` reports);
* ``shared``: every head norm's statistics recomputed over all levels together on ``--batches``
  training batches (in eval mode, layer by layer, each layer after its predecessors were recomputed:
  "precise BN" statistics), one set for all levels;
* ``per_level``: the same recomputation per level, and each call of a layer normalised with its own
  level's statistics (what CBN with ``per_call`` does at evaluation with its per-call running
  statistics).

It also prints, per head norm, how far its running mean is from each level's recomputed mean (mean over
channels of ``|running_mean - level_mean| / level_std``). Writes nothing unless ``--out`` is given.
"""
import argparse
import json
import os.path as osp
import sys
import tempfile
from typing import Dict, List

import torch

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import cbn_mmdet  # noqa: E402,F401  (registers CBN and the hooks)


def head_norms(model) -> List[List[torch.nn.Module]]:
    """The head's BN-type norms by depth: ``[[cls_convs.0.norm, reg_convs.0.norm], ...]``."""
    head = model.bbox_head
    depth = []
    for convs in zip(head.cls_convs, head.reg_convs):
        norms = [c.norm for c in convs if isinstance(getattr(c, 'norm', None),
                                                     torch.nn.modules.batchnorm._BatchNorm)]
        if norms:
            depth.append(norms)
    return depth


class LevelStatistics:
    """Per-level (or pooled) statistics of a norm's input, and the hook that applies them.

    The head calls each layer once per level in level order, so the i-th call after :meth:`reset`
    is level i."""

    def __init__(self, layer, num_levels: int, per_level: bool):
        self.layer, self.num_levels, self.per_level = layer, num_levels, per_level
        n = num_levels if per_level else 1
        c = layer.num_features
        self.sums = torch.zeros(n, c, dtype=torch.float64)
        self.squares = torch.zeros(n, c, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.float64)
        self.mean = self.var = None
        self.call = 0
        self.measuring = False
        layer.register_forward_pre_hook(self._pre)

    def reset(self):
        self.call = 0

    def _slot(self):
        return self.call % self.num_levels if self.per_level else 0

    def _pre(self, module, args):
        x = args[0]
        slot = self._slot()
        self.call += 1
        if self.measuring:
            x64 = x.detach().double()
            self.sums[slot] += x64.sum((0, 2, 3))
            self.squares[slot] += (x64 ** 2).sum((0, 2, 3))
            self.counts[slot] += x.shape[0] * x.shape[2] * x.shape[3]
        elif self.mean is not None:  # normalise with the recomputed statistics of this call
            for name, buffer in running_buffers(module).items():
                buffer.copy_(self.mean[slot] if name.endswith('mean') else self.var[slot])

    def finish(self):
        counts = self.counts.clamp_min(2).unsqueeze(1)
        self.mean = (self.sums / counts).float()
        # unbiased, as BN's running variance
        self.var = ((self.squares - self.sums ** 2 / counts) / (counts - 1)).clamp_min(0).float()
        self.measuring = False


def running_buffers(layer) -> Dict[str, torch.Tensor]:
    """The layer's running mean/variance buffers (CBN with ``per_call``: one pair per call)."""
    return {name: buffer for name, buffer in layer.named_buffers(recurse=False)
            if name.endswith(('running_mean', 'running_var'))}


def recompute(model, batches, num_levels: int, per_level: bool) -> List[LevelStatistics]:
    """Recompute every head norm's statistics, depth by depth, on ``batches`` (eval mode)."""
    stats = []
    for depth in head_norms(model):
        current = [LevelStatistics(layer, num_levels, per_level) for layer in depth]
        for s in current:
            s.measuring = True
        with torch.no_grad():
            for data in batches:
                data = model.data_preprocessor(data, False)
                for s in stats + current:
                    s.reset()
                model.bbox_head(model.extract_feat(data['inputs']))
        for s in current:
            s.finish()
        stats += current
    return stats


def level_distances(model, per_level_stats, trained) -> Dict[str, List[float]]:
    """``trained``: ``{id(layer): {buffer name: value}}`` as trained (the hooks overwrite the
    layers' buffers)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for s in per_level_stats:
        running = trained[id(s.layer)]['running_mean'].float()
        out[names[id(s.layer)]] = [
            float(((running - s.mean[i]).abs() / (s.var[i] + s.layer.eps).sqrt()).mean())
            for i in range(s.num_levels)]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--batches', type=int, default=25,
                        help='training batches for the recomputed statistics (default 25)')
    parser.add_argument('--out', help='write the metrics and distances here (JSON)')
    parser.add_argument('--cfg-options', nargs='+', default=[])
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        options = argparse.ArgumentParser()
        options.add_argument('--cfg-options', nargs='+', action=DictAction)
        cfg.merge_from_dict(options.parse_args(['--cfg-options', *args.cfg_options]).cfg_options)
    cfg.work_dir = tempfile.mkdtemp(prefix='head_level_statistics_')
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', []) if h['type'] != 'CBNBurnInHook']
    runner = Runner.from_cfg(cfg)
    runner._test_loop = runner.build_test_loop(runner._test_loop)
    runner.call_hook('before_run')  # what runner.test() does first (the logger's paths)
    runner.load_checkpoint(args.checkpoint, map_location='cpu')
    model = runner.model.eval()
    if not head_norms(model):
        raise SystemExit(f'{args.config}: the head has no BN-type norm layer')
    num_levels = model.neck.num_outs
    loader = runner.build_dataloader(cfg.train_dataloader)
    batches = []
    for data in loader:
        batches.append(data)
        if len(batches) == args.batches:
            break
    trained = {id(m): {name: b.clone() for name, b in running_buffers(m).items()}
               for depth in head_norms(model) for m in depth}

    def restore():
        for depth in head_norms(model):
            for m in depth:
                for name, buffer in running_buffers(m).items():
                    buffer.copy_(trained[id(m)][name])

    def evaluate(stats):
        restore()
        if stats:
            # every forward of the head starts at level 0: reset the call counters before it
            hook = model.bbox_head.register_forward_pre_hook(
                lambda module, inputs: [s.reset() for s in stats] and None)
        metrics = runner.test_loop.run()
        if stats:
            hook.remove()
            for s in stats:
                s.mean = None  # stop applying them
        return {k: float(v) for k, v in metrics.items()}

    results = {'running': evaluate(None)}
    for name, per_level in (('shared', False), ('per_level', True)):
        restore()  # recompute from the trained layers
        stats = recompute(model, batches, num_levels, per_level)
        if per_level:
            results['running_mean_distance_to_level'] = level_distances(model, stats, trained)
        results[name] = evaluate(stats)
    print('statistics   bbox_mAP  bbox_mAP_50  bbox_mAP_75')
    for name in ('running', 'shared', 'per_level'):
        m = results[name]
        print(f"{name:<12} {m['coco/bbox_mAP']:.3f}     {m['coco/bbox_mAP_50']:.3f}        "
              f"{m['coco/bbox_mAP_75']:.3f}")
    print('|running_mean - level mean| / level std, per head norm, levels P3..P7:')
    for layer, d in results['running_mean_distance_to_level'].items():
        print(f'  {layer:<28} ' + ' '.join(f'{v:6.2f}' for v in d))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
