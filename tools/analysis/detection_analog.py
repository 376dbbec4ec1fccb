"""BN vs GN vs CBN vs Naive CBN in the demo detector at 2 images per iteration: COCO bbox AP over seeds.

Each run (normalizer variant, seed) trains the demo Faster R-CNN from scratch in a subprocess with its own
directory under ``--work-dir``; finished runs are kept, so the study resumes. Design: docs/analysis.md.

    .venv/bin/python tools/analysis/detection_analog.py --workers 2     # 7 variants × 3 seeds
    .venv/bin/python tools/analysis/detection_analog.py --quick         # tiny data, 2 runs (tests)

Prints the table; writes ``detection_analog.{md,json,png}`` to ``--out`` (``--quick``: the work dir).
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

from common import (REPO_ROOT, Report, RunRecord, demo_detector_config, detector_parser,
                    ensure_dir, format_mean_std, markdown_table, mean, mean_std, plt,
                    resolve_detector_args, save_figure)

#: variant -> (normalizer in FPN + box head, normalizer in the backbone)
VARIANTS = {
    'BN': ('BN', 'BN'),
    'GN-heads': ('GN', 'BN'),
    'NaiveCBN-heads': ('NaiveCBN', 'BN'),
    'CBN-heads': ('CBN', 'BN'),
    'GN-all': ('GN', 'GN'),
    'NaiveCBN-all': ('NaiveCBN', 'NaiveCBN'),
    'CBN-all': ('CBN', 'CBN'),
    'BRN-all': ('BRN', 'BRN'),
    'NaiveCBN-all-k8': ('NaiveCBN', 'NaiveCBN'),
    'CBN-all-k8': ('CBN', 'CBN'),
    'BN-x4': ('BN', 'BN'),
    'BN-x8': ('BN', 'BN'),
}
#: the variants run by default (the study at 2 images per iteration)
DEFAULT_VARIANTS = ('BN', 'GN-heads', 'NaiveCBN-heads', 'CBN-heads', 'GN-all', 'NaiveCBN-all', 'CBN-all')
#: a variant's own window k (others: --window)
WINDOWS = {'NaiveCBN-all-k8': 8, 'CBN-all-k8': 8}
#: the paper's upper bound (Section 4.3): BN with k times the images per iteration, the examples a
#: window of k iterations sees; its learning rate follows the sqrt rule of --lr
IMAGES = {'BN-x4': 4, 'BN-x8': 8}
LABELS = {'BN': 'BN', 'GN': 'GN', 'NaiveCBN': 'Naive CBN', 'CBN': 'CBN', 'BRN': 'BRN'}
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')
ITERS, QUICK_ITERS = 1200, 20  # default --iters, without and with --quick


def uses_cbn(variant):
    return any('CBN' in kind for kind in VARIANTS[variant])


def norm_cfg(kind, window, gn_groups, burn_in=0, iters=1):
    if kind == 'BN':
        return dict(type='BN', requires_grad=True)
    if kind == 'GN':
        return dict(type='GN', num_groups=gn_groups, requires_grad=True)
    if kind == 'CBN':
        return dict(type='CBN', window=window, requires_grad=True)
    if kind == 'NaiveCBN':
        return dict(type='CBN', window=window, compensate=False, requires_grad=True)
    if kind == 'BRN':
        # BN while CBN burns in, then r_max 1 -> 3 and d_max 0 -> 5 (the BRN paper's limits) by mid-run
        ramp_end = max(burn_in, iters // 2, 1)
        return dict(type='BRN', warmup_iters=burn_in, rmax_iters=ramp_end, dmax_iters=ramp_end,
                    requires_grad=True)
    raise ValueError(f'unknown normalizer {kind!r}')


def settings_from_args(args):
    """Everything that defines a run apart from the variant and the seed (stored with each result)."""
    return dict(batch_size=args.batch_size, iters=args.iters, burn_in=args.burn_in, warmup=args.warmup,
                lr=args.lr, window=args.window, gn_groups=args.gn_groups, data_root=args.data_root,
                generation=args.generation, small_rois=args.quick)


def build_config(variant, seed, settings, work_dir):
    """The demo config with the variant's normalizers, the seed and the short schedule (an mmengine
    ``Config``)."""
    heads, backbone = VARIANTS[variant]
    window, groups = WINDOWS.get(variant, settings['window']), settings['gn_groups']
    images = IMAGES.get(variant, 1)
    norm_args = (window, groups, settings['burn_in'], settings['iters'])
    cfg = demo_detector_config(
        norm_cfg(heads, *norm_args), backbone_norm=norm_cfg(backbone, *norm_args),
        burn_in=settings['burn_in'] if uses_cbn(variant) else None, iters=settings['iters'],
        warmup=settings['warmup'], lr=settings['lr'] * math.sqrt(images), seed=seed,
        batch_size=settings['batch_size'] * images,
        data_root=settings['data_root'], generation=settings['generation'],
        few_rois=settings['small_rois'])
    cfg.work_dir = work_dir
    return cfg


def norm_census(model):
    """``{part: {normalizer: count}}`` over backbone / neck / rpn_head / roi_head of a built detector."""
    import torch.nn as nn
    from cbn_mmdet.models import BatchRenorm2d, CrossIterationBatchNorm2d
    census = {}
    for part in ('backbone', 'neck', 'rpn_head', 'roi_head'):
        counts = {}
        for m in getattr(model, part).modules():
            if isinstance(m, CrossIterationBatchNorm2d):
                kind = 'CBN' if m.compensate else 'NaiveCBN'
            elif isinstance(m, BatchRenorm2d):
                kind = 'BRN'
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
    from mmengine.runner import Runner

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec['threads'])
    work_dir = spec['work_dir']
    cfg = build_config(spec['variant'], spec['seed'], spec['settings'], work_dir)
    cfg.dump(osp.join(work_dir, 'config.py'))

    record = RunRecord()
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
    result['final_loss'] = mean(record.losses[-50:]) if record.losses else None
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


def summarize(variants, seeds, runs):
    """``{variant: {metric: {'values': per seed, 'mean', 'std'}, 'failures': [...], ...}}``
    (:func:`seed_stats.mean_std`: no std for one seed, no mean for none)."""
    summary = {}
    for v in variants:
        sel = {r['seed']: r for r in runs if r['variant'] == v}
        entry = dict(heads=VARIANTS[v][0], backbone=VARIANTS[v][1], seeds=[s for s in seeds if s in sel],
                     missing=[s for s in seeds if s not in sel],
                     failures={str(s): sel[s]['failure'] for s in sel if sel[s]['failure']})
        for m in METRICS:
            values = [sel[s][m] for s in entry['seeds']]
            entry[m] = dict(zip(('values', 'mean', 'std'), (values, *mean_std(values))))
        times = [sel[s].get('wall_seconds') for s in entry['seeds'] if sel[s].get('wall_seconds')]
        entry['seconds_per_run'] = statistics.mean(times) if times else None
        iters = [sel[s]['iter_seconds'] for s in entry['seeds'] if sel[s].get('iter_seconds')]
        entry['seconds_per_iter'] = statistics.mean(iters) if iters else None
        losses = [sel[s]['final_loss'] for s in entry['seeds'] if sel[s].get('final_loss') is not None]
        entry['final_loss'] = statistics.mean(losses) if losses else None
        summary[v] = entry
    return summary


def cell(stat, scale=100.0):
    return format_mean_std(stat['mean'], stat['std'], scale=scale)


def plot(path, variants, summary, title):
    """Bars of bbox AP and AP50 (mean ± std), each seed a dot; colour = normalizer in the heads, hatched
    = in the backbone too."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4.2))
    x = list(range(len(variants)))
    colors = {'BN': 'tab:blue', 'GN': 'tab:green', 'NaiveCBN': 'tab:orange', 'CBN': 'tab:red',
              'BRN': 'tab:purple'}
    for ax, m, name in zip(axes, ('bbox_mAP', 'bbox_mAP_50'), ('bbox AP', 'AP50')):
        means = [summary[v][m]['mean'] for v in variants]
        stds = [summary[v][m]['std'] for v in variants]
        bars = ax.bar(x, [0 if v is None else 100 * v for v in means],
                      yerr=[0 if s is None else 100 * s for s in stds], capsize=4,
                      color=[colors[VARIANTS[v][0]] for v in variants], alpha=0.8)
        for bar, v in zip(bars, variants):
            if VARIANTS[v][1] != 'BN' or v != 'BN' and VARIANTS[v] == ('BN', 'BN'):
                bar.set_hatch('//')  # the normalizer in the backbone too, or more images
        for i, v in enumerate(variants):
            vals = [100 * a for a in summary[v][m]['values'] if a is not None]
            ax.plot([i] * len(vals), vals, 'k.', markersize=4)
        ax.set_xticks(x)
        ax.set_xticklabels(variants, rotation=30, ha='right')
        ax.set_ylabel(f'{name} (%), mean ± std')
        ax.grid(True, axis='y', alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None):
    parser = detector_parser(__doc__, 'detection_analog', ITERS,
                             work_dir='runs go to WORK_DIR/bs<N>/<variant>/seed<S>/',
                             quick='tiny data (8 train / 4 val images of 64 px), 20 iterations, 1 seed, '
                                   'BN and CBN-heads (tests)', threads='torch threads per run')
    parser.add_argument('--variants', nargs='+', default=None, choices=list(VARIANTS),
                        help='default: ' + ' '.join(DEFAULT_VARIANTS) + ' (--quick: BN CBN-heads)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='default 0 1 2 (--quick: 0)')
    parser.add_argument('--window', type=int, default=4, help='CBN / Naive CBN window k')
    parser.add_argument('--gn-groups', type=int, default=16)
    parser.add_argument('--image-size', type=int, default=128,
                        help='side of the generated images (128: the demo data; another size: under '
                             'data/demo_shapes_<size> by default)')
    parser.add_argument('--workers', type=int, default=1, help='runs at once (each one thread)')
    parser.add_argument('--run-one', metavar='SPEC', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        return run_one(args.run_one)

    if args.quick:
        args.variants = args.variants or ['BN', 'CBN-heads']
        args.seeds = args.seeds if args.seeds is not None else [0]
    else:
        args.variants = args.variants or list(DEFAULT_VARIANTS)
        args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    resolve_detector_args(args, 'detection_analog', ITERS, QUICK_ITERS)
    settings = settings_from_args(args)

    # generate the data once, before the runs start (they would serialise on its lock otherwise)
    from cbn_mmdet_demo.shapes import make_demo_dataset
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
    # the study at 2 images keeps its name; other batch sizes are written beside it
    report = Report(args.out, 'detection_analog' + ('' if args.batch_size == 2 or args.quick
                                                    else f'_bs{args.batch_size}'))
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
                  f'(total {report.seconds:.0f} s)', flush=True)
    wall = report.seconds

    summary = summarize(args.variants, args.seeds, runs)
    header = ['variant', 'FPN + box head', 'backbone', 'k', 'images / iteration', 'bbox AP', 'AP50',
              'AP75', 'runs',
              'final train loss', 's / iteration', 's / run']
    rows = []
    for v in args.variants:
        e = summary[v]
        n_ok = len(e['seeds']) - len(e['failures'])
        k = str(WINDOWS.get(v, args.window)) if uses_cbn(v) else '–'
        rows.append([v, LABELS[e['heads']], LABELS[e['backbone']], k,
                     str(args.batch_size * IMAGES.get(v, 1))] + [cell(e[m]) for m in METRICS] +
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
    md = (f'# Detection analog: normalizers in Faster R-CNN at {args.batch_size} '
          f'image(s) per iteration\n\nCommand: `{command}`\n\n'
          f"Data: demo shapes, {gen['num_train']} train / {gen['num_val']} val images of "
          f"{gen['image_size']} px (`{osp.relpath(args.data_root, REPO_ROOT)}`). Model: "
          f'`configs/demo/faster-rcnn_r18_fpn_demo-shapes.py` (from scratch). {args.iters} iterations '
          f'of {args.batch_size} image(s), lr {args.lr:g}, warm-up {args.warmup}, ×0.1 at 75 % and 90 %; '
          f'CBN / Naive CBN: k = {args.window} after {args.burn_in} burn-in iterations (k = 1); '
          f'GN: {args.gn_groups} groups. "heads" = FPN + box head (backbone BN); "all" = backbone too '
          f'(BN in all layers is the BN row). BRN: BN for the burn-in iterations, then r_max 1 → 3 and '
          f'd_max 0 → 5 by half the run. BN-x<k>: BN with k times the images per iteration (lr × √k), '
          f'the examples a window of k iterations sees (the paper\'s upper bound, Section 4.3).\n\n'
          f'Wall time: {wall:.0f} s for {len(jobs)} run(s) with {args.workers} worker(s), '
          f'{args.threads} thread(s) each ({len(runs)} results in all, earlier ones included).\n\n'
          f'COCO bbox AP (%) on the val split, mean ± std over seeds {args.seeds}:\n\n' +
          markdown_table(header, rows) +
          ('\n\nMissing (no result; rerun the command to continue): ' +
           ', '.join(f'{v} seed {s}' for v, s, _ in lost) if lost else '') +
          '\n\nPer seed (%):\n\n' +
          markdown_table(['variant', 'seed', 'bbox AP', 'AP50', 'AP75', 'failure'], seed_rows) + '\n')
    report.write(md, dict(args=vars(args), settings=settings, summary=summary, runs=runs, wall_seconds=wall,
                          lost=[dict(variant=v, seed=s, log=log) for v, s, log in lost]),
                 plot=lambda path: plot(
                     path, args.variants, summary,
                     f'Faster R-CNN on demo shapes, {args.batch_size} image(s)/iteration, {args.iters} '
                     f'iterations, {len(args.seeds)} seed(s)'),
                 indent=1)
    return 1 if lost else 0


if __name__ == '__main__':
    sys.exit(main())
