"""The paper configs (configs/cbn_paper) say what the paper did; each family trains end to end.

tests/test_configs/test_configs.py builds every config's model; here the resolved settings are checked against
the paper's (Section 4.2) and against what each config's name promises, without building models.
The ``slow`` test trains one representative per family (every config with
``CBN_MMDET_ALL_CONFIGS=1``) for two iterations + COCO validation on the tiny demo data, through
tools/smoke_config.py and tools/train.py.
"""
import functools
import os
import os.path as osp
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT as REPO  # noqa: E402
from collect_table import load_paper_results, read_final_metrics  # noqa: E402

PR = load_paper_results()
CONFIG_DIR = osp.join(REPO, PR.CONFIG_DIR)
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith('.py'))


@functools.lru_cache(maxsize=None)
def _load(name):
    import cbn_mmdet  # noqa: F401
    from mmengine.config import Config
    return Config.fromfile(osp.join(CONFIG_DIR, name + '.py'))


def test_tables_and_configs_match():
    assert set(PR.all_configs()) == set(CONFIGS)
    assert [t for t in PR.TABLES] == ['table5', 'table6', 'table7', 'figure3', 'figure5']
    assert len(PR.TABLES['table5'].rows) == 10 and len(PR.TABLES['table6'].rows) == 12
    for table in PR.TABLES.values():
        for row in table.rows:
            assert set(row.paper) <= set(table.row_metrics(row)), row
            assert all(m in PR.METRICS for m in table.row_metrics(row))


def _expect(name):
    """What the name promises: (head norm type, all layers?, hooks, arch, depth)."""
    m = re.fullmatch(r'(faster|mask)-rcnn_r(50|101)_fpn_(.+)-(head|all)_1x_coco', name)
    assert m, name
    arch, depth, norm, where = m.groups()
    hooks = []
    if norm.startswith('bn2syncbn-ep'):
        hooks = [dict(type='NormSwitchHook', switch_epoch=int(norm.split('ep')[1]), to='SyncBN',
                      parts=('neck', 'roi_head.bbox_head'))]
        norm_type = 'BN'
    elif 'cbn' in norm and norm != 'syncbn':
        burn_in = int(norm.split('burnin')[1]) if 'burnin' in norm else 3
        # the window is stated once, in norm_cfg: the hook reads the layers' window
        hooks = [dict(type='CBNBurnInHook', burn_in=burn_in, by_epoch=True)]
        norm_type = 'CBN'
    else:
        norm_type = dict(none=None, bn='BN', syncbn='SyncBN', gn='GN', brn='BRN')[norm]
    return norm_type, where == 'all', hooks, arch, int(depth), norm


def _window(norm):
    """The CBN window a config name promises (``-k<k>``, else the paper's 4)."""
    return int(re.search(r'-k(\d)', norm).group(1)) if '-k' in norm else 4


@pytest.mark.parametrize('name', CONFIGS)
def test_paper_settings(name):
    cfg = _load(name)
    assert cfg.custom_imports == dict(imports=['cbn_mmdet'], allow_failed_imports=False)
    # 4 GPUs x 4 images, lr 0.02, momentum 0.9, wd 1e-4, 12 epochs, x0.1 after epochs 8 and 11.
    assert cfg.train_dataloader.batch_size == 4
    assert cfg.optim_wrapper.optimizer == dict(type='SGD', lr=0.02, momentum=0.9,
                                               weight_decay=1e-4)
    assert cfg.optim_wrapper.clip_grad == dict(max_norm=35, norm_type=2)
    assert cfg.auto_scale_lr.base_batch_size == 16 and not cfg.auto_scale_lr.enable
    assert cfg.train_cfg.type == 'EpochBasedTrainLoop' and cfg.train_cfg.max_epochs == 12
    step = [s for s in cfg.param_scheduler if s.type == 'MultiStepLR']
    assert len(step) == 1 and step[0].milestones == [8, 11] and step[0].gamma == 0.1
    assert step[0].by_epoch
    # Statistics per GPU: mmengine's sync_bn (which would also swap CBN out) is never set.
    assert not cfg.get('sync_bn')
    assert cfg.train_dataloader.dataset.type == 'CocoDataset'


@pytest.mark.parametrize('name', CONFIGS)
def test_norms_per_part_hooks_and_weights(name):
    cfg = _load(name)
    norm_type, all_layers, hooks, arch, depth, norm = _expect(name)
    model = cfg.model
    roi = model.roi_head
    assert model.type == ('MaskRCNN' if arch == 'mask' else 'FasterRCNN')
    assert roi.bbox_head.type == 'Shared4Conv1FCBBoxHead'  # 4conv1fc
    parts = {'neck': model.neck, 'bbox_head': roi.bbox_head}
    if arch == 'mask':
        assert roi.mask_head.type == 'FCNMaskHead' and roi.mask_head.num_convs == 4
        parts['mask_head'] = roi.mask_head
    for part, part_cfg in parts.items():
        got = part_cfg.get('norm_cfg')
        assert (got or {}).get('type') == norm_type, f'{name}: {part} norm {got}'
        if norm_type == 'CBN':
            assert got.get('window') == _window(norm), f'{name}: {part} window {got}'
            assert got.get('compensate', True) == (not norm.startswith('naive'))
        if norm_type == 'GN':
            assert got.num_groups == 32
    assert 'norm_cfg' not in model.rpn_head  # the RPN head has no normalizer
    backbone = model.backbone
    assert backbone.depth == depth and backbone.frozen_stages == 1
    if all_layers:
        assert backbone.norm_cfg.type == norm_type and backbone.norm_eval is False
    else:  # fixed BN: statistics frozen, affine trained (mmdet's and the authors' default)
        assert backbone.norm_cfg == dict(type='BN', requires_grad=True) and backbone.norm_eval
    torchvision_urls = {50: 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
                        101: 'https://download.pytorch.org/models/resnet101-63fe2227.pth'}
    weights = ('open-mmlab://detectron/resnet50_gn' if all_layers and norm_type == 'GN'
               else torchvision_urls[depth])
    assert backbone.init_cfg == dict(type='Pretrained', checkpoint=weights)
    source = open(osp.join(CONFIG_DIR, name + '.py')).read()
    assert weights in source or f'ResNet-{depth}' in source, \
        f'{name}: name its pretrained weights in a comment'
    assert [dict(h) for h in cfg.get('custom_hooks', [])] == hooks


def test_reproducing_page_lists_every_config():
    """docs/reproducing.md's COCO section names every config and its weights (the generated
    tables after it, which list every config anyway, are left out)."""
    page = open(osp.join(REPO, 'docs', 'reproducing.md')).read()
    section = page.split('## COCO')[1].split("### The paper's tables")[0]
    listed = set()
    for entry in re.findall(r'`([a-z0-9_{},-]+_1x_coco)`', section):  # expand `a{1,2}b`
        names = [entry]
        while any('{' in n for n in names):
            n = next(n for n in names if '{' in n)
            names.remove(n)
            head, rest = n.split('{', 1)
            options, tail = rest.split('}', 1)
            names += [head + o + tail for o in options.split(',')]
        listed.update(names)
    assert set(CONFIGS) <= listed, sorted(set(CONFIGS) - listed)
    for weights in ('resnet50-0676ba61.pth', 'resnet101-63fe2227.pth',
                    'open-mmlab://detectron/resnet50_gn'):
        assert weights in section


# One representative per family: Table 5 head CBN/BRN/GN and all-CBN, Table 6 Mask R-CNN CBN, and
# Table 7's switch (to CBN here: SyncBN needs CUDA and several processes).
REPRESENTATIVES = [
    'faster-rcnn_r50_fpn_cbn-head_1x_coco',
    'faster-rcnn_r50_fpn_brn-head_1x_coco',
    'faster-rcnn_r50_fpn_gn-head_1x_coco',
    'faster-rcnn_r50_fpn_cbn-all_1x_coco',
    'mask-rcnn_r50_fpn_cbn-head_1x_coco',
    'faster-rcnn_r50_fpn_bn2syncbn-ep8-head_1x_coco',
]


# The other configs are small deltas on these (a window, a burn-in length, a depth, a switch epoch),
# checked above without training; CBN_MMDET_ALL_CONFIGS=1 trains every one of them too.
TRAINED = (CONFIGS if os.environ.get('CBN_MMDET_ALL_CONFIGS') == '1'
           else REPRESENTATIVES + ['faster-rcnn_r50_fpn_cbn-k8-head_1x_coco'])


@pytest.mark.slow
@pytest.mark.parametrize('name', TRAINED)
def test_family_trains_and_validates(name, tiny_demo_data, tmp_path):
    """Each family's representative (every paper config with ``CBN_MMDET_ALL_CONFIGS=1``) trains
    2 iterations and validates on demo data."""
    smoke = str(tmp_path / f'{name}_smoke.py')
    work_dir = str(tmp_path / 'work')
    python = sys.executable
    env = dict(os.environ, PYTHONPATH=REPO)
    subprocess.run([python, 'tools/smoke_config.py', osp.join(PR.CONFIG_DIR, name + '.py'), smoke,
                    '--data-root', tiny_demo_data], cwd=REPO, env=env, check=True,
                   capture_output=True)
    proc = subprocess.run([python, 'tools/train.py', smoke, '--work-dir', work_dir], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_final_metrics(work_dir)
    assert metrics is not None and metrics['coco/bbox_mAP'] >= 0
    if name.startswith('mask'):
        assert 'coco/segm_mAP' in metrics
    log = proc.stdout + proc.stderr
    assert 'Epoch(train) [1][2/2]' in log  # two iterations
    if name == 'faster-rcnn_r50_fpn_cbn-k8-head_1x_coco':  # the window from norm_cfg, not the hook
        assert 'CBNBurnInHook: 12 CBN layers now use CBN with window 8' in log
    if name == 'faster-rcnn_r50_fpn_bn2syncbn-ep8-head_1x_coco':
        assert "NormSwitchHook: switched 12 norm layers in ['neck', 'roi_head.bbox_head'] to " \
               "{'type': 'CBN', 'window': 4}" in log


def test_plugin_import_lives_in_the_model_bases_not_the_schedule():
    """Swapping the schedule base must not drop ``custom_imports``."""
    from mmengine.config import Config
    base = osp.join(CONFIG_DIR, '_base_')
    assert 'custom_imports' not in open(osp.join(base, 'paper_1x.py')).read()
    for family in ('faster-rcnn_r50_fpn_4conv1fc_1x_coco.py', 'mask-rcnn_r50_fpn_4conv1fc_1x_coco.py'):
        cfg = Config.fromfile(osp.join(base, family))
        assert cfg.custom_imports == dict(imports=['cbn_mmdet'], allow_failed_imports=False)
