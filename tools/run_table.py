"""Train the rows of the paper's tables (COCO or ImageNet), several trials (seeds) each, resuming what
was cut off.

    .venv/bin/python tools/run_table.py TABLE [TABLE ...] [--benchmark coco|imagenet] [--gpus 4]
        [--trials 5] [--seed-start 0] [--rows ROW ...] [--work-root work_dirs] [--final-epoch E]
        [--force] [--dry-run] [--launcher dist|slurm] [--partition P] [--gpus-per-node 8]
        [--iter-time 0.5] [--images-per-gpu N] [--train-images I] [--cfg-options KEY=VALUE ...]

TABLE is a table of ``configs/cbn_paper/paper_results.yml`` (COCO: table5 table6 table7 figure3
figure5) or of ``configs/cbn_imagenet/paper_results.yml`` (ImageNet: table2 table3 table4 table9
figure3a figure4 figure5a), or ``all`` (every table of ``--benchmark``, default coco). For every
selected row and seed ``k`` it runs, one after another:

    tools/dist_train.sh <config dir>/<config>.py GPUS \\
        --work-dir <work-root>/<table>/<config>/seed<k> --resume --cfg-options randomness.seed=<k> [...]

or, with ``--launcher slurm``, ``GPUS=... GPUS_PER_NODE=... tools/slurm_train.sh PARTITION
<config>-seed<k> CONFIG WORK_DIR --resume ...`` (srun waits for the job). ``--resume`` continues an
interrupted run from its latest checkpoint (a run without one starts from the beginning).

A run is **done** when its final checkpoint (``epoch_<final-epoch>.pth``) exists, under this table or
another one (rows shared by Tables 5 and 6, Figures 3 and 5 are trained once); done runs are skipped
unless ``--force``. Before starting, the compute budget is printed: GPU-hours per row and in total,
from ``--iter-time`` (seconds per iteration of one run on its GPUs: an assumption, measure yours
with the smoke run in docs/reproducing.md) and the schedule (``--train-images`` / (``--gpus`` ×
images per GPU) iterations per epoch, ``--final-epoch`` epochs). Without the options the schedule is
the benchmark's (``schedule`` in its results file: COCO 117266 images, 12 epochs, 4 images per GPU;
ImageNet 1281167 images, 100 epochs, each config's images per GPU from its name, ``4xb<N>``).

``--rows`` keeps the rows whose label or config name equals one of the given strings, or whose
config name has it as one of its ``_``-separated fields (``--rows cbn-head gn-head``, ``--rows r101``).
``--cfg-options`` is passed through to tools/train.py after the seed (e.g.
``env_cfg.dist_cfg.backend=gloo`` on CPU, ``train_cfg.val_interval=1``). Failed runs are reported at
the end and make the exit status non-zero; the remaining runs still go.
"""
import argparse
import glob
import math
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from collect_table import REPO, load_paper_results, select_benchmark, select_tables  # noqa: E402


def select_rows(table, filters):
    if not filters:
        return list(table.rows)
    def fields(config):  # 'faster-rcnn_r50_fpn_cbn-head_1x_coco' -> {'faster-rcnn', 'r50', ...}
        return set(config.split('_'))
    return [r for r in table.rows
            if any(f in (r.label, r.config) or f in fields(r.config) for f in filters)]


def run_dir(work_root, table, config, seed):
    return osp.join(work_root, table, config, f'seed{seed}')


def benchmark_of(table):
    return load_paper_results().benchmark_of(table)


def final_epoch_of(args, table):
    return args.final_epoch or benchmark_of(table).final_epoch


def images_per_gpu_of(args, table, config):
    """--images-per-gpu, else the benchmark's, else the config name's ``<gpus>xb<N>``."""
    if args.images_per_gpu:
        return args.images_per_gpu
    bench = benchmark_of(table)
    if bench.images_per_gpu:
        return bench.images_per_gpu
    match = re.search(r'_\d+xb(\d+)-', config)
    if match is None:
        raise SystemExit(f'{config}: no images per GPU in its name (<gpus>xb<N>); pass --images-per-gpu')
    return int(match.group(1))


def is_done(work_root, table, config, seed, final_epoch):
    """Whether this config and seed has its final checkpoint, under this table or another."""
    dirs = [run_dir(work_root, table, config, seed)]
    dirs += glob.glob(osp.join(work_root, '*', config, f'seed{seed}'))
    return any(osp.isfile(osp.join(d, f'epoch_{final_epoch}.pth')) for d in dirs)


def launch_argv(args, config_path, work_dir, seed, job_name):
    train_args = ['--resume', '--cfg-options', f'randomness.seed={seed}', *args.cfg_options]
    if args.launcher == 'slurm':
        return ['tools/slurm_train.sh', args.partition, job_name, config_path, work_dir, *train_args]
    return ['tools/dist_train.sh', config_path, str(args.gpus), '--work-dir', work_dir, *train_args]


def launch_env(args):
    if args.launcher == 'slurm':
        return dict(GPUS=str(args.gpus), GPUS_PER_NODE=str(min(args.gpus, args.gpus_per_node)))
    return {}


def build_commands(args, tables, seeds):
    """[(table, config, seed, argv)] in table, row, seed order."""
    out = []
    for table in tables:
        for row in select_rows(table, args.rows):
            for seed in seeds:
                argv = launch_argv(args,
                                   osp.join(benchmark_of(table).config_dir, row.config + '.py'),
                                   run_dir(args.work_root, table.name, row.config, seed), seed,
                                   f'{row.config}-seed{seed}')
                out.append((table, row.config, seed, argv))
    return out


def run_schedule(args, table, config):
    """(iterations, GPU-hours) of one run of ``config``, and the schedule's description."""
    epochs = final_epoch_of(args, table)
    images = args.train_images or benchmark_of(table).train_images
    per_gpu = images_per_gpu_of(args, table, config)
    iters = epochs * math.ceil(images / (args.gpus * per_gpu))
    hours = iters * args.iter_time * args.gpus / 3600  # one run, all its GPUs
    return iters, hours, f'{epochs} epochs of {images} images, {args.gpus} GPUs x {per_gpu} images'


def budget_lines(args, commands, todo):
    """GPU-hours per config and in total, for all selected runs and for those still to train."""
    runs, left, per_run = {}, {}, {}
    for table, config, seed, _ in commands:
        per_run.setdefault(config, run_schedule(args, table, config))
        runs.setdefault(config, set()).add(seed)
        if (table.name, config, seed) in todo:
            left.setdefault(config, set()).add(seed)
    uniform = len(set(per_run.values())) == 1
    lines = []
    if uniform:
        iters, hours, what = next(iter(per_run.values()))
        lines.append(f'# budget: {iters} iterations per run ({what}), {args.iter_time} s per '
                     f'iteration (assumed; --iter-time) = {hours:.1f} GPU-hours per run')
    else:
        lines.append(f'# budget: {args.iter_time} s per iteration (assumed; --iter-time), '
                     'iterations per run as each row says')
    for config, seeds in runs.items():
        iters, hours, what = per_run[config]
        n_left = len(left.get(config, ()))
        detail = '' if uniform else f' ({iters} iterations: {what})'
        lines.append(f'#   {config}{detail}: {len(seeds)} runs, {len(seeds) * hours:.1f} GPU-hours '
                     f'({n_left} to train: {n_left * hours:.1f})')
    total = sum(len(s) for s in runs.values())
    total_left = sum(len(s) for s in left.values())
    hours_all = sum(len(runs[c]) * per_run[c][1] for c in runs)
    hours_left = sum(len(left[c]) * per_run[c][1] for c in left)
    lines.append(f'# total: {total} runs, {hours_all:.1f} GPU-hours; to train: {total_left} runs, '
                 f'{hours_left:.1f} GPU-hours ({hours_left / args.gpus:.1f} hours '
                 f'on {args.gpus} GPUs)')
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tables', nargs='+',
                        help='COCO: table5 table6 table7 figure3 figure5; ImageNet: table2 table3 '
                        'table4 table9 figure3a figure4 figure5a; or all')
    parser.add_argument('--benchmark', choices=sorted(load_paper_results().BENCHMARKS),
                        help="whose tables 'all' means (default: the named tables', else coco)")
    parser.add_argument('--gpus', type=int, default=4, help='GPUs per run (paper: 4)')
    parser.add_argument('--trials', type=int, default=5, help='seeds per row (paper: 5)')
    parser.add_argument('--seed-start', type=int, default=0)
    parser.add_argument('--rows', nargs='+', default=[], metavar='ROW')
    parser.add_argument('--work-root', default='work_dirs')
    parser.add_argument('--final-epoch', type=int, default=None,
                        help='a run is done when epoch_<final-epoch>.pth exists (default: the '
                        "benchmark's, COCO 12, ImageNet 100)")
    parser.add_argument('--force', action='store_true', help='train done runs again')
    parser.add_argument('--dry-run', action='store_true', help='print the budget and commands only')
    parser.add_argument('--launcher', choices=('dist', 'slurm'), default='dist',
                        help='tools/dist_train.sh (default) or tools/slurm_train.sh')
    parser.add_argument('--partition', help='Slurm partition (--launcher slurm)')
    parser.add_argument('--gpus-per-node', type=int, default=8, help='Slurm: GPUs per node')
    parser.add_argument('--iter-time', type=float, default=0.5,
                        help='seconds per training iteration of one run, for the budget')
    parser.add_argument('--images-per-gpu', type=int, default=None,
                        help="the configs' train_dataloader.batch_size, for the budget (default: "
                        "COCO 4, ImageNet each config's 4xb<N>)")
    parser.add_argument('--train-images', type=int, default=None,
                        help='training images per epoch, for the budget (default: COCO train2017 '
                        'images with annotations, 117266; ImageNet-1k, 1281167)')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='passed through to tools/train.py')
    args = parser.parse_args(argv)
    if args.launcher == 'slurm' and not args.partition:
        parser.error('--launcher slurm needs --partition PARTITION')
    for name in ('gpus', 'trials', 'final_epoch', 'images_per_gpu', 'train_images',
                 'gpus_per_node'):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.iter_time <= 0:
        parser.error(f'--iter-time must be > 0, got {args.iter_time}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = list(range(args.seed_start, args.seed_start + args.trials))
    tables = select_tables(args.tables, select_benchmark(args.tables, args.benchmark))
    commands = build_commands(args, tables, seeds)
    if not commands:
        raise SystemExit(f'no row matches --rows {args.rows}')
    todo, planned = [], {}
    for table, config, seed, argv in commands:
        if (config, seed) in planned:
            print(f'# skip (trained under {planned[config, seed]}): {table.name} {config} '
                  f'seed{seed}', flush=True)
        elif not args.force and is_done(args.work_root, table.name, config, seed,
                                        final_epoch_of(args, table)):
            print(f'# skip (done): {table.name} {config} seed{seed}', flush=True)
        else:
            planned[config, seed] = table.name
            todo.append((table.name, config, seed, argv))
    for line in budget_lines(args, commands, {t[:3] for t in todo}):
        print(line, flush=True)
    env = dict(os.environ, **launch_env(args))
    prefix = ' '.join(f'{k}={v}' for k, v in launch_env(args).items())
    failed = []
    for table, config, seed, argv in todo:
        line = ' '.join(filter(None, [prefix, *(shlex.quote(a) for a in argv)]))
        if args.dry_run:
            print(line, flush=True)
            continue
        print(f'# [{time.strftime("%H:%M:%S")}] {line}', flush=True)
        rc = subprocess.call(argv, cwd=REPO, env=env)
        if rc != 0:
            failed.append((line, rc))
    for line, rc in failed:
        print(f'# FAILED (exit {rc}): {line}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
