"""The paper's COCO experiments (Yao et al., CVPR 2021, Section 4.2-4.3) as data.

One place for which config reproduces which row of Tables 5-7 and Figures 3 and 5, which metrics
each table reports, and the paper's numbers (COCO 2017 val, AP in %, mean of 5 trials, mmdet-v1
code base). ``tools/run_table.py`` launches the rows, ``tools/collect_table.py`` prints them next to
the paper's numbers. Configs live in ``configs/cbn_paper/<config>.py``.

Reading of the paper's text (arXiv 2002.05712v3): Table 6's Mask R-CNN rows have the columns
AP^bbox, AP50^bbox, AP75^bbox, AP^mask, AP50^mask, AP75^mask (the extracted text shifts the header
into the first row). Figures 3 and 5 are plots whose values are not given in the text: their
``paper`` entries are empty.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ['METRICS', 'PaperRow', 'PaperTable', 'TABLES', 'CONFIG_DIR', 'all_configs']

CONFIG_DIR = 'configs/cbn_paper'

#: Column name -> (mmdet CocoMetric key in the val log, heading). Logged values are fractions in
#: [0, 1]; tables show percent.
METRICS: Dict[str, Tuple[str, str]] = {
    'AP': ('coco/bbox_mAP', 'AP^bbox'),
    'AP50': ('coco/bbox_mAP_50', 'AP50^bbox'),
    'AP75': ('coco/bbox_mAP_75', 'AP75^bbox'),
    'APs': ('coco/bbox_mAP_s', 'APs^bbox'),
    'APm': ('coco/bbox_mAP_m', 'APm^bbox'),
    'APl': ('coco/bbox_mAP_l', 'APl^bbox'),
    'mAP': ('coco/segm_mAP', 'AP^mask'),
    'mAP50': ('coco/segm_mAP_50', 'AP50^mask'),
    'mAP75': ('coco/segm_mAP_75', 'AP75^mask'),
}
BOX6 = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
MASK6 = ('AP', 'AP50', 'AP75', 'mAP', 'mAP50', 'mAP75')


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


def _box(*values) -> Dict[str, float]:
    return dict(zip(BOX6, values))


def _mask(*values) -> Dict[str, float]:
    return dict(zip(MASK6, values))


F50 = 'faster-rcnn_r50_fpn_{}_1x_coco'
_T5 = (
    PaperRow('fixed BN / -', F50.format('none-head'), _box(36.9, 58.2, 39.9, 21.2, 40.8, 46.9)),
    PaperRow('fixed BN / BN', F50.format('bn-head'), _box(36.3, 57.3, 39.2, 20.8, 39.7, 47.3)),
    PaperRow('fixed BN / syncBN', F50.format('syncbn-head'),
             _box(37.7, 58.5, 41.1, 22.0, 40.9, 49.0)),
    PaperRow('fixed BN / GN', F50.format('gn-head'), _box(37.8, 59.0, 40.8, 22.3, 41.2, 48.4)),
    PaperRow('fixed BN / BRN', F50.format('brn-head'), _box(37.4, 58.1, 40.3, 22.0, 40.7, 48.3)),
    PaperRow('fixed BN / CBN', F50.format('cbn-head'), _box(37.7, 59.0, 40.7, 22.1, 40.9, 48.8)),
    PaperRow('BN / BN', F50.format('bn-all'), _box(35.5, 56.4, 38.7, 19.7, 38.8, 47.3)),
    PaperRow('syncBN / syncBN', F50.format('syncbn-all'),
             _box(37.9, 58.5, 41.1, 21.7, 41.5, 49.7)),
    PaperRow('GN / GN', F50.format('gn-all'), _box(37.8, 59.1, 40.9, 22.4, 41.2, 49.0)),
    PaperRow('CBN / CBN', F50.format('cbn-all'), _box(37.7, 58.9, 40.6, 22.0, 41.4, 48.9)),
)
_T6 = (
    PaperRow('R50+FPN Faster R-CNN GN', F50.format('gn-head'),
             _box(37.8, 59.0, 40.8, 22.3, 41.2, 48.4)),
    PaperRow('R50+FPN Faster R-CNN syncBN', F50.format('syncbn-head'),
             _box(37.7, 58.5, 41.1, 22.0, 40.9, 49.0)),
    PaperRow('R50+FPN Faster R-CNN CBN', F50.format('cbn-head'),
             _box(37.7, 59.0, 40.7, 22.1, 40.9, 48.8)),
    PaperRow('R101+FPN Faster R-CNN GN', 'faster-rcnn_r101_fpn_gn-head_1x_coco',
             _box(39.3, 60.6, 42.7, 22.5, 42.5, 51.3)),
    PaperRow('R101+FPN Faster R-CNN syncBN', 'faster-rcnn_r101_fpn_syncbn-head_1x_coco',
             _box(39.2, 59.8, 43.0, 22.2, 42.9, 51.6)),
    PaperRow('R101+FPN Faster R-CNN CBN', 'faster-rcnn_r101_fpn_cbn-head_1x_coco',
             _box(39.2, 60.0, 42.6, 22.3, 42.6, 51.1)),
    PaperRow('R50+FPN Mask R-CNN GN', 'mask-rcnn_r50_fpn_gn-head_1x_coco',
             _mask(38.6, 59.8, 41.9, 35.0, 56.7, 37.3), MASK6),
    PaperRow('R50+FPN Mask R-CNN syncBN', 'mask-rcnn_r50_fpn_syncbn-head_1x_coco',
             _mask(38.5, 58.9, 42.3, 34.7, 56.3, 36.8), MASK6),
    PaperRow('R50+FPN Mask R-CNN CBN', 'mask-rcnn_r50_fpn_cbn-head_1x_coco',
             _mask(38.5, 59.2, 42.1, 34.6, 56.4, 36.6), MASK6),
    PaperRow('R101+FPN Mask R-CNN GN', 'mask-rcnn_r101_fpn_gn-head_1x_coco',
             _mask(40.3, 61.2, 44.2, 36.6, 58.5, 39.2), MASK6),
    PaperRow('R101+FPN Mask R-CNN syncBN', 'mask-rcnn_r101_fpn_syncbn-head_1x_coco',
             _mask(40.3, 60.8, 44.2, 36.0, 57.7, 38.6), MASK6),
    PaperRow('R101+FPN Mask R-CNN CBN', 'mask-rcnn_r101_fpn_cbn-head_1x_coco',
             _mask(40.1, 60.5, 44.1, 35.8, 57.3, 38.5), MASK6),
)
_T7 = tuple(
    PaperRow(f'BN -> syncBN at Epoch-{e}', F50.format(f'bn2syncbn-ep{e}-head'), {'AP': ap})
    for e, ap in ((8, 37.7), (9, 37.7), (10, 37.6), (11, 37.3)))
_F3 = tuple(
    PaperRow(f'{name} k={k}', F50.format(f'{prefix}-head' if k == 4 else f'{prefix}-k{k}-head'))
    for name, prefix in (('CBN', 'cbn'), ('Naive CBN', 'naive-cbn')) for k in (1, 2, 4, 8))
_F5 = tuple(
    PaperRow(f'burn-in {b} epochs', F50.format('cbn-head' if b == 3 else f'cbn-burnin{b}-head'))
    for b in (0, 1, 2, 3, 5, 8))

_TABLES = (
    PaperTable('table5', 'Table 5: feature normalization methods, Faster R-CNN R50-FPN (backbone / '
               'head normalizer)', BOX6, _T5),
    PaperTable('table6', 'Table 6: stronger backbones, Faster and Mask R-CNN', BOX6, _T6,
               'Mask R-CNN rows: AP, AP50, AP75 of boxes, then AP, AP50, AP75 of masks.'),
    PaperTable('table7', 'Table 7: BN in the head, switched to syncBN at an epoch (switch_epoch = '
               'epochs trained with BN)', ('AP', ), _T7),
    PaperTable('figure3', 'Figure 3(b): window size k on COCO, CBN and Naive CBN (k=1 is BN)',
               ('AP', ), _F3, 'The paper plots these; its values are not given in the text.'),
    PaperTable('figure5', 'Figure 5(b): burn-in period on COCO, CBN k=4', ('AP', ), _F5,
               'The paper plots these; its values are not given in the text.'),
)
#: name -> table, in the paper's order.
TABLES: Dict[str, PaperTable] = {t.name: t for t in _TABLES}


def all_configs() -> List[str]:
    """Every config name the tables use, each once, in table order."""
    seen: Dict[str, None] = {}
    for table in _TABLES:
        for row in table.rows:
            seen.setdefault(row.config)
    return list(seen)
