"""The paper's tables, read on import from ``configs/cbn_paper/paper_results.yml`` (COCO, Tables 5-7,
Figures 3(b) and 5(b)) and ``configs/cbn_imagenet/paper_results.yml`` (ImageNet, Tables 2-4 and 9,
Figures 3(a), 4 and 5(a)).

``BENCHMARKS`` maps ``'coco'`` and ``'imagenet'`` to a :class:`Benchmark`: its tables in the paper's
order, its metrics (column name to (metric key in the val log, heading)), the folder of its configs
relative to the repository, how its logs scale values and its training schedule. ``ALL_TABLES`` holds
every table of both (their names are distinct); ``TABLES``, ``METRICS``, ``CONFIG_DIR`` and
:func:`all_configs` are COCO's, as before ImageNet was added. The YAML files' comments say how the paper was read.

``REFERENCE_TABLES``: the paper's tables that no config reproduces and no run collects (Table 8's
memory and speed), from a file's optional ``reference_tables``; the documentation shows them as the
paper's numbers (``tools/docs_tables.py``).
"""
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

__all__ = ['METRICS', 'PaperRow', 'PaperTable', 'ReferenceTable', 'Benchmark', 'BENCHMARKS',
           'TABLES', 'ALL_TABLES', 'REFERENCE_TABLES', 'CONFIG_DIR',
           'all_configs', 'read', 'benchmark_of']

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG_DIRS = {'coco': 'configs/cbn_paper', 'imagenet': 'configs/cbn_imagenet'}
CONFIG_DIR = CONFIG_DIRS['coco']
RESULTS_FILE = osp.join(REPO, CONFIG_DIR, 'paper_results.yml')
# What a file says when it leaves the keys out: COCO's (the first file had none of them).
_COCO_SCHEDULE = dict(train_images=117266, final_epoch=12, images_per_gpu=4)
# log_unit: how the val log writes a metric; tables show percent
_PERCENT_PER_UNIT = {'fraction': 100.0, 'percent': 1.0}


@dataclass(frozen=True)
class PaperRow:
    """One row: its label in the paper's layout, the config that reproduces it, the paper's values."""
    label: str
    config: str
    paper: Dict[str, float] = field(default_factory=dict)
    metrics: Optional[Tuple[str, ...]] = None  # None: the table's metrics


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    metrics: Tuple[str, ...]
    rows: Tuple[PaperRow, ...]
    note: str = ''
    benchmark: str = 'coco'

    def row_metrics(self, row: PaperRow) -> Tuple[str, ...]:
        return row.metrics or self.metrics


@dataclass(frozen=True)
class ReferenceTable:
    """A table of the paper shown as it is: its columns and rows of cells, no configs, no runs."""
    name: str
    title: str
    columns: Tuple[str, ...]
    rows: Tuple[Tuple, ...]
    note: str = ''


@dataclass(frozen=True)
class Benchmark:
    """One results file: its tables and how to read and schedule their runs."""
    name: str
    config_dir: str
    metrics: Dict[str, Tuple[str, str]]
    tables: Dict[str, PaperTable]
    percent_per_unit: float   # logged value x this = percent
    train_images: int
    final_epoch: int
    images_per_gpu: Optional[int]   # None: each config's, read from its name (4xb<N>)
    reference_tables: Dict[str, ReferenceTable] = field(default_factory=dict)

    def all_configs(self) -> List[str]:
        """Every config name the tables use, each once, in table order."""
        seen: Dict[str, None] = {}
        for table in self.tables.values():
            for row in table.rows:
                seen.setdefault(row.config)
        return list(seen)


def _check_keys(what: str, entry: dict, required: set, optional: set) -> None:
    missing, unknown = required - set(entry), set(entry) - required - optional
    if missing or unknown:
        raise ValueError(f'{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)} '
                         f'(got {entry})')


def read_benchmark(name: str, path: str, config_dir: str) -> Benchmark:
    """A :class:`Benchmark` from a paper results file; a misspelt or missing key raises."""
    with open(path) as f:
        data = yaml.safe_load(f)
    _check_keys(path, data, {'metrics', 'tables'},
                {'log_unit', 'schedule', 'reference_tables'})
    metrics = {m: tuple(key_heading) for m, key_heading in data['metrics'].items()}
    unit = data.get('log_unit', 'fraction')
    if unit not in _PERCENT_PER_UNIT:
        raise ValueError(f'{path}: log_unit must be one of {sorted(_PERCENT_PER_UNIT)}, got {unit!r}')
    schedule = data.get('schedule', _COCO_SCHEDULE)
    _check_keys(f'{path}: schedule', schedule, {'train_images', 'final_epoch'}, {'images_per_gpu'})
    tables = {}
    for table_name, table in data['tables'].items():
        _check_keys(f'{path}: {table_name}', table, {'title', 'metrics', 'rows'}, {'note'})
        rows = []
        for row in table['rows']:
            _check_keys(f'{path}: {table_name} row', row, {'label', 'config'}, {'paper', 'metrics'})
            rows.append(PaperRow(row['label'], row['config'], dict(row.get('paper') or {}),
                                 tuple(row['metrics']) if 'metrics' in row else None))
        tables[table_name] = PaperTable(table_name, table['title'], tuple(table['metrics']),
                                        tuple(rows), table.get('note', ''), name)
    references = {}
    for table_name, table in (data.get('reference_tables') or {}).items():
        _check_keys(f'{path}: {table_name}', table, {'title', 'columns', 'rows'}, {'note'})
        for row in table['rows']:
            if len(row) != len(table['columns']):
                raise ValueError(f'{path}: {table_name}: row {row} has {len(row)} cells for '
                                 f'{len(table["columns"])} columns')
        references[table_name] = ReferenceTable(
            table_name, table['title'], tuple(table['columns']),
            tuple(tuple(r) for r in table['rows']), table.get('note', ''))
    return Benchmark(name, config_dir, metrics, tables, _PERCENT_PER_UNIT[unit],
                     int(schedule['train_images']), int(schedule['final_epoch']),
                     schedule.get('images_per_gpu'), references)


def read(path: str = RESULTS_FILE) -> Tuple[Dict[str, Tuple[str, str]], Dict[str, PaperTable]]:
    """``(METRICS, TABLES)`` from a COCO-layout paper results file; a misspelt or missing key raises."""
    bench = read_benchmark('coco', path, CONFIG_DIR)
    return bench.metrics, bench.tables


BENCHMARKS = {name: read_benchmark(name, osp.join(REPO, d, 'paper_results.yml'), d)
              for name, d in CONFIG_DIRS.items()}
METRICS = BENCHMARKS['coco'].metrics
TABLES = BENCHMARKS['coco'].tables
ALL_TABLES = {name: table for bench in BENCHMARKS.values() for name, table in bench.tables.items()}
REFERENCE_TABLES = {name: table for bench in BENCHMARKS.values()
                    for name, table in bench.reference_tables.items()}
assert len(ALL_TABLES) == sum(len(b.tables) for b in BENCHMARKS.values()), \
    'table names must be distinct across the results files'
assert not set(ALL_TABLES) & set(REFERENCE_TABLES) and len(REFERENCE_TABLES) == sum(
    len(b.reference_tables) for b in BENCHMARKS.values()), \
    'reference table names must be distinct from each other and from the tables'


def benchmark_of(table: PaperTable) -> Benchmark:
    return BENCHMARKS[table.benchmark]


def all_configs() -> List[str]:
    """Every COCO config name the tables use, each once, in table order."""
    return BENCHMARKS['coco'].all_configs()
