"""The paper's COCO tables, read from ``configs/cbn_paper/paper_results.yml`` on import.

``TABLES`` maps a table name to its :class:`PaperTable`, in the paper's order; ``METRICS`` maps a
column name to (mmdet CocoMetric key in the val log, heading); ``CONFIG_DIR`` is the folder of the
rows' configs, relative to the repository. The YAML file's comments say how the paper was read.
"""
import os.path as osp
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import yaml

__all__ = ['METRICS', 'PaperRow', 'PaperTable', 'TABLES', 'CONFIG_DIR', 'all_configs', 'read']

CONFIG_DIR = 'configs/cbn_paper'
RESULTS_FILE = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), CONFIG_DIR,
                        'paper_results.yml')


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

    def row_metrics(self, row: PaperRow) -> Tuple[str, ...]:
        return row.metrics or self.metrics


def _check_keys(what: str, entry: dict, required: set, optional: set) -> None:
    missing, unknown = required - set(entry), set(entry) - required - optional
    if missing or unknown:
        raise ValueError(f'{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)} '
                         f'(got {entry})')


def read(path: str = RESULTS_FILE) -> Tuple[Dict[str, Tuple[str, str]], Dict[str, PaperTable]]:
    """``(METRICS, TABLES)`` from a paper results file; a misspelt or missing key raises."""
    with open(path) as f:
        data = yaml.safe_load(f)
    _check_keys(path, data, {'metrics', 'tables'}, set())
    metrics = {name: tuple(key_heading) for name, key_heading in data['metrics'].items()}
    tables = {}
    for name, table in data['tables'].items():
        _check_keys(f'{path}: {name}', table, {'title', 'metrics', 'rows'}, {'note'})
        rows = []
        for row in table['rows']:
            _check_keys(f'{path}: {name} row', row, {'label', 'config'}, {'paper', 'metrics'})
            rows.append(PaperRow(row['label'], row['config'], dict(row.get('paper') or {}),
                                 tuple(row['metrics']) if 'metrics' in row else None))
        tables[name] = PaperTable(name, table['title'], tuple(table['metrics']), tuple(rows),
                                  table.get('note', ''))
    return metrics, tables


METRICS, TABLES = read()


def all_configs() -> List[str]:
    """Every config name the tables use, each once, in table order."""
    seen: Dict[str, None] = {}
    for table in TABLES.values():
        for row in table.rows:
            seen.setdefault(row.config)
    return list(seen)
