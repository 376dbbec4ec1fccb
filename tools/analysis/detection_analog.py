"""BN vs GN vs CBN vs Naive CBN in a detector at 2 images per process: COCO bbox AP over seeds (issue
"Evidence that compensation works", item 4, "Detection analog"; the toy-scale analog of the paper's
Table 5 / Figure 3 rows on COCO).

The detector is the demo's (``configs/demo/faster-rcnn_r18_fpn_demo-shapes.py``): Faster R-CNN with a
half-width ResNet-18 (base width 32) + FPN (64 channels) + the 4conv1fc box head
(``Shared4Conv1FCBBoxHead``), trained **from scratch** on the generated demo "shapes" dataset (800 train /
200 val images of 128 px, 5 classes; ``data/demo_shapes/``, generated on first use), with mmengine's
``Runner``. Each run changes only the normalizer, the seed and the schedule:

* **heads** (``*-heads``): the normalizer in the FPN (lateral and output convs) and in the box head's 4
  convs; the backbone keeps BN (as in the demo config).
* **all layers** (``*-all``): the same normalizer in the backbone too. BN in all layers *is* the ``BN``
  row (the demo backbone already uses BN), so it is not run twice.
* Normalizers: ``BN``; ``GN`` (``--gn-groups`` groups, 16 by default: it divides every channel count
  here, 32-256, leaving ≥ 2 channels per group); ``CBN`` (``window=k``, compensation on); ``NaiveCBN``
  (``compensate=False``). The CBN variants (and only they) get ``CBNBurnInHook``: window 1 (plain BN)
  for the first ``--burn-in`` iterations (a quarter of the schedule by default), then ``k``. BN keeps
  its running statistics with momentum 0.1; CBN's running statistics come from the window (its default).
* Schedule (one process, ``--batch-size`` images per iteration, 2 by default; 1 is allowed): ``--iters``
  iterations (1200 by default), SGD, momentum 0.9, weight decay 1e-4, learning rate ``--lr`` (default
  0.04 · sqrt(bs / 8) = 0.02 at 2 images: the demo's rate at 8 images, square-root scaled), linear warm-up
  over ``--warmup`` iterations (iters // 8), ×0.1 at 75 % and 90 % of ``--iters``, gradient clipping at
  35 (as in the demo config). ``randomness.seed`` is the seed (initialisation and data order).
* Why 1200 iterations: the detector is trained from scratch and learns per *image* seen, whatever the
  batch size (its training loss after 2400 images is 1.15 at 8 images per iteration and at 2). Measured
  for CBN-heads, seed 0, one thread: 400 iterations (86 s per run) reach bbox AP 0.022 (lr 0.01) or 0.015
  (lr 0.04) -- too close to zero to compare normalizers; 1200 iterations (0.17-0.19 s per iteration,
  about 4 minutes per run with the evaluation) reach 0.080 (AP50 0.153). 64 px images
  (``--image-size 64``) are 1.5× faster per iteration with the same AP at 1200 iterations (0.085), and
  AdamW did not learn much faster (0.056 after 600 iterations). The demo config itself (9600 images)
  reaches 0.65. ``--iters 400`` gives the 90-second version of the study.
* Evaluation: COCO bbox AP, AP50, AP75 (``CocoMetric``) on the 200 validation images once, after the
  last iteration; BN and both CBNs evaluate with their running statistics (CBN in eval mode *is* BN).

Each run is a subprocess (this script with ``--run-one``; ``OMP_NUM_THREADS=1``, ``torch.set_num_threads
(--threads)``) with its own work directory ``--work-dir/bs<N>/<variant>/seed<S>/`` (the mmengine log, the
config it ran, ``stdout.log``, ``result.json``). The study is resumable: a run whose ``result.json``
exists with the same settings is not run again, so an interrupted study continues where it stopped (a
result with different settings is run again; a run that failed inside training, e.g. BN with one value
per channel, is a result too: delete its ``result.json`` to retry it). ``--workers N`` runs N runs at
once, one thread each.

Usage::

    .venv/bin/python tools/analysis/detection_analog.py --workers 2     # 7 variants × 3 seeds, ~45-50 min
    .venv/bin/python tools/analysis/detection_analog.py --quick         # tiny data, 2 runs (tests)
    .venv/bin/python tools/analysis/detection_analog.py --variants CBN-heads --seeds 0   # one trial run

Prints the table; writes ``detection_analog.{md,json,png}`` to ``--out`` (``docs/evidence``; with
``--quick``, the work directory).
"""
import argparse
import concurrent.futures
import json
import math
import os
import os.path as osp
import statistics
import subprocess
import sys
import time

from common import REPO_ROOT, ensure_dir, markdown_table, plt

DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'faster-rcnn_r18_fpn_demo-shapes.py')

#: variant -> (normalizer in FPN + box head, normalizer in the backbone)
VARIANTS = {
    'BN': ('BN', 'BN'),
    'GN-heads': ('GN', 'BN'),
    'NaiveCBN-heads': ('NaiveCBN', 'BN'),
    'CBN-heads': ('CBN', 'BN'),
    'GN-all': ('GN', 'GN'),
    'NaiveCBN-all': ('NaiveCBN', 'NaiveCBN'),
    'CBN-all': ('CBN', 'CBN'),
}
LABELS = {'BN': 'BN', 'GN': 'GN', 'NaiveCBN': 'Naive CBN', 'CBN': 'CBN'}
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')

#: the demo dataset (configs/_base_/datasets/demo_shapes_detection.py) and the tiny one of --quick
DEMO_DATA = dict(num_train=800, num_val=200, image_size=128, seed=0)
QUICK_DATA = dict(num_train=8, num_val=4, image_size=64, seed=0, min_objects=1, max_objects=3)


def uses_cbn(variant):
    return any('CBN' in kind for kind in VARIANTS[variant])


def norm_cfg(kind, window, gn_groups):
    if kind == 'BN':
        return dict(type='BN', requires_grad=True)
    if kind == 'GN':
        return dict(type='GN', num_groups=gn_groups, requires_grad=True)
    if kind == 'CBN':
        return dict(type='CBN', window=window, requires_grad=True)
    if kind == 'NaiveCBN':
        return dict(type='CBN', window=window, compensate=False, requires_grad=True)
    raise ValueError(f'unknown normalizer {kind!r}')


def settings_from_args(args):
    """Everything that defines a run apart from the variant and the seed (stored with each result)."""
    return dict(batch_size=args.batch_size, iters=args.iters, burn_in=args.burn_in, warmup=args.warmup,
                lr=args.lr, window=args.window, gn_groups=args.gn_groups, data_root=args.data_root,
                generation=args.generation, small_rois=args.quick)


def build_config(variant, seed, settings, work_dir):
    """The demo config with the variant's normalizers, the seed and the short schedule (an mmengine
    ``Config``)."""
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO_CONFIG)
    heads, backbone = VARIANTS[variant]
    window, groups = settings['window'], settings['gn_groups']
    iters, bs = settings['iters'], settings['batch_size']
    # (the demo config's head_norm_cfg variable was resolved when it was parsed: set each module's)
    cfg.model.backbone.norm_cfg = norm_cfg(backbone, window, groups)
    cfg.model.neck.norm_cfg = norm_cfg(heads, window, groups)
    cfg.model.roi_head.bbox_head.norm_cfg = norm_cfg(heads, window, groups)
    hooks = [h for h in cfg.custom_hooks if h['type'] != 'CBNBurnInHook']
    if uses_cbn(variant):
        hooks.insert(0, dict(type='CBNBurnInHook', burn_in=settings['burn_in'], by_epoch=False))
    cfg.custom_hooks = hooks

    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=settings['warmup']),
        dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters,
             milestones=[int(iters * 0.75), int(iters * 0.9)], gamma=0.1)]
    cfg.optim_wrapper.optimizer.lr = settings['lr']
    cfg.randomness = dict(seed=seed)
    cfg.default_hooks.checkpoint = None  # nothing is evaluated later: no checkpoint
    cfg.default_hooks.logger.interval = max(1, min(50, iters // 10))
    cfg.work_dir = work_dir

    root = settings['data_root'].rstrip('/') + '/'
    size = settings['generation']['image_size']
    cfg.train_dataloader.batch_size = bs
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = root
        loader.dataset.generate = settings['generation']
        for step in loader.dataset.pipeline:
            if step['type'] == 'Resize':
                step['scale'] = (size, size)
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = root + 'annotations/instances_val.json'
    if settings['small_rois']:  # --quick: fewer proposals and RoIs (as tests/test_tools.py)
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
        cfg.model.test_cfg.rpn.update(nms_pre=200, max_per_img=50)
        cfg.model.test_cfg.rcnn.max_per_img = 20
    return cfg


def norm_census(model):
    """``{part: {normalizer: count}}`` over backbone / neck / rpn_head / roi_head of a built detector."""
    import torch.nn as nn
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    census = {}
    for part in ('backbone', 'neck', 'rpn_head', 'roi_head'):
        counts = {}
        for m in getattr(model, part).modules():
            if isinstance(m, CrossIterationBatchNorm2d):
                kind = 'CBN' if m.compensate else 'NaiveCBN'
            elif isinstance(m, nn.GroupNorm):
                kind = 'GN'
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                kind = 'BN'
            else:
                continue
            counts[kind] = counts.get(kind, 0) + 1
        census[part] = counts
    return census


def run_one(spec_path):
    """Child process: train one run with mmengine's Runner, evaluate, write ``result.json``."""
    import torch
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    import cbn_mmdet  # noqa: F401

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec['threads'])
    work_dir = spec['work_dir']
    cfg = build_config(spec['variant'], spec['seed'], spec['settings'], work_dir)
    cfg.dump(osp.join(work_dir, 'config.py'))

    class Record(Hook):
        priority = 'LOWEST'

        def __init__(self):
            self.times, self.metrics, self.losses = {}, None, []

        def before_train(self, runner):
            self.times['train_start'] = time.perf_counter()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            loss = (outputs or {}).get('loss')
            if loss is not None:
                self.losses.append(float(loss.detach() if hasattr(loss, 'detach') else loss))

        def before_val(self, runner):
            self.times['val_start'] = time.perf_counter()

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})
            self.times['val_end'] = time.perf_counter()

    record = Record()
    result = dict(variant=spec['variant'], seed=spec['seed'], settings=spec['settings'],
                  heads=VARIANTS[spec['variant']][0], backbone=VARIANTS[spec['variant']][1],
                  burn_in_hook=any(h['type'] == 'CBNBurnInHook' for h in cfg.custom_hooks),
                  failure=None)
    try:
        runner = Runner.from_cfg(cfg)
        runner.register_hook(record)
        result['norms'] = norm_census(runner.model)
        runner.train()
    except Exception as e:  # a run that cannot train is a result (e.g. 1 value per channel at bs 1)
        result['failure'] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
    t = record.times
    if 'val_start' in t and 'train_start' in t:
        result['train_seconds'] = t['val_start'] - t['train_start']
        result['iter_seconds'] = result['train_seconds'] / spec['settings']['iters']
    if 'val_end' in t:
        result['eval_seconds'] = t['val_end'] - t['val_start']
    tail = record.losses[-50:]
    result['final_loss'] = sum(tail) / len(tail) if tail else None
    result['loss_finite'] = all(math.isfinite(v) for v in record.losses)
    metrics = record.metrics
    if result['failure'] is None:
        if metrics is None:
            result['failure'] = 'no validation ran'
        elif not metrics:  # mmdet's CocoMetric returns {} when there is no detection at all
            result['no_detections'] = True
            metrics = {f'coco/{m}': 0.0 for m in METRICS}
    for m in METRICS:
        value = None if not metrics else metrics.get(f'coco/{m}')
        result[m] = None if value is None else float(value)
    tmp = osp.join(work_dir, 'result.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, osp.join(work_dir, 'result.json'))  # a result exists only for a finished run
    return 0 if result['failure'] is None else 1


def run_dir(args, variant, seed):
    return osp.join(args.work_dir, f'bs{args.batch_size}', variant, f'seed{seed}')


def load_result(path, settings):
    """The finished result at ``path`` if it was made with ``settings``, else ``None``."""
    if not osp.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result.get('settings') == settings else None


def launch(args, settings, variant, seed):
    """Run one training in a subprocess (one thread); returns ``(result or None, wall seconds, log)``."""
    work_dir = ensure_dir(run_dir(args, variant, seed))
    result_path = osp.join(work_dir, 'result.json')
    if osp.exists(result_path):
        os.remove(result_path)  # stale (other settings): do not keep it if this run is interrupted
    spec_path = osp.join(work_dir, 'spec.json')
    with open(spec_path, 'w') as f:
        json.dump(dict(variant=variant, seed=seed, settings=settings, work_dir=work_dir,
                       threads=args.threads), f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    log = osp.join(work_dir, 'stdout.log')
    start = time.perf_counter()
    with open(log, 'w') as out:
        subprocess.run([sys.executable, osp.abspath(__file__), '--run-one', spec_path], cwd=REPO_ROOT,
                       env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    result = load_result(result_path, settings)
    if result is not None:
        result['wall_seconds'] = wall
        with open(result_path, 'w') as f:
            json.dump(result, f, indent=1)
    return result, wall, log


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float('nan'), float('nan')
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(variants, seeds, runs):
    """``{variant: {metric: {'values': per seed, 'mean', 'std'}, 'failures': [...], ...}}``."""
    summary = {}
    for v in variants:
        sel = {r['seed']: r for r in runs if r['variant'] == v}
        entry = dict(heads=VARIANTS[v][0], backbone=VARIANTS[v][1], seeds=[s for s in seeds if s in sel],
                     missing=[s for s in seeds if s not in sel],
                     failures={str(s): sel[s]['failure'] for s in sel if sel[s]['failure']})
        for m in METRICS:
            values = [sel[s][m] for s in entry['seeds']]
            mean, std = mean_std(values)
            entry[m] = dict(values=values, mean=mean, std=std)
        times = [sel[s].get('wall_seconds') for s in entry['seeds'] if sel[s].get('wall_seconds')]
        entry['seconds_per_run'] = statistics.mean(times) if times else None
        iters = [sel[s]['iter_seconds'] for s in entry['seeds'] if sel[s].get('iter_seconds')]
        entry['seconds_per_iter'] = statistics.mean(iters) if iters else None
        losses = [sel[s]['final_loss'] for s in entry['seeds'] if sel[s].get('final_loss') is not None]
        entry['final_loss'] = statistics.mean(losses) if losses else None
        summary[v] = entry
    return summary


def cell(stat, scale=100.0):
    if not math.isfinite(stat['mean']):
        return '–'
    return f"{scale * stat['mean']:.1f} ± {scale * stat['std']:.1f}"


def plot(path, variants, summary, title):
    """Bars of bbox AP and AP50 (mean ± std), each seed a dot; colour = normalizer in the heads, hatched
    = in the backbone too."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    x = list(range(len(variants)))
    colors = {'BN': 'tab:blue', 'GN': 'tab:green', 'NaiveCBN': 'tab:orange', 'CBN': 'tab:red'}
    for ax, m, name in zip(axes, ('bbox_mAP', 'bbox_mAP_50'), ('bbox AP', 'AP50')):
        means = [100 * summary[v][m]['mean'] for v in variants]
        stds = [100 * summary[v][m]['std'] for v in variants]
        bars = ax.bar(x, [0 if math.isnan(v) else v for v in means],
                      yerr=[0 if math.isnan(s) else s for s in stds], capsize=4,
                      color=[colors[VARIANTS[v][0]] for v in variants], alpha=0.8)
        for bar, v in zip(bars, variants):
            if v.endswith('-all'):
                bar.set_hatch('//')  # the normalizer in the backbone too
        for i, v in enumerate(variants):
            vals = [100 * a for a in summary[v][m]['values'] if a is not None]
            ax.plot([i] * len(vals), vals, 'k.', markersize=4)
        ax.set_xticks(x)
        ax.set_xticklabels(variants, rotation=30, ha='right')
        ax.set_ylabel(f'{name} (%), mean ± std')
        ax.grid(True, axis='y', alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=None, help='default docs/evidence (--quick: WORK_DIR)')
    parser.add_argument('--work-dir', default=None,
                        help='runs go to WORK_DIR/bs<N>/<variant>/seed<S>/ (default '
                             'work_dirs/detection_analog, work_dirs/detection_analog_quick with --quick)')
    parser.add_argument('--variants', nargs='+', default=None, choices=list(VARIANTS),
                        help='default: all seven (--quick: BN CBN-heads)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='default 0 1 2 (--quick: 0)')
    parser.add_argument('--batch-size', type=int, default=2, help='images per iteration (1 process)')
    parser.add_argument('--iters', type=int, default=None, help='training iterations (default 1200)')
    parser.add_argument('--burn-in', type=int, default=None,
                        help='CBN variants: iterations with window 1 (default: iters // 4)')
    parser.add_argument('--warmup', type=int, default=None, help='linear warm-up iterations (default: '
                                                                 'iters // 8)')
    parser.add_argument('--lr', type=float, default=None,
                        help='default 0.04 · sqrt(batch size / 8): 0.02 at 2 images')
    parser.add_argument('--window', type=int, default=4, help='CBN / Naive CBN window k')
    parser.add_argument('--gn-groups', type=int, default=16)
    parser.add_argument('--image-size', type=int, default=128,
                        help='side of the generated images (128: the demo data)')
    parser.add_argument('--data-root', default=None,
                        help='default data/demo_shapes (the demo data; data/demo_shapes_<size> for '
                             'another --image-size; --quick: WORK_DIR/data, tiny)')
    parser.add_argument('--workers', type=int, default=1, help='runs at once (each one thread)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--quick', action='store_true',
                        help='tiny data (8 train / 4 val images of 64 px), 20 iterations, 1 seed, '
                             'BN and CBN-heads (tests)')
    parser.add_argument('--run-one', metavar='SPEC', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        return run_one(args.run_one)

    if args.quick:
        args.variants = args.variants or ['BN', 'CBN-heads']
        args.seeds = args.seeds if args.seeds is not None else [0]
        args.iters = args.iters or 20
        args.generation = QUICK_DATA
        args.work_dir = args.work_dir or osp.join(REPO_ROOT, 'work_dirs', 'detection_analog_quick')
        args.data_root = args.data_root or osp.join(args.work_dir, 'data')
    else:
        args.variants = args.variants or list(VARIANTS)
        args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
        args.iters = args.iters or 1200
        args.generation = dict(DEMO_DATA, image_size=args.image_size)
        args.work_dir = args.work_dir or osp.join(REPO_ROOT, 'work_dirs', 'detection_analog')
        args.data_root = args.data_root or osp.join(
            REPO_ROOT, 'data', 'demo_shapes' + ('' if args.image_size == 128 else f'_{args.image_size}'))
    args.work_dir = osp.abspath(args.work_dir)
    args.out = args.out or (args.work_dir if args.quick else osp.join(REPO_ROOT, 'docs', 'evidence'))
    args.data_root = osp.abspath(args.data_root)
    args.burn_in = args.iters // 4 if args.burn_in is None else args.burn_in
    args.warmup = max(1, args.iters // 8) if args.warmup is None else args.warmup
    args.lr = round(0.04 * math.sqrt(args.batch_size / 8), 4) if args.lr is None else args.lr
    settings = settings_from_args(args)

    # generate the data once, before the runs start (they would serialise on its lock otherwise)
    from cbn_mmdet.datasets.demo_shapes import make_demo_dataset
    make_demo_dataset(args.data_root, **args.generation)

    jobs, runs = [], []
    for variant in args.variants:
        for seed in args.seeds:
            done = load_result(osp.join(run_dir(args, variant, seed), 'result.json'), settings)
            if done is not None:
                runs.append(done)
                print(f'[detection_analog] {variant} seed={seed}: done before (AP {done["bbox_mAP"]})',
                      flush=True)
            else:
                jobs.append((variant, seed))
    start = time.time()
    print(f'[detection_analog] {len(jobs)} run(s) to do, {len(runs)} done before; {args.workers} '
          f'worker(s); settings {settings}', flush=True)
    lost = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(launch, args, settings, v, s): (v, s) for v, s in jobs}
        for future in concurrent.futures.as_completed(futures):
            variant, seed = futures[future]
            result, wall, log = future.result()
            if result is None:
                lost.append((variant, seed, log))
                print(f'[detection_analog] {variant} seed={seed}: NO RESULT after {wall:.0f} s, see {log}',
                      flush=True)
                continue
            runs.append(result)
            status = (f"AP {result['bbox_mAP']:.3f} AP50 {result['bbox_mAP_50']:.3f}"
                      if result['failure'] is None else f"FAILED: {result['failure']}")
            print(f'[detection_analog] {variant} seed={seed}: {status}, {wall:.0f} s '
                  f'(total {time.time() - start:.0f} s)', flush=True)
    wall = time.time() - start

    summary = summarize(args.variants, args.seeds, runs)
    header = ['variant', 'FPN + box head', 'backbone', 'bbox AP', 'AP50', 'AP75', 'runs',
              'final train loss', 's / iteration', 's / run']
    rows = []
    for v in args.variants:
        e = summary[v]
        n_ok = len(e['seeds']) - len(e['failures'])
        rows.append([v, LABELS[e['heads']], LABELS[e['backbone']]] + [cell(e[m]) for m in METRICS] +
                    [f"{n_ok}/{len(args.seeds)}" + (f" ({len(e['failures'])} failed)" if e['failures'] else ''),
                     '–' if e['final_loss'] is None else f"{e['final_loss']:.3f}",
                     '–' if e['seconds_per_iter'] is None else f"{e['seconds_per_iter']:.3f}",
                     '–' if e['seconds_per_run'] is None else f"{e['seconds_per_run']:.0f}"])
    seed_rows = [[v, str(r['seed'])] + ['–' if r[m] is None else f'{100 * r[m]:.1f}' for m in METRICS] +
                 [r['failure'] or '']
                 for v in args.variants for r in sorted((r for r in runs if r['variant'] == v),
                                                          key=lambda r: r['seed'])]
    command = ('.venv/bin/python tools/analysis/detection_analog.py' + (' --quick' if args.quick else '') +
               f' --variants {" ".join(args.variants)} --seeds {" ".join(map(str, args.seeds))}'
               f' --batch-size {args.batch_size} --iters {args.iters} --burn-in {args.burn_in}'
               f' --warmup {args.warmup} --lr {args.lr:g} --window {args.window}'
               f' --gn-groups {args.gn_groups} --workers {args.workers}')
    gen = args.generation
    md = (f'# Detection analog (item 4): BN, GN, Naive CBN, CBN in Faster R-CNN at {args.batch_size} '
          f'image(s) per iteration\n\nCommand: `{command}`\n\n'
          f"Data: demo shapes, {gen['num_train']} train / {gen['num_val']} val images of "
          f"{gen['image_size']} px (`{osp.relpath(args.data_root, REPO_ROOT)}`). Model: "
          f'`configs/demo/faster-rcnn_r18_fpn_demo-shapes.py` (from scratch). {args.iters} iterations '
          f'of {args.batch_size} image(s), lr {args.lr:g}, warm-up {args.warmup}, ×0.1 at 75 % and 90 %; '
          f'CBN / Naive CBN: k = {args.window} after {args.burn_in} burn-in iterations (k = 1); '
          f'GN: {args.gn_groups} groups. "heads" = FPN + box head (backbone BN); "all" = backbone too '
          f'(BN in all layers is the BN row).\n\n'
          f'Wall time: {wall:.0f} s for {len(jobs)} run(s) with {args.workers} worker(s), '
          f'{args.threads} thread(s) each ({len(runs)} results in all, earlier ones included).\n\n'
          f'COCO bbox AP (%) on the val split, mean ± std over seeds {args.seeds}:\n\n' +
          markdown_table(header, rows) +
          ('\n\nMissing (no result; rerun the command to continue): ' +
           ', '.join(f'{v} seed {s}' for v, s, _ in lost) if lost else '') +
          '\n\nPer seed (%):\n\n' +
          markdown_table(['variant', 'seed', 'bbox AP', 'AP50', 'AP75', 'failure'], seed_rows) + '\n')
    print(md)
    out = ensure_dir(args.out)
    with open(osp.join(out, 'detection_analog.md'), 'w') as f:
        f.write(md)
    with open(osp.join(out, 'detection_analog.json'), 'w') as f:
        json.dump(dict(args=vars(args), settings=settings, summary=summary, runs=runs, wall_seconds=wall,
                       lost=[dict(variant=v, seed=s, log=log) for v, s, log in lost]), f, indent=1)

    plot(osp.join(out, 'detection_analog.png'), args.variants, summary,
         f'Faster R-CNN on demo shapes, {args.batch_size} image(s)/iteration, {args.iters} iterations, '
         f'{len(args.seeds)} seed(s)')
    return 1 if lost else 0


if __name__ == '__main__':
    sys.exit(main())
