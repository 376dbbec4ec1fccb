"""Collect the metrics of tools/run_table.py's runs into the paper's tables (COCO and ImageNet).

    .venv/bin/python tools/collect_table.py [TABLE ...] [--benchmark coco|imagenet]
        [--work-root work_dirs] [--trials 5] [--format markdown|csv|both] [--out PREFIX]
        [--final-step 12] [--model-zoo DIR]

TABLE is COCO's ``table5``, ``table6``, ``table7``, ``figure3``, ``figure5``, ImageNet's ``table2``,
``table3``, ``table4``, ``table9``, ``figure3a``, ``figure4``, ``figure5a``, or ``all`` (default): all
the tables of ``--benchmark`` (default: the named tables', else coco). For each
row, seed ``k`` in ``seed_start .. seed_start + trials - 1`` is read from
``<work-root>/<table>/<config>/seed<k>`` or, when that has no result, from the same config and seed
run for another table (Table 6's R50 Faster R-CNN rows are Table 5 rows, for example).

A run's result is the **last validation line** (a line with ``coco/bbox_mAP``, or
``accuracy/top1`` for ImageNet: the first metric of the table) of its latest log:
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
import io
import json
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import paper_results
from seed_stats import format_mean_std, mean_std

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_paper_results():
    """The paper's tables: :mod:`paper_results` (``configs/cbn_paper/paper_results.yml`` and
    ``configs/cbn_imagenet/paper_results.yml``)."""
    return paper_results


def val_key(table) -> str:
    """The log key whose presence marks a table's validation records: its first metric's."""
    return paper_results.benchmark_of(table).metrics[table.metrics[0]][0]


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


def read_final_metrics(run_dir: str, key: str = 'coco/bbox_mAP') -> Optional[dict]:
    """The last validation record (the records with ``key``, e.g. ``coco/...`` keys and ``step``) of
    a run directory, or None."""
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
            vals = [r for r in _json_lines(path) if key in r]
            if vals:
                return vals[-1]
    return None


def find_run(work_root: str, table: str, config: str, seed: int,
             final_step: Optional[int] = None,
             key: str = 'coco/bbox_mAP') -> Tuple[Optional[str], Optional[dict]]:
    """(run dir, final metrics) for a config and seed: this table's run, else another table's."""
    own = osp.join(work_root, table, config, f'seed{seed}')
    others = sorted(d for d in glob.glob(osp.join(work_root, '*', config, f'seed{seed}'))
                    if osp.normpath(d) != osp.normpath(own))
    for run_dir in [own] + others:
        if not osp.isdir(run_dir):
            continue
        metrics = read_final_metrics(run_dir, key)
        if metrics is None:
            continue
        if final_step is not None and metrics.get('step') != final_step:
            continue
        return run_dir, metrics
    return None, None


def collect(table, work_root: str, seeds: Sequence[int], final_step: Optional[int] = None):
    """Per row: dict(row, values={metric: [percent per run found]}, runs, missing)."""
    bench = paper_results.benchmark_of(table)
    out = []
    for row in table.rows:
        values: Dict[str, List[float]] = {m: [] for m in table.row_metrics(row)}
        runs, missing = [], []
        for seed in seeds:
            run_dir, metrics = find_run(work_root, table.name, row.config, seed, final_step,
                                        val_key(table))
            if metrics is None:
                missing.append(osp.join(work_root, table.name, row.config, f'seed{seed}'))
                continue
            runs.append(run_dir)
            for m in values:
                key = bench.metrics[m][0]
                if metrics.get(key) is not None and metrics[key] >= 0:  # CocoMetric logs -1 for n/a
                    values[m].append(bench.percent_per_unit * float(metrics[key]))
        out.append(dict(row=row, values=values, runs=runs, missing=missing))
    return out


def _fmt(mean, std, digits=2) -> str:
    return format_mean_std(mean, std, digits, missing='—')


# What "ours" and "paper" are, under each table.
FOOTERS = {
    'coco': 'ours: mean ± sample std over the runs found, AP in %, this code base (mmdet 3.x); '
            'paper: Yao et al. (mmdet v1, mean of 5 trials).',
    'imagenet': 'ours: mean ± sample std over the runs found, top-1 accuracy in % on ImageNet val '
                '(single crop), this code base (mmpretrain 1.x); paper: Yao et al. (mean of 5 '
                'trials).',
}


def to_markdown(table, rows, n_expected: int, list_missing: bool = True) -> str:
    """The table in the paper's layout; ``list_missing=False`` leaves out the list of missing runs."""
    bench = paper_results.benchmark_of(table)
    # Every metric any row reports, in the METRICS order (Table 6 mixes box-only and mask rows).
    metrics = [m for m in bench.metrics if any(m in table.row_metrics(r['row']) for r in rows)]
    head = ['row', 'config', 'runs']
    for m in metrics:
        head += [f'{bench.metrics[m][1]} (ours)', f'{bench.metrics[m][1]} (paper)']
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
    lines += ['', FOOTERS[table.benchmark]]
    missing = [p for r in rows for p in r['missing']]
    if missing and list_missing:
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


NORMALIZERS = {'none': '-', 'bn': 'BN', 'syncbn': 'SyncBN', 'gn': 'GN', 'brn': 'BRN', 'cbn': 'CBN',
               'naive-cbn': 'Naive CBN'}


def describe_config(config: str) -> dict:
    """Normalizer, where, window and burn-in of a paper config, read from its name
    (``tests/test_configs/test_paper_configs.py`` checks each name against the config's content)."""
    norm_part = config.split('_')[3]                         # e.g. 'cbn-k8-head', 'bn2syncbn-ep8-head'
    where = norm_part.rsplit('-', 1)[1]                       # 'head' or 'all'
    tokens = norm_part[:-len(where) - 1]
    burn_in = re.search(r'-burnin(\d+)', tokens)
    window = re.search(r'-k(\d+)', tokens)
    switch = re.match(r'bn2syncbn-ep(\d+)$', tokens)
    base = re.sub(r'-(k|burnin)\d+', '', tokens)
    if switch:
        normalizer = f'BN → SyncBN at epoch {switch.group(1)}'
    else:
        normalizer = NORMALIZERS[base]
    cbn = base in ('cbn', 'naive-cbn')
    return dict(normalizer=normalizer, where='FPN + heads' if where == 'head' else 'all layers',
                window=int(window.group(1)) if window else (4 if cbn else None),
                burn_in=int(burn_in.group(1)) if burn_in else (3 if cbn else None),
                depth=int(config.split('_')[1][1:]))


def model_zoo_rows(work_root: str, seeds: Sequence[int], final_step: Optional[int] = None):
    """One entry per paper config: the paper's AP (first table row with one), ours over seeds, and
    the latest run's log and final checkpoint."""
    pr = load_paper_results()
    out = []
    for config in pr.all_configs():
        paper = next((r.paper for t in pr.TABLES.values() for r in t.rows
                      if r.config == config and r.paper), {})
        box, mask, runs = [], [], []
        for seed in seeds:
            run_dir, metrics = find_run(work_root, '*', config, seed, final_step)
            if metrics is None:
                continue
            runs.append(run_dir)
            box.append(100.0 * metrics['coco/bbox_mAP'])
            if metrics.get('coco/segm_mAP') is not None:
                mask.append(100.0 * metrics['coco/segm_mAP'])
        latest = sorted(runs)[-1] if runs else None
        logs = sorted(glob.glob(osp.join(latest, '*', '*.log'))) if latest else []
        checkpoints = sorted(glob.glob(osp.join(latest, 'epoch_*.pth'))) if latest else []
        out.append(dict(config=config, **describe_config(config), paper=paper, box=box, mask=mask,
                        runs=len(runs), log=logs[-1] if logs else None,
                        checkpoint=checkpoints[-1] if checkpoints else None))
    return out


def to_zoo_readme(rows, n_expected: int) -> str:
    """``configs/cbn_paper/README.md``: the model-zoo table in mmdet's layout."""
    lines = ['# Cross-Iteration Batch Normalization (CBN) on COCO', '',
             '> [Cross-Iteration Batch Normalization](https://arxiv.org/abs/2002.05712), Yao et al., '
             'CVPR 2021', '',
             'The configs of the paper\'s COCO experiments (Tables 5-7, Figures 3 and 5): Faster / Mask '
             'R-CNN with FPN and the 4conv1fc box head, 1x schedule, 4 GPUs x 4 images, statistics per '
             'GPU. docs/reproducing.md says how to run them. This file is '
             'written by `tools/collect_table.py --model-zoo configs/cbn_paper`; rerun it after '
             'training.', '',
             '"paper" columns are the paper\'s numbers (mmdet v1, mean of 5 trials); "ours" are mean '
             '± sample std over the runs found with this code base (mmdet 3.x), empty until run; log '
             'and checkpoint are those of the latest run found (publish a checkpoint with '
             '`tools/model_converters/publish_model.py`).', '',
             '| config | backbone | normalizer | where | k | burn-in (epochs) | box AP (paper) | '
             'box AP (ours) | mask AP (paper) | mask AP (ours) | runs | log | checkpoint |',
             '|' + '---|' * 13]
    for r in rows:
        def paper(key):
            return '' if r['paper'].get(key) is None else f"{r['paper'][key]:.1f}"
        mask_paper = paper('mAP')
        lines.append(' | '.join([
            f"| [{r['config']}](./{r['config']}.py)", f"R-{r['depth']}", r['normalizer'], r['where'],
            '' if r['window'] is None else str(r['window']),
            '' if r['burn_in'] is None else str(r['burn_in']), paper('AP'),
            _fmt(*mean_std(r['box']), digits=1), mask_paper,
            _fmt(*mean_std(r['mask']), digits=1) if r['mask'] else '',
            f"{r['runs']}/{n_expected}", f"`{r['log']}`" if r['log'] else '',
            f"`{r['checkpoint']}`" if r['checkpoint'] else '']) + ' |')
    lines += ['', 'Figures 3 and 5 are plots in the paper: their values are not given in its text, so '
              'those rows have no paper column.']
    return '\n'.join(lines).replace('| — |', '|  |') + '\n'


def to_metafile(rows) -> str:
    """``configs/cbn_paper/metafile.yml`` in OpenMMLab's model-index format."""
    import yaml
    models = []
    for r in rows:
        metrics = {}
        if r['box']:
            metrics['box AP'] = round(mean_std(r['box'])[0], 1)
        if r['mask']:
            metrics['mask AP'] = round(mean_std(r['mask'])[0], 1)
        results = [dict(Task='Object Detection', Dataset='COCO', Metrics=metrics)] if metrics else []
        meta = {'Training Data': 'COCO', 'Epochs': 12, 'Batch Size': 16,
                'Normalization': r['normalizer'], 'Normalized Layers': r['where']}
        if r['window'] is not None:
            meta['Window'] = r['window']
        paper = {k: v for k, v in r['paper'].items() if k in ('AP', 'mAP')}
        models.append({
            'Name': r['config'], 'In Collection': 'CBN',
            'Config': f'configs/cbn_paper/{r["config"]}.py', 'Metadata': meta,
            'Results': results,
            'Paper Results': {('box AP' if k == 'AP' else 'mask AP'): v for k, v in paper.items()},
            'Weights': r['checkpoint'] or ''})
    collection = {'Name': 'CBN', 'Metadata': {'Training Techniques': ['SGD with Momentum'],
                                               'Architecture': ['Cross-Iteration Batch Normalization']},
                  'Paper': {'URL': 'https://arxiv.org/abs/2002.05712',
                            'Title': 'Cross-Iteration Batch Normalization'},
                  'README': 'configs/cbn_paper/README.md'}
    return yaml.safe_dump({'Collections': [collection], 'Models': models}, sort_keys=False,
                          allow_unicode=True)


FAMILIES = {'resnet18': 'ResNet-18', 'resnet50': 'ResNet-50', 'vgg16': 'VGG-16',
            'inception-v3': 'Inception-v3', 'densenet121': 'DenseNet-121',
            'mobilenet-v2': 'MobileNet-v2'}
IMAGENET_NORMALIZERS = dict(NORMALIZERS, **{'in': 'IN', 'ln': 'LN'})


def describe_imagenet_config(config: str) -> dict:
    """Backbone, normalizer, images per GPU, window and burn-in of an ImageNet config, read from its
    name ``{family}_{normalizer}[-k{k}][-burnin{epochs}]_4xb{N}-100e_in1k``
    (``tests/test_configs/test_imagenet_configs.py`` checks each name against the config)."""
    family, norm_part, schedule = config.split('_')[:3]
    burn_in = re.search(r'-burnin(\d+)', norm_part)
    window = re.search(r'-k(\d+)', norm_part)
    base = re.sub(r'-(k|burnin)\d+', '', norm_part)
    cbn = base in ('cbn', 'naive-cbn')
    return dict(backbone=FAMILIES[family], normalizer=IMAGENET_NORMALIZERS[base],
                images_per_gpu=int(re.match(r'\d+xb(\d+)-', schedule).group(1)),
                window=int(window.group(1)) if window else None,
                burn_in=int(burn_in.group(1)) if burn_in else (25 if cbn else None))


def _epoch_of(checkpoint: str) -> int:
    return int(re.search(r'epoch_(\d+)\.pth$', checkpoint).group(1))


def imagenet_zoo_rows(work_root: str, seeds: Sequence[int], final_step: Optional[int] = None):
    """One entry per ImageNet config: the paper's top-1 (first table row with one), ours over seeds,
    and the latest run's log and final checkpoint."""
    bench = load_paper_results().BENCHMARKS['imagenet']
    key = bench.metrics['top1'][0]
    out = []
    for config in bench.all_configs():
        paper = next((r.paper for t in bench.tables.values() for r in t.rows
                      if r.config == config and r.paper), {})
        top1, runs = [], []
        for seed in seeds:
            run_dir, metrics = find_run(work_root, '*', config, seed, final_step, key)
            if metrics is None:
                continue
            runs.append(run_dir)
            top1.append(bench.percent_per_unit * metrics[key])
        latest = sorted(runs)[-1] if runs else None
        logs = sorted(glob.glob(osp.join(latest, '*', '*.log'))) if latest else []
        checkpoints = sorted(glob.glob(osp.join(latest, 'epoch_*.pth')), key=_epoch_of) \
            if latest else []
        out.append(dict(config=config, **describe_imagenet_config(config), paper=paper, top1=top1,
                        runs=len(runs), log=logs[-1] if logs else None,
                        checkpoint=checkpoints[-1] if checkpoints else None))
    return out


def to_imagenet_zoo_readme(rows, n_expected: int) -> str:
    """The model-zoo table of ``configs/cbn_imagenet/README.md`` (mmpretrain's layout)."""
    lines = ['# Cross-Iteration Batch Normalization (CBN) on ImageNet', '',
             '> [Cross-Iteration Batch Normalization](https://arxiv.org/abs/2002.05712), Yao et al., '
             'CVPR 2021', '',
             'The configs of the paper\'s ImageNet experiments (Tables 2-4 and 9, Figures 3(a), 4 and '
             '5(a)): mmpretrain models and data pipelines, 4 GPUs, 100 epochs, cosine decay, lr 0.1 x '
             'N / 32 for N images per GPU, weight decay 1e-4 on all weights including γ and β, '
             'statistics per GPU, CBN burn-in 25 epochs. docs/imagenet.md says how to run them. This '
             'file is written by `tools/collect_table.py --benchmark imagenet --model-zoo '
             'configs/cbn_imagenet`; rerun it after training.', '',
             '"paper" is the paper\'s top-1 (mean of 5 trials); "ours" is mean ± sample std over the '
             'runs found with this code base (mmpretrain 1.x), empty until run; log and checkpoint '
             'are those of the latest run found.', '',
             '| config | backbone | normalizer | images / GPU | k | burn-in (epochs) | top-1 (paper) | '
             'top-1 (ours) | runs | log | checkpoint |',
             '|' + '---|' * 11]
    for r in rows:
        paper = r['paper'].get('top1')
        lines.append(' | '.join([
            f"| [{r['config']}](./{r['config']}.py)", r['backbone'], r['normalizer'],
            str(r['images_per_gpu']), '' if r['window'] is None else str(r['window']),
            '' if r['burn_in'] is None else str(r['burn_in']),
            '' if paper is None else f'{paper:.1f}', _fmt(*mean_std(r['top1']), digits=1),
            f"{r['runs']}/{n_expected}", f"`{r['log']}`" if r['log'] else '',
            f"`{r['checkpoint']}`" if r['checkpoint'] else '']) + ' |')
    lines += ['', 'Figures 3(a), 4 and 5(a) are plots in the paper: their values are not given in its '
              'text, so those rows have no paper column. Rows without a paper value in the tables '
              '(BN and BRN at 1 image per GPU) failed to train in the paper.']
    return '\n'.join(lines).replace('| — |', '|  |') + '\n'


def to_imagenet_metafile(rows) -> str:
    """``configs/cbn_imagenet/metafile.yml`` in OpenMMLab's model-index format."""
    import yaml
    models = []
    for r in rows:
        results = []
        if r['top1']:
            results = [dict(Task='Image Classification', Dataset='ImageNet-1k',
                            Metrics={'Top 1 Accuracy': round(mean_std(r['top1'])[0], 1)})]
        meta = {'Training Data': 'ImageNet-1k', 'Epochs': 100,
                'Batch Size': 4 * r['images_per_gpu'], 'Normalization': r['normalizer']}
        if r['window'] is not None:
            meta['Window'] = r['window']
        models.append({
            'Name': r['config'], 'In Collection': 'CBN-ImageNet',
            'Config': f'configs/cbn_imagenet/{r["config"]}.py', 'Metadata': meta,
            'Results': results,
            'Paper Results': ({'Top 1 Accuracy': r['paper']['top1']} if 'top1' in r['paper']
                              else {}),
            'Weights': r['checkpoint'] or ''})
    collection = {'Name': 'CBN-ImageNet',
                  'Metadata': {'Training Techniques': ['SGD with Momentum'],
                               'Architecture': ['Cross-Iteration Batch Normalization']},
                  'Paper': {'URL': 'https://arxiv.org/abs/2002.05712',
                            'Title': 'Cross-Iteration Batch Normalization'},
                  'README': 'configs/cbn_imagenet/README.md'}
    return yaml.safe_dump({'Collections': [collection], 'Models': models}, sort_keys=False,
                          allow_unicode=True)


def select_benchmark(names: Sequence[str], benchmark: Optional[str] = None) -> str:
    """The benchmark of the named tables (they must share one), else ``benchmark``, else coco."""
    tables = load_paper_results().ALL_TABLES
    named = {tables[n].benchmark for n in names if n in tables}
    if len(named) > 1:
        raise SystemExit(f'tables {list(names)} mix benchmarks {sorted(named)}; name one at a time')
    if named and benchmark is not None and named != {benchmark}:
        raise SystemExit(f'tables {list(names)} are {named.pop()} tables, not {benchmark}')
    return named.pop() if named else (benchmark or 'coco')


def select_tables(names: Sequence[str], benchmark: Optional[str] = None):
    """The named tables; ``all`` (or none) is every table of ``benchmark`` (default coco)."""
    pr = load_paper_results()
    tables = pr.ALL_TABLES
    unknown = [n for n in names if n not in tables and n != 'all']
    if unknown:
        raise SystemExit(f'unknown table(s) {unknown}; choose from {list(tables)} or all')
    bench = select_benchmark(names, benchmark)
    if not names or 'all' in names:
        return list(pr.BENCHMARKS[bench].tables.values())
    return [tables[n] for n in names]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('tables', nargs='*',
                        help='COCO: table5 table6 table7 figure3 figure5; ImageNet: table2 table3 '
                        'table4 table9 figure3a figure4 figure5a; or all')
    parser.add_argument('--benchmark', choices=sorted(paper_results.BENCHMARKS),
                        help="whose tables 'all' means and whose model zoo --model-zoo writes "
                        "(default: the named tables', else coco)")
    parser.add_argument('--work-root', default='work_dirs')
    parser.add_argument('--trials', type=int, default=5, help='seeds expected per row (paper: 5)')
    parser.add_argument('--seed-start', type=int, default=0)
    parser.add_argument('--final-step', type=int, default=None,
                        help='count a run only if its last validation is at this epoch (e.g. 12, '
                        'or 100 for ImageNet)')
    parser.add_argument('--format', choices=['markdown', 'csv', 'both'], default='both')
    parser.add_argument('--out', help='also write PREFIX.md / PREFIX.csv')
    parser.add_argument('--model-zoo', metavar='DIR',
                        help='also write DIR/README.md and DIR/metafile.yml (one row per config)')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    seeds = list(range(args.seed_start, args.seed_start + args.trials))
    md_parts, csv_rows = [], []
    bench = select_benchmark(args.tables, args.benchmark)
    for table in select_tables(args.tables, bench):
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
    if args.model_zoo:
        if bench == 'imagenet':
            zoo = imagenet_zoo_rows(args.work_root, seeds, args.final_step)
            readme, metafile = to_imagenet_zoo_readme(zoo, len(seeds)), to_imagenet_metafile(zoo)
        else:
            zoo = model_zoo_rows(args.work_root, seeds, args.final_step)
            readme, metafile = to_zoo_readme(zoo, len(seeds)), to_metafile(zoo)
        with open(osp.join(args.model_zoo, 'README.md'), 'w') as f:
            f.write(readme)
        with open(osp.join(args.model_zoo, 'metafile.yml'), 'w') as f:
            f.write(metafile)
    return 0


if __name__ == '__main__':
    sys.exit(main())
