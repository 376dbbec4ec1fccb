"""Figure 1 at CPU scale: top-1 against images per iteration, BN vs CBN (vs GN), through mmpretrain.

The classification demo (``configs/demo/resnet18_cbn_demo-shapes-cls.py``: half-width ResNet-18 from
scratch, generated 64-px shapes, 5 classes) trained with mmengine's Runner at N images per
iteration, every N seeing the same number of images (iterations = images / N), lr = base × N / 16
(the paper's linear rule), warm-up then cosine decay. CBN: window k = ⌈16 / N⌉ (N·k ≥ 16, as the
paper's Table 3; ``--window`` fixes k) after a burn-in of a quarter of the iterations at k = 1
(``--burn-in``). Each run (normalizer, N, seed) is a subprocess with its own directory under
``--work-dir``; finished runs are kept, so the study resumes.

    .venv/bin/python tools/analysis/classification_batch_size.py           # the study, ~35 min
    .venv/bin/python tools/analysis/classification_batch_size.py --quick   # tiny data, 4 runs (tests)
    .venv/bin/python tools/analysis/classification_batch_size.py --jobs 2  # two runs at a time

``--jobs J`` runs J subprocesses at a time (each with ``--threads`` threads); every run has its own
process, seed and settings whatever J is, so J changes the wall time, not the runs.

Prints the table; writes ``classification_batch_size.{md,json,png}`` (or ``--name``) to ``--out``
(``--quick``: the work dir).
"""
import argparse
import json
import math
import os
import os.path as osp
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from common import (REPO_ROOT, EVIDENCE_DIR, Report, RunRecord, analysis_parser, ensure_dir,
                    format_mean_std, markdown_table, mean, mean_std, plt, save_figure)

#: the demo config every run starts from
NAME = 'classification_batch_size'
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'resnet18_cbn_demo-shapes-cls.py')
NORMS = ('BN', 'CBN', 'CBN-naive', 'CBN-slices', 'NaiveCBN', 'GN')
LABELS = {'BN': 'BN', 'CBN': 'CBN', 'CBN-naive': "CBN, fallback='naive'",
          'CBN-slices': "CBN, concat='compensate'", 'NaiveCBN': 'Naive CBN', 'GN': 'GN'}
#: the burn-in (iterations at k = 1) as a fraction of the run, unless --burn-in says otherwise
BURN_IN = 0.25
#: --backbone densenet: a small DenseNet (mmpretrain's, 4 blocks of 4 pre-activation layers): each
#: layer's first norm normalises a concatenation, where CBN falls back (``fallback``), or with
#: 'CBN-slices' compensates each slice with the conv that produced it (``concat='compensate'``)
DENSENET = dict(growth_rate=12, depths=(4, 4, 4, 4), init_channels=24)
BACKBONES = ('resnet18', 'densenet')
#: the classification demo's data, and the tiny data of --quick
DATA = dict(num_train=1000, num_val=250, image_size=64, seed=0)
QUICK_DATA = dict(num_train=20, num_val=10, image_size=32, seed=0)


def window(images_per_iter: int, fixed=None) -> int:
    """CBN's window: ``fixed`` (--window) or k = ⌈16 / N⌉, at least 16 examples in the window (the
    paper's Table 3)."""
    return fixed if fixed is not None else max(1, math.ceil(16 / images_per_iter))


def norm_cfg(norm: str, images_per_iter: int, gn_groups: int, fixed_window=None) -> dict:
    k = window(images_per_iter, fixed_window)
    if norm == 'BN':
        return dict(type='BN', requires_grad=True)
    if norm == 'CBN':
        return dict(type='CBN', window=k, requires_grad=True)
    if norm == 'CBN-naive':  # inputs that are not a conv's output: the uncompensated window
        return dict(type='CBN', window=k, fallback='naive', requires_grad=True)
    if norm == 'CBN-slices':  # a concatenation compensated slice by slice
        return dict(type='CBN', window=k, concat='compensate', requires_grad=True)
    if norm == 'NaiveCBN':  # the window as recorded, nothing compensated (the paper's Naive CBN)
        return dict(type='CBN', window=k, compensate=False, requires_grad=True)
    if norm == 'GN':
        return dict(type='GN', num_groups=gn_groups, requires_grad=True)
    raise ValueError(f'unknown normalizer {norm!r}; expected one of {NORMS}')


def densenet_channels(arch: dict) -> int:
    """The channels mmpretrain's DenseNet outputs (transitions halve them, the last block's not)."""
    channels = arch['init_channels']
    for i, depth in enumerate(arch['depths']):
        channels += depth * arch['growth_rate']
        if i != len(arch['depths']) - 1:
            channels = math.floor(channels * 0.5)
    return channels


def iterations(settings: dict, images_per_iter: int) -> int:
    return max(1, settings['images'] // images_per_iter)


def build_config(norm: str, images_per_iter: int, seed: int, settings: dict, work_dir: str):
    """The demo config with the normalizer, N images per iteration, the seed and the schedule."""
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO_CONFIG)
    iters = iterations(settings, images_per_iter)
    warmup = max(1, iters // 12)
    norms = norm_cfg(norm, images_per_iter, settings['gn_groups'], settings.get('window'))
    if settings.get('backbone', 'resnet18') == 'densenet':
        cfg.model.backbone = dict(type='DenseNet', arch=dict(DENSENET), norm_cfg=norms)
        cfg.model.head.in_channels = densenet_channels(DENSENET)
    else:
        cfg.model.backbone.norm_cfg = norms
    hooks = [h for h in cfg.custom_hooks if h['type'] != 'CBNBurnInHook']
    if 'CBN' in norm:
        burn_in = int(iters * settings.get('burn_in', BURN_IN))
        hooks.insert(0, dict(type='CBNBurnInHook', burn_in=burn_in, by_epoch=False))
    cfg.custom_hooks = hooks
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=iters,
             T_max=max(1, iters - warmup))]
    cfg.optim_wrapper.optimizer.lr = settings['lr'] * images_per_iter / 16
    cfg.randomness = dict(seed=seed)
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = max(1, min(50, iters // 10))
    root = settings['data_root'].rstrip('/') + '/'
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = cfg[name].dataset
        dataset.data_root = root
        dataset.generate = settings['generation']
        for step in dataset.pipeline:
            if step['type'] == 'RandomResizedCrop':
                step['scale'] = settings['generation']['image_size']
    cfg.train_dataloader.batch_size = images_per_iter
    cfg.work_dir = work_dir
    return cfg


def loss_by_tenth(losses):
    """The training loss's course: its mean over each tenth of the run (None under 10 values)."""
    n = len(losses)
    return [mean(losses[i * n // 10:(i + 1) * n // 10]) for i in range(10)] if n >= 10 else None


def run_one(spec_path: str) -> int:
    """Child process: train one run, evaluate it, write ``result.json``."""
    import torch
    from mmengine.runner import Runner

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(spec['threads'])
    settings, work_dir = spec['settings'], spec['work_dir']
    cfg = build_config(spec['norm'], spec['images_per_iter'], spec['seed'], settings, work_dir)
    cfg.dump(osp.join(work_dir, 'config.py'))
    record = RunRecord()
    result = dict(norm=spec['norm'], images_per_iter=spec['images_per_iter'], seed=spec['seed'],
                  settings=settings, iters=iterations(settings, spec['images_per_iter']),
                  window=(window(spec['images_per_iter'], settings.get('window'))
                          if 'CBN' in spec['norm'] else None),
                  failure=None)
    try:
        runner = Runner.from_cfg(cfg)
        runner.register_hook(record)
        runner.train()
    except Exception as e:  # a run that cannot train is a result
        result['failure'] = f'{type(e).__name__}: {e}'.splitlines()[0][:300]
    t = record.times
    if 'val_start' in t and 'train_start' in t:
        result['iter_seconds'] = (t['val_start'] - t['train_start']) / result['iters']
    tail = record.losses[-max(1, len(record.losses) // 10):]
    result['final_loss'] = mean(tail) if record.losses else None
    result['loss_by_tenth'] = loss_by_tenth(record.losses)
    top1 = (record.metrics or {}).get('accuracy/top1')
    result['top1'] = None if top1 is None else float(top1)
    if result['failure'] is None and top1 is None:
        result['failure'] = 'no validation ran'
    tmp = osp.join(work_dir, 'result.json.tmp')
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, osp.join(work_dir, 'result.json'))  # a result exists only for a finished run
    return 0 if result['failure'] is None else 1


def run_dir(args, norm: str, images_per_iter: int, seed: int) -> str:
    return osp.join(args.work_dir, f'n{images_per_iter}', norm, f'seed{seed}')


def load_result(path: str, settings: dict):
    if not osp.isfile(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if result.get('settings') == settings else None


def launch(args, settings, norm, images_per_iter, seed):
    """Train one run in a subprocess; ``(result or None, wall seconds, log path)``.

    The result records the run's wall time and how many runs were running at a time (``jobs``).
    """
    work_dir = ensure_dir(run_dir(args, norm, images_per_iter, seed))
    result_path = osp.join(work_dir, 'result.json')
    if osp.exists(result_path):
        os.remove(result_path)
    spec_path = osp.join(work_dir, 'spec.json')
    with open(spec_path, 'w') as f:
        json.dump(dict(norm=norm, images_per_iter=images_per_iter, seed=seed, settings=settings,
                       work_dir=work_dir, threads=args.threads), f, indent=1)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    log = osp.join(work_dir, 'stdout.log')
    start = time.perf_counter()
    with open(log, 'w') as out:
        subprocess.run([sys.executable, osp.abspath(__file__), '--run-one', spec_path],
                       cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    result = load_result(result_path, settings)
    if result is not None:
        result['wall_seconds'] = wall
        result['jobs'] = args.jobs
        with open(result_path, 'w') as f:
            json.dump(result, f, indent=1)
    return result, wall, log


def wall_time(runs, done_before: int, elapsed: float, jobs: int, threads: int) -> str:
    """The report's sentence on time: summed over the runs, and this invocation's elapsed time.

    A run whose launcher was stopped before it ended has a result but no recorded wall time (nor
    ``jobs``): such runs are counted apart.
    """
    timed = [r for r in runs if 'wall_seconds' in r]
    summed = sum(r['wall_seconds'] for r in timed)
    at_a_time = 'one at a time' if jobs == 1 else f'{jobs} at a time (--jobs {jobs})'
    text = (f'Wall time: {summed:.0f} s summed over {len(timed)} of the {len(runs)} runs, '
            f'{threads} thread(s) each; this invocation ran {len(runs) - done_before} of them '
            f'{at_a_time} in {elapsed:.0f} s')
    if done_before:
        earlier = sorted({str(r['jobs']) for r in runs[:done_before] if 'jobs' in r})
        text += (f'; {done_before} were done by earlier invocations'
                 + (f' (--jobs {"/".join(earlier)})' if earlier else ''))
    if len(timed) < len(runs):
        text += (f'; {len(runs) - len(timed)} run(s) have no recorded wall time (their launcher '
                 'was stopped before they ended)')
    return text + '.'


def summarize(norms, sizes, seeds, runs):
    """``{norm: {N: {'values', 'mean', 'std', 'failures', 'final_loss', 'seconds_per_iter'}}}``."""
    summary = {}
    for norm in norms:
        summary[norm] = {}
        for n in sizes:
            sel = {r['seed']: r for r in runs if r['norm'] == norm and r['images_per_iter'] == n}
            values = [sel[s]['top1'] for s in seeds if s in sel]
            m, s = mean_std(values)
            losses = [sel[s]['final_loss'] for s in sel if sel[s].get('final_loss') is not None]
            times = [sel[s]['iter_seconds'] for s in sel if sel[s].get('iter_seconds')]
            curves = [sel[s]['loss_by_tenth'] for s in sel if sel[s].get('loss_by_tenth')]
            summary[norm][str(n)] = dict(
                values=values, mean=m, std=s, seeds=[x for x in seeds if x in sel],
                loss_by_tenth=([mean(list(column)) for column in zip(*curves)] if curves else None),
                failures={str(x): sel[x]['failure'] for x in sel if sel[x]['failure']},
                final_loss=mean(losses) if losses else None,
                seconds_per_iter=mean(times) if times else None)
    return summary


def plot(path, norms, sizes, summary, title):
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 4.2))
    colours = {'BN': 'tab:blue', 'CBN': 'tab:red', 'CBN-naive': 'tab:orange',
               'CBN-slices': 'tab:purple', 'NaiveCBN': 'tab:brown', 'GN': 'tab:green'}
    for norm in norms:
        xs = [n for n in sizes if summary[norm][str(n)]['mean'] is not None]
        ys = [summary[norm][str(n)]['mean'] for n in xs]
        es = [summary[norm][str(n)]['std'] or 0 for n in xs]
        ax.errorbar(xs, ys, yerr=es, marker='o', capsize=4, color=colours[norm], label=LABELS[norm])
        for n in xs:
            vals = [v for v in summary[norm][str(n)]['values'] if v is not None]
            ax.plot([n] * len(vals), vals, '.', color=colours[norm], alpha=0.5, markersize=4)
    ax.set_xscale('log', base=2)
    ax.set_xticks(list(sizes))
    ax.set_xticklabels([str(n) for n in sizes])
    ax.set_xlabel('images per iteration')
    ax.set_ylabel('top-1 (%), mean ± std')
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = analysis_parser(__doc__, 'tiny data (20 train / 10 val images of 32 px), 64 images '
                             'per run, N = 2 and 4, BN and CBN, seed 0 (tests)', out=None,
                             out_help='default docs/evidence (--quick: WORK_DIR)',
                             threads='torch threads per run')
    parser.add_argument('--work-dir', default=None,
                        help='runs go to WORK_DIR/n<N>/<norm>/seed<S>/ (default '
                             'work_dirs/classification_batch_size[_quick])')
    parser.add_argument('--norms', nargs='+', default=None, choices=NORMS,
                        help='default BN CBN (GN: 8 groups)')
    parser.add_argument('--sizes', type=int, nargs='+', default=None,
                        help='images per iteration (default 2 4 8 16; --quick: 2 4)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None, help='default 0 1 2')
    parser.add_argument('--images', type=int, default=None,
                        help='training images seen per run, at every N (default 4800: 300 '
                             'iterations of 16, a quarter of the demo; --quick: 64)')
    parser.add_argument('--lr', type=float, default=0.05, help='learning rate at 16 images')
    parser.add_argument('--gn-groups', type=int, default=8)
    parser.add_argument('--backbone', default='resnet18', choices=BACKBONES,
                        help="resnet18: the demo's; densenet: a small DenseNet "
                             f'({DENSENET}), written to {NAME}_densenet.*')
    parser.add_argument('--data-root', default=None,
                        help='default data/demo_shapes_cls (--quick: WORK_DIR/data)')
    parser.add_argument('--window', type=int, default=None,
                        help="CBN's window at every N (default ⌈16 / N⌉)")
    parser.add_argument('--burn-in', type=float, default=BURN_IN,
                        help=f'the burn-in at k = 1, a fraction of the run (default {BURN_IN})')
    parser.add_argument('--jobs', type=int, default=1,
                        help='runs at a time, each a subprocess with --threads threads (default 1)')
    parser.add_argument('--collect', action='store_true',
                        help='train nothing: report the finished runs, the others as missing')
    parser.add_argument('--name', default=None,
                        help=f'outputs OUT/NAME.{{md,json,png}} and the default work dir (default '
                             f'{NAME}, --backbone densenet: {NAME}_densenet)')
    parser.add_argument('--run-one', metavar='SPEC', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        return run_one(args.run_one)
    if args.jobs < 1:
        parser.error(f'--jobs must be at least 1 (got {args.jobs})')
    if args.window is not None and args.window < 1:
        parser.error(f'--window must be at least 1 (got {args.window})')
    if not 0 <= args.burn_in < 1:
        parser.error(f'--burn-in must be a fraction of the run in [0, 1) (got {args.burn_in})')

    name = args.name or NAME + ('' if args.backbone == 'resnet18' else f'_{args.backbone}')
    quick = args.quick
    args.norms = args.norms or ['BN', 'CBN']
    args.sizes = args.sizes or ([2, 4] if quick else [2, 4, 8, 16])
    args.seeds = args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2])
    args.images = args.images or (64 if quick else 4800)
    args.work_dir = osp.abspath(args.work_dir or osp.join(
        REPO_ROOT, 'work_dirs', name + ('_quick' if quick else '')))
    generation = QUICK_DATA if quick else DATA
    args.data_root = osp.abspath(args.data_root or (
        osp.join(args.work_dir, 'data') if quick else osp.join(REPO_ROOT, 'data', 'demo_shapes_cls')))
    args.out = args.out or (args.work_dir if quick else EVIDENCE_DIR)
    settings = dict(images=args.images, lr=args.lr, gn_groups=args.gn_groups,
                    data_root=args.data_root, generation=generation)
    # (settings at their defaults stay out of the dict, so that earlier runs resume)
    if args.backbone != 'resnet18':
        settings['backbone'] = args.backbone
    if args.window is not None:
        settings['window'] = args.window
    if args.burn_in != BURN_IN:
        settings['burn_in'] = args.burn_in

    # generate the data once, before the runs (and check data already there)
    from cbn_mmdet_demo.shapes_classification import make_classification_dataset
    make_classification_dataset(args.data_root, **generation)

    report = Report(args.out, name)
    runs, todo = [], []
    for n in args.sizes:
        for norm in args.norms:
            for seed in args.seeds:
                done = load_result(osp.join(run_dir(args, norm, n, seed), 'result.json'), settings)
                (runs.append(done) if done is not None else todo.append((norm, n, seed)))
    print(f'[{name}] {len(todo)} run(s) to do, {len(runs)} done before, {args.jobs} at a time; '
          f'settings {settings}', flush=True)
    done_before = len(runs)
    lost = []
    if args.collect:  # report only: the runs not finished are missing
        lost = [(norm, n, seed, None) for norm, n, seed in todo]
        todo = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # threads only wait on subprocesses
        futures = {pool.submit(launch, args, settings, *run): run for run in todo}
        for future in as_completed(futures):
            (norm, n, seed), (result, wall, log) = futures[future], future.result()
            if result is None:
                lost.append((norm, n, seed, log))
                print(f'[{name}] {norm} N={n} seed={seed}: NO RESULT after {wall:.0f} s, see {log}',
                      flush=True)
                continue
            runs.append(result)
            status = (f"top-1 {result['top1']:.1f}" if result['failure'] is None
                      else f"FAILED: {result['failure']}")
            print(f'[{name}] {norm} N={n} seed={seed}: {status}, {wall:.0f} s '
                  f'(total {report.seconds:.0f} s)', flush=True)

    summary = summarize(args.norms, args.sizes, args.seeds, runs)
    head = ['normalizer'] + [f'N = {n}' for n in args.sizes]
    rows = [[LABELS[norm] + (' (k = ' + ' / '.join(str(window(n, args.window)) for n in args.sizes)
                             + ')' if 'CBN' in norm else '')]
            + [format_mean_std(summary[norm][str(n)]['mean'], summary[norm][str(n)]['std'])
               for n in args.sizes] for norm in args.norms]
    loss_rows = [[LABELS[norm]] + ['–' if summary[norm][str(n)]['final_loss'] is None
                                   else f"{summary[norm][str(n)]['final_loss']:.3f}"
                                   for n in args.sizes] for norm in args.norms]
    time_rows = [[LABELS[norm]] + ['–' if summary[norm][str(n)]['seconds_per_iter'] is None
                                   else f"{summary[norm][str(n)]['seconds_per_iter']:.3f}"
                                   for n in args.sizes] for norm in args.norms]
    curve_rows = [[LABELS[norm], str(n)] + [f'{v:.3f}' for v in summary[norm][str(n)]['loss_by_tenth']]
                  for n in args.sizes for norm in args.norms if summary[norm][str(n)]['loss_by_tenth']]
    seed_rows = [[LABELS[r['norm']], str(r['images_per_iter']), str(r['seed']), str(r['iters']),
                  '–' if r['top1'] is None else f"{r['top1']:.1f}", r['failure'] or '']
                 for r in sorted(runs, key=lambda r: (r['norm'], r['images_per_iter'], r['seed']))]
    command = (f'.venv/bin/python tools/analysis/{NAME}.py' + (' --quick' if quick else '')
               + f' --norms {" ".join(args.norms)} --sizes {" ".join(map(str, args.sizes))}'
               f' --seeds {" ".join(map(str, args.seeds))} --images {args.images} --lr {args.lr:g}'
               f' --gn-groups {args.gn_groups}'
               + (f' --window {args.window}' if args.window is not None else '')
               + (f' --burn-in {args.burn_in:g}' if args.burn_in != BURN_IN else '')
               + ('' if args.backbone == 'resnet18' else f' --backbone {args.backbone}')
               + (f' --name {args.name}' if args.name else '')
               + (f' --jobs {args.jobs}' if args.jobs != 1 else ''))
    iters = ', '.join(f'{iterations(settings, n)} at N = {n}' for n in args.sizes)
    md = (f'# Figure 1 at CPU scale: top-1 against images per iteration\n\n'
          f'Command: `{command}`\n\n'
          f"Data: the classification demo's shapes, {generation['num_train']} train / "
          f"{generation['num_val']} val images of {generation['image_size']} px, 5 classes "
          f"(chance 20 %). Model: `configs/demo/resnet18_cbn_demo-shapes-cls.py` ("
          + ('half-width ResNet-18' if args.backbone == 'resnet18' else
             f"its backbone replaced by mmpretrain's DenseNet with {DENSENET}")
          + f' from scratch) with the normalizer in every layer, trained with mmengine\'s '
          f'Runner. {args.images} training images per run at every N ({iters} iterations), '
          f'lr {args.lr:g} × N / 16, warm-up 1/12 of the run, cosine decay. CBN: '
          + (f'k = {args.window}' if args.window is not None else 'k = ⌈16 / N⌉')
          + ' after a burn-in of '
          + ('a quarter' if args.burn_in == BURN_IN else f'{args.burn_in:g}') + ' of the run at k = 1'
          + ("; where a CBN layer's input is not a conv's output it normalises with the current "
             "batch (fallback='bn', CBN) or with the uncompensated window (fallback='naive')"
             if 'CBN-naive' in args.norms else '')
          + ("; CBN, concat='compensate' compensates each slice of a concatenated input with the "
             "conv that produced it (other slices' channels as recorded)"
             if 'CBN-slices' in args.norms else '')
          + ('; Naive CBN: the same window, its entries as recorded (compensate=False)'
             if 'NaiveCBN' in args.norms else '')
          + (f'. GN: {args.gn_groups} groups' if 'GN' in args.norms else '') + '.\n\n'
          + wall_time(runs, done_before, report.seconds, args.jobs, args.threads) + '\n\n'
          f'Top-1 (%) on the val split, mean ± std over seeds {args.seeds}:\n\n'
          + markdown_table(head, rows)
          + ('\n\nMissing (no result; rerun the command to continue): '
             + ', '.join(f'{a} N={b} seed {c}' for a, b, c, _ in lost) if lost else '')
          + '\n\nFinal training loss (mean of the last tenth of the run, mean over seeds):\n\n'
          + markdown_table(['normalizer'] + [f'N = {n}' for n in args.sizes], loss_rows)
          + ('\n\nTraining loss by tenth of the run (mean over the tenth, mean over seeds):\n\n'
             + markdown_table(['normalizer', 'N'] + [str(i + 1) for i in range(len(curve_rows[0]) - 2)],
                              curve_rows) if curve_rows else '')
          + '\n\nSeconds per training iteration (mean over seeds):\n\n'
          + markdown_table(['normalizer'] + [f'N = {n}' for n in args.sizes], time_rows)
          + '\n\nPer run:\n\n'
          + markdown_table(['normalizer', 'N', 'seed', 'iterations', 'top-1 (%)', 'failure'],
                           seed_rows) + '\n')
    report.write(md, dict(args=vars(args), settings=settings, summary=summary, runs=runs,
                          wall_seconds=report.seconds, jobs=args.jobs, runs_done_before=done_before,
                          lost=[dict(norm=a, images_per_iter=b, seed=c, log=d)
                                for a, b, c, d in lost]),
                 plot=lambda path: plot(path, args.norms, args.sizes, summary,
                                        f'Classification demo ({args.backbone}), {args.images} images per run, '
                                        f'{len(args.seeds)} seed(s)'),
                 indent=1)
    return 1 if lost else 0


if __name__ == '__main__':
    sys.exit(main())
