"""Collect the COCO metrics of tools/run_table.py's runs into the paper's tables.

    .venv/bin/python tools/collect_table.py [TABLE ...] [--work-root work_dirs] [--trials 5]
        [--format markdown|csv|both] [--out PREFIX] [--final-step 12]

TABLE is ``table5``, ``table6``, ``table7``, ``figure3``, ``figure5`` or ``all`` (default). For each
row, seed ``k`` in ``seed_start .. seed_start + trials - 1`` is read from
``<work-root>/<table>/<config>/seed<k>`` or, when that has no result, from the same config and seed
run for another table (Table 6's R50 Faster R-CNN rows are Table 5 rows, for example).

A run's result is the **last validation line** (a line with ``coco/bbox_mAP``) of its latest log:
mmengine writes ``<run>/<timestamp>/vis_data/scalars.json`` (and ``<timestamp>.json`` beside it),
one JSON object per line; a resumed run has several ``<timestamp>`` folders, the latest with val
lines wins. Values are printed in percent as ``mean ± std`` over the runs found (sample standard
deviation, n-1; a single run shows its value alone), with the paper's number beside each, labelled
as the paper's. Runs that are missing (or, with ``--final-step``, stopped before that epoch's
validation) are listed under each table and in the CSV.
"""
import argparse
import csv
import glob
import importlib.util
import io
import json
import math
import os
import os.path as osp
import sys
from typing import Dict, List, Optional, Sequence, Tuple

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_paper_results():
    """``cbn_mmdet.paper_results`` without importing torch/mmdet (``cbn_mmdet/__init__`` does)."""
    name = 'cbn_mmdet.paper_results'
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        '_cbn_paper_results', osp.join(REPO, 'cbn_mmdet', 'paper_results.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _json_lines(path: str) -> List[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(record, dict):
                out.append(record)
    return out


def read_final_metrics(run_dir: str) -> Optional[dict]:
    """The last validation record (``coco/...`` keys, ``step``) of a run directory, or None."""
    timestamps = sorted(d for d in glob.glob(osp.join(run_dir, '*')) if osp.isdir(d))
    for ts_dir in reversed(timestamps):
        vis = osp.join(ts_dir, 'vis_data')
        candidates = [osp.join(vis, 'scalars.json')]
        candidates += sorted(p for p in glob.glob(osp.join(vis, '*.json'))
                             if osp.basename(p) not in ('scalars.json', 'config.json'))
        candidates += sorted(glob.glob(osp.join(ts_dir, '*.json')))
        for path in candidates:
            if not osp.isfile(path):
                continue
            vals = [r for r in _json_lines(path) if 'coco/bbox_mAP' in r]
            if vals:
                return vals[-1]
    return None


def find_run(work_root: str, table: str, config: str, seed: int,
             final_step: Optional[int] = None) -> Tuple[Optional[str], Optional[dict]]:
    """(run dir, final metrics) for a config and seed: this table's run, else another table's."""
    own = osp.join(work_root, table, config, f'seed{seed}')
    others = sorted(d for d in glob.glob(osp.join(work_root, '*', config, f'seed{seed}'))
                    if osp.normpath(d) != osp.normpath(own))
    for run_dir in [own] + others:
        if not osp.isdir(run_dir):
            continue
        metrics = read_final_metrics(run_dir)
        if metrics is None:
            continue
        if final_step is not None and metrics.get('step') != final_step:
            continue
        return run_dir, metrics
    return None, None


def mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean)**2 for v in values) / (len(values) - 1))


def collect(table, work_root: str, seeds: Sequence[int], final_step: Optional[int] = None):
    """Per row: dict(row, values={metric: [percent per run found]}, runs, missing)."""
    pr = load_paper_results()
    out = []
    for row in table.rows:
        values: Dict[str, List[float]] = {m: [] for m in table.row_metrics(row)}
        runs, missing = [], []
        for seed in seeds:
            run_dir, metrics = find_run(work_root, table.name, row.config, seed, final_step)
            if metrics is None:
                missing.append(osp.join(work_root, table.name, row.config, f'seed{seed}'))
                continue
            runs.append(run_dir)
            for m in values:
                key = pr.METRICS[m][0]
                if metrics.get(key) is not None and metrics[key] >= 0:  # CocoMetric logs -1 for n/a
                    values[m].append(100.0 * float(metrics[key]))
        out.append(dict(row=row, values=values, runs=runs, missing=missing))
    return out


def _fmt(mean, std, digits=2) -> str:
    if mean is None:
        return '—'
    return f'{mean:.{digits}f}' if std is None else f'{mean:.{digits}f} ± {std:.{digits}f}'


def to_markdown(table, rows, n_expected: int) -> str:
    pr = load_paper_results()
    # Every metric any row reports, in the METRICS order (Table 6 mixes box-only and mask rows).
    metrics = [m for m in pr.METRICS if any(m in table.row_metrics(r['row']) for r in rows)]
    head = ['row', 'config', 'runs']
    for m in metrics:
        head += [f'{pr.METRICS[m][1]} (ours)', f'{pr.METRICS[m][1]} (paper)']
    lines = [f'### {table.title}', '']
    if table.note:
        lines += [table.note, '']
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        row = r['row']
        cells = [row.label, f'`{row.config}`', f"{len(r['runs'])}/{n_expected}"]
        for m in metrics:
            if m not in r['values']:
                cells += ['', '']
                continue
            cells.append(_fmt(*mean_std(r['values'][m])))
            paper = row.paper.get(m)
            cells.append('—' if paper is None else f'{paper:.1f}')
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'ours: mean ± sample std over the runs found, AP in %, this code base (mmdet 3.x); '
              'paper: Yao et al. (mmdet v1, mean of 5 trials).']
    missing = [p for r in rows for p in r['missing']]
    if missing:
        lines += ['', f'Missing runs ({len(missing)}):', '']
        lines += [f'- `{p}`' for p in missing]
    return '\n'.join(lines) + '\n'


CSV_FIELDS = ['table', 'row', 'config', 'metric', 'runs', 'expected', 'mean', 'std', 'paper',
              'missing']


def to_csv_rows(table, rows, n_expected: int) -> List[dict]:
    out = []
    for r in rows:
        row = r['row']
        for m, vals in r['values'].items():
            mean, std = mean_std(vals)
            out.append(dict(table=table.name, row=row.label, config=row.config, metric=m,
                            runs=len(vals), expected=n_expected,
                            mean='' if mean is None else f'{mean:.3f}',
                            std='' if std is None else f'{std:.3f}',
                            paper='' if row.paper.get(m) is None else f'{row.paper[m]:.1f}',
                            missing=';'.join(r['missing'])))
    return out


def render_csv(dict_rows: List[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(dict_rows)
    return buf.getvalue()


def select_tables(names: Sequence[str]):
    tables = load_paper_results().TABLES
    if not names or 'all' in names:
        return list(tables.values())
    unknown = [n for n in names if n not in tables]
    if unknown:
        raise SystemExit(f'unknown table(s) {unknown}; choose from {list(tables)} or all')
    return [tables[n] for n in names]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tables', nargs='*', help='table5 table6 table7 figure3 figure5 or all')
    parser.add_argument('--work-root', default='work_dirs')
    parser.add_argument('--trials', type=int, default=5, help='seeds expected per row (paper: 5)')
    parser.add_argument('--seed-start', type=int, default=0)
    parser.add_argument('--final-step', type=int, default=None,
                        help='count a run only if its last validation is at this epoch (e.g. 12)')
    parser.add_argument('--format', choices=['markdown', 'csv', 'both'], default='both')
    parser.add_argument('--out', help='also write PREFIX.md / PREFIX.csv')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = list(range(args.seed_start, args.seed_start + args.trials))
    md_parts, csv_rows = [], []
    for table in select_tables(args.tables):
        rows = collect(table, args.work_root, seeds, args.final_step)
        md_parts.append(to_markdown(table, rows, len(seeds)))
        csv_rows += to_csv_rows(table, rows, len(seeds))
    markdown, csv_text = '\n'.join(md_parts), render_csv(csv_rows)
    if args.format in ('markdown', 'both'):
        print(markdown)
    if args.format in ('csv', 'both'):
        print(csv_text, end='')
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out + '.md', 'w') as f:
            f.write(markdown)
        with open(args.out + '.csv', 'w') as f:
            f.write(csv_text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
