"""Train the rows of the paper's COCO tables, several trials (seeds) each, with tools/dist_train.sh.

    .venv/bin/python tools/run_table.py TABLE [TABLE ...] [--gpus 4] [--trials 5] [--seed-start 0]
        [--rows ROW ...] [--work-root work_dirs] [--skip-done] [--dry-run]
        [--cfg-options KEY=VALUE ...]

For every selected row (``cbn_mmdet/paper_results.py``) and seed ``k`` it runs, one after another:

    tools/dist_train.sh configs/cbn_paper/<config>.py GPUS \\
        --work-dir <work-root>/<table>/<config>/seed<k> --cfg-options randomness.seed=<k> [...]

``--rows`` keeps the rows whose label or config name equals one of the given strings, or whose
config name has it as one of its ``_``-separated fields (``--rows cbn-head gn-head``, ``--rows r101``).
``--skip-done`` skips a config and seed that already has a final COCO result, under this table or
another one, and runs a config and seed shared by several selected tables once (rows shared by
Tables 5 and 6, Figures 3 and 5).
``--cfg-options`` is passed through to tools/train.py after the seed (e.g.
``env_cfg.dist_cfg.backend=gloo`` on CPU, ``train_cfg.val_interval=1``). Failed runs are reported at
the end and make the exit status non-zero; the remaining runs still go.
"""
import argparse
import os.path as osp
import shlex
import subprocess
import sys
import time

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from collect_table import REPO, find_run, load_paper_results, select_tables  # noqa: E402


def select_rows(table, filters):
    if not filters:
        return list(table.rows)
    def fields(config):  # 'faster-rcnn_r50_fpn_cbn-head_1x_coco' -> {'faster-rcnn', 'r50', ...}
        return set(config.split('_'))
    return [r for r in table.rows
            if any(f in (r.label, r.config) or f in fields(r.config) for f in filters)]


def build_commands(tables, gpus, seeds, filters, work_root, cfg_options):
    """[(table name, config, seed, argv)] in table, row, seed order."""
    pr = load_paper_results()
    out = []
    for table in tables:
        for row in select_rows(table, filters):
            for seed in seeds:
                work_dir = osp.join(work_root, table.name, row.config, f'seed{seed}')
                argv = ['tools/dist_train.sh', osp.join(pr.CONFIG_DIR, row.config + '.py'), str(gpus),
                        '--work-dir', work_dir, '--cfg-options', f'randomness.seed={seed}',
                        *cfg_options]
                out.append((table.name, row.config, seed, argv))
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tables', nargs='+', help='table5 table6 table7 figure3 figure5 or all')
    parser.add_argument('--gpus', type=int, default=4, help='processes per run (paper: 4 GPUs)')
    parser.add_argument('--trials', type=int, default=5, help='seeds per row (paper: 5)')
    parser.add_argument('--seed-start', type=int, default=0)
    parser.add_argument('--rows', nargs='+', default=[], metavar='ROW')
    parser.add_argument('--work-root', default='work_dirs')
    parser.add_argument('--skip-done', action='store_true',
                        help='skip runs that already have a final COCO result')
    parser.add_argument('--dry-run', action='store_true', help='print the commands only')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='passed through to tools/train.py')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpus < 1 or args.trials < 1:
        raise SystemExit(f'--gpus and --trials must be >= 1, got {args.gpus}, {args.trials}')
    seeds = list(range(args.seed_start, args.seed_start + args.trials))
    commands = build_commands(select_tables(args.tables), args.gpus, seeds, args.rows,
                              args.work_root, args.cfg_options)
    if not commands:
        raise SystemExit(f'no row matches --rows {args.rows}')
    failed, done = [], set()
    for table, config, seed, argv in commands:
        if (config, seed) in done or (args.skip_done
                                      and find_run(args.work_root, table, config, seed)[1]):
            print(f'# skip (done): {table} {config} seed{seed}', flush=True)
            continue
        line = ' '.join(shlex.quote(a) for a in argv)
        if args.dry_run:
            print(line, flush=True)
            if args.skip_done:
                done.add((config, seed))
            continue
        print(f'# [{time.strftime("%H:%M:%S")}] {line}', flush=True)
        rc = subprocess.call(argv, cwd=REPO)
        if rc != 0:
            failed.append((line, rc))
        elif args.skip_done:
            done.add((config, seed))
    for line, rc in failed:
        print(f'# FAILED (exit {rc}): {line}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
