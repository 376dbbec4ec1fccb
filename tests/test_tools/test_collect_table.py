"""tools/collect_table.py and tools/run_table.py on synthetic work dirs (no training; fast)."""
import csv
import io
import json
import os
import os.path as osp

import pytest

from conftest import REPO_ROOT as REPO  # noqa: E402
import collect_table  # noqa: E402
import run_table  # noqa: E402

CFG = 'faster-rcnn_r50_fpn_cbn-head_1x_coco'


def _val(ap, step=12, **extra):
    line = {'coco/bbox_mAP': ap, 'coco/bbox_mAP_50': ap + 0.2, 'coco/bbox_mAP_75': ap + 0.03,
            'coco/bbox_mAP_s': 0.2, 'coco/bbox_mAP_m': 0.4, 'coco/bbox_mAP_l': 0.5,
            'data_time': 0.01, 'time': 0.1, 'step': step}
    line.update(extra)
    return line


def write_run(root, table, config, seed, val_lines, timestamp='20250101_000000', name='scalars.json'):
    vis = osp.join(root, table, config, f'seed{seed}', timestamp, 'vis_data')
    os.makedirs(vis, exist_ok=True)
    train = {'lr': 0.02, 'loss': 1.0, 'coco/bbox_mAP_not': 1, 'epoch': 1, 'iter': 10, 'step': 10}
    with open(osp.join(vis, name), 'w') as f:
        f.write(json.dumps(train) + '\n')
        for line in val_lines:
            f.write(json.dumps(line) + '\n')
            f.write(json.dumps(train) + '\n')


def test_last_val_line_of_latest_timestamp(tmp_path):
    root = str(tmp_path)
    write_run(root, 'table5', CFG, 0, [_val(0.30, 11), _val(0.31, 12)], '20250101_000000')
    write_run(root, 'table5', CFG, 0, [], '20250102_000000')  # a later, empty attempt
    metrics = collect_table.read_final_metrics(osp.join(root, 'table5', CFG, 'seed0'))
    assert metrics['coco/bbox_mAP'] == 0.31 and metrics['step'] == 12
    write_run(root, 'table5', CFG, 0, [_val(0.35)], '20250103_000000', name='20250103_000000.json')
    metrics = collect_table.read_final_metrics(osp.join(root, 'table5', CFG, 'seed0'))
    assert metrics['coco/bbox_mAP'] == 0.35
    assert collect_table.read_final_metrics(osp.join(root, 'nothing')) is None


def test_mean_std_missing_and_outputs(tmp_path, capsys):
    root = str(tmp_path)
    for seed, ap in ((0, 0.376), (1, 0.378), (2, 0.377)):
        write_run(root, 'table5', CFG, seed, [_val(ap)])
    # seed 3 crashed before validating; seed 4 never ran.
    os.makedirs(osp.join(root, 'table5', CFG, 'seed3', '20250101_000000', 'vis_data'))
    out = str(tmp_path / 'out' / 'table5')
    assert collect_table.main(['table5', '--work-root', root, '--trials', '5', '--out', out]) == 0
    md = open(out + '.md').read()
    assert md == capsys.readouterr().out.split('table,row,')[0][:len(md)]
    line = next(x for x in md.splitlines() if '`' + CFG + '`' in x)
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[0] == 'fixed BN / CBN' and cells[2] == '3/5'
    assert cells[3] == '37.70 ± 0.10' and cells[4] == '37.7'  # AP ours, AP paper
    assert cells[5] == '57.70 ± 0.10' and cells[6] == '59.0'  # AP50
    assert 'AP^bbox (paper)' in md and 'AP^bbox (ours)' in md
    for seed in (3, 4):
        assert osp.join(root, 'table5', CFG, f'seed{seed}') in md
    # Rows without runs: a dash, and every seed listed as missing.
    none_line = next(x for x in md.splitlines() if 'none-head' in x)
    assert '| 0/5 | — | 36.9 |' in none_line

    rows = list(csv.DictReader(io.StringIO(open(out + '.csv').read())))
    ap = next(r for r in rows if r['config'] == CFG and r['metric'] == 'AP')
    assert (ap['runs'], ap['expected'], ap['mean'], ap['std'], ap['paper']) == (
        '3', '5', '37.700', '0.100', '37.7')
    assert ap['missing'].split(';') == [osp.join(root, 'table5', CFG, f'seed{s}') for s in (3, 4)]
    assert {r['table'] for r in rows} == {'table5'}
    assert len(rows) == 10 * 6  # 10 rows x 6 box metrics


def test_single_run_has_no_std_and_shared_rows_are_found(tmp_path, capsys):
    root = str(tmp_path)
    write_run(root, 'table5', CFG, 0, [_val(0.377)])
    collect_table.main(['table6', '--work-root', root, '--trials', '1', '--format', 'markdown'])
    md = capsys.readouterr().out
    line = next(x for x in md.splitlines() if '`' + CFG + '`' in x)
    assert '| 1/1 | 37.70 | 37.7 |' in line  # Table 6's R50 CBN row reads Table 5's run
    assert 'AP^mask (paper)' in md  # Mask R-CNN rows add the mask columns
    mask_line = next(x for x in md.splitlines() if 'mask-rcnn_r50_fpn_cbn-head' in x)
    assert mask_line.rstrip(' |').endswith('34.6 | — | 56.4 | — | 36.6')


def test_final_step_filters_incomplete_runs(tmp_path):
    root = str(tmp_path)
    write_run(root, 'table7', 'faster-rcnn_r50_fpn_bn2syncbn-ep8-head_1x_coco', 0, [_val(0.3, 5)])
    table = collect_table.select_tables(['table7'])[0]
    rows = collect_table.collect(table, root, [0])
    assert rows[0]['values']['AP'] == [pytest.approx(30.0)]
    rows = collect_table.collect(table, root, [0], final_step=12)
    assert rows[0]['values']['AP'] == [] and len(rows[0]['missing']) == 1


def test_segm_metrics_and_unavailable_values(tmp_path):
    root = str(tmp_path)
    cfg = 'mask-rcnn_r50_fpn_cbn-head_1x_coco'
    write_run(root, 'table6', cfg, 0, [_val(0.385, **{'coco/segm_mAP': 0.346,
                                                      'coco/segm_mAP_50': 0.564,
                                                      'coco/segm_mAP_75': -1.0})])
    table = collect_table.select_tables(['table6'])[0]
    row = next(r for r in collect_table.collect(table, root, [0]) if r['row'].config == cfg)
    assert row['values']['mAP'] == [pytest.approx(34.6)]
    assert row['values']['mAP75'] == []  # CocoMetric's -1 means "not available", not -100 %
    assert 'APs' not in row['values']


def test_unknown_table_is_refused():
    with pytest.raises(SystemExit, match='unknown table'):
        collect_table.main(['table8'])   # the paper's cost table: no results table here


def _commands(out):
    return [x for x in out.splitlines() if x.startswith(('tools/', 'GPUS='))]


def test_run_table_dry_run_commands(tmp_path, capsys):
    root = str(tmp_path)
    assert run_table.main(['table7', '--gpus', '2', '--trials', '2', '--seed-start', '3',
                           '--rows', 'bn2syncbn-ep11-head', '--work-root', root, '--dry-run',
                           '--cfg-options', 'env_cfg.dist_cfg.backend=gloo']) == 0
    lines = _commands(capsys.readouterr().out)
    cfg = 'faster-rcnn_r50_fpn_bn2syncbn-ep11-head_1x_coco'
    assert lines == [
        f'tools/dist_train.sh configs/cbn_paper/{cfg}.py 2 --work-dir '
        f'{root}/table7/{cfg}/seed{s} --resume --cfg-options randomness.seed={s} '
        'env_cfg.dist_cfg.backend=gloo' for s in (3, 4)]
    for line in lines:  # every command names a config that exists
        assert osp.isfile(osp.join(REPO, line.split()[1]))


def test_run_table_slurm_commands(tmp_path, capsys):
    root = str(tmp_path)
    run_table.main(['table5', '--rows', 'cbn-head', '--trials', '1', '--gpus', '16',
                    '--launcher', 'slurm', '--partition', 'gpu', '--work-root', root, '--dry-run'])
    cfg = 'faster-rcnn_r50_fpn_cbn-head_1x_coco'
    assert _commands(capsys.readouterr().out) == [
        f'GPUS=16 GPUS_PER_NODE=8 tools/slurm_train.sh gpu {cfg}-seed0 '
        f'configs/cbn_paper/{cfg}.py {root}/table5/{cfg}/seed0 --resume --cfg-options '
        'randomness.seed=0']
    with pytest.raises(SystemExit):
        run_table.parse_args(['table5', '--launcher', 'slurm'])  # no partition


def test_run_table_done_means_final_checkpoint(tmp_path, capsys):
    """A run with a result but no final checkpoint (cut off, or validated early) is resumed; one
    with epoch_12.pth is done, also for another table that shares the config and seed."""
    root = str(tmp_path)
    write_run(root, 'table5', CFG, 0, [_val(0.377)])
    write_run(root, 'table5', CFG, 1, [_val(0.377)])
    open(osp.join(root, 'table5', CFG, 'seed1', 'epoch_12.pth'), 'w').close()
    run_table.main(['table5', 'table6', '--rows', 'cbn-head', 'r101', '--trials', '2',
                    '--work-root', root, '--dry-run'])
    out = capsys.readouterr().out
    runs, skips = _commands(out), [x for x in out.splitlines() if x.startswith('# skip')]
    # 'cbn-head' is a whole name field: syncbn-head does not match it.
    assert not any('syncbn-head' in x and 'r50' in x for x in runs)
    assert any(f'table5/{CFG}/seed0 --resume' in x for x in runs)  # not done: resumed
    assert f'# skip (done): table5 {CFG} seed1' in skips
    assert f'# skip (done): table6 {CFG} seed1' in skips  # Table 6 reuses Table 5's run
    assert f'# skip (trained under table5): table6 {CFG} seed0' in skips
    assert sum('r101' in x for x in runs) == 6 * 2
    with pytest.raises(SystemExit, match='no row'):
        run_table.main(['table5', '--rows', 'nothing', '--dry-run'])


def test_run_table_budget(tmp_path, capsys):
    run_table.main(['table5', '--rows', 'cbn-head', 'gn-head', '--trials', '5', '--iter-time', '0.4',
                    '--work-root', str(tmp_path), '--dry-run'])
    out = capsys.readouterr().out
    iters = 12 * -(-117266 // 16)
    per_run = iters * 0.4 * 4 / 3600
    assert f'# budget: {iters} iterations per run' in out
    assert f'= {per_run:.1f} GPU-hours per run' in out
    assert f'# total: 10 runs, {10 * per_run:.1f} GPU-hours; to train: 10 runs' in out


def test_model_zoo_files_are_the_tools_output(tmp_path):
    """configs/cbn_paper/README.md and metafile.yml are what collect_table.py writes (no runs yet)."""
    collect_table.main(['all', '--format', 'csv', '--work-root', str(tmp_path / 'none'),
                        '--model-zoo', str(tmp_path)])
    for name in ('README.md', 'metafile.yml'):
        committed = open(osp.join(REPO, 'configs', 'cbn_paper', name)).read()
        assert (tmp_path / name).read_text() == committed, \
            f'regenerate with: tools/collect_table.py all --model-zoo configs/cbn_paper ({name})'


def test_model_zoo_fills_ours_log_and_checkpoint(tmp_path, capsys):
    import yaml
    root = str(tmp_path / 'runs')
    write_run(root, 'table5', CFG, 0, [_val(0.377)])
    write_run(root, 'table6', CFG, 1, [_val(0.381)])
    run = osp.join(root, 'table6', CFG, 'seed1')
    open(osp.join(run, 'epoch_12.pth'), 'w').close()
    stamp = next(d for d in os.listdir(run) if osp.isdir(osp.join(run, d)))
    open(osp.join(run, stamp, f'{stamp}.log'), 'w').close()
    collect_table.main(['all', '--format', 'csv', '--work-root', root, '--trials', '2',
                        '--model-zoo', str(tmp_path)])
    line = next(x for x in (tmp_path / 'README.md').read_text().splitlines()
                if x.startswith(f'| [{CFG}]'))
    cells = [c.strip() for c in line.split('|')[1:-1]]
    assert cells[2:7] == ['CBN', 'FPN + heads', '4', '3', '37.7']
    assert cells[7] == '37.9 ± 0.3' and cells[10] == '2/2'
    assert cells[11].endswith('.log`') and cells[12] == f'`{run}/epoch_12.pth`'
    meta = yaml.safe_load((tmp_path / 'metafile.yml').read_text())
    model = next(m for m in meta['Models'] if m['Name'] == CFG)
    assert model['Results'][0]['Metrics'] == {'box AP': 37.9}
    assert model['Paper Results'] == {'box AP': 37.7} and model['Metadata']['Window'] == 4


# ------------------------------------------------------------------------------------------------
# ImageNet (configs/cbn_imagenet/paper_results.yml): same tools, mmpretrain's logs

IN_CFG = 'resnet18_cbn-k4_4xb4-100e_in1k'


def _top1(acc, step=100):
    return {'accuracy/top1': acc, 'data_time': 0.01, 'time': 0.1, 'step': step}


def test_imagenet_table_reads_top1_in_percent_next_to_the_paper(tmp_path, capsys):
    root = str(tmp_path)
    for seed, acc in ((0, 69.8), (1, 70.2)):
        write_run(root, 'table3', IN_CFG, seed, [_top1(acc - 5, 99), _top1(acc)])
    # a COCO line in the same log is not a classification result
    write_run(root, 'table3', 'resnet18_bn_4xb4-100e_in1k', 0, [_val(0.3)])
    assert collect_table.main(['table3', '--work-root', root, '--trials', '2',
                               '--format', 'markdown']) == 0
    md = capsys.readouterr().out
    line = next(x for x in md.splitlines() if f'`{IN_CFG}`' in x)
    cells = [c.strip() for c in line.strip('|').split('|')]
    # mmpretrain logs percent: no scaling; the paper's value beside it
    assert cells == ['CBN 4/GPU', f'`{IN_CFG}`', '2/2', '70.00 ± 0.28', '70.0']
    bn = next(x for x in md.splitlines() if '`resnet18_bn_4xb4-100e_in1k`' in x)
    assert '| 0/2 |' in bn and '65.1' in bn
    assert 'top-1 accuracy in % on ImageNet val' in md and 'AP in %' not in md
    # Figure 4 shares the run: found under the other table
    assert collect_table.main(['figure4', '--work-root', root, '--trials', '2',
                               '--format', 'csv']) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert next(r for r in rows if r['config'] == IN_CFG)['mean'] == '70.000'


def test_tables_of_two_benchmarks_are_not_mixed(tmp_path):
    with pytest.raises(SystemExit, match='mix benchmarks'):
        collect_table.main(['table3', 'table5', '--work-root', str(tmp_path)])
    with pytest.raises(SystemExit, match='not coco'):
        collect_table.main(['table3', '--benchmark', 'coco', '--work-root', str(tmp_path)])
    assert [t.name for t in collect_table.select_tables(['all'], 'imagenet')] == [
        'table2', 'table3', 'table4', 'table9', 'figure3a', 'figure4', 'figure5a']
    assert collect_table.select_tables([])[0].name == 'table5'   # COCO by default, as before


def test_run_table_imagenet_budget_per_images_per_gpu(tmp_path, capsys):
    root = str(tmp_path)
    run_table.main(['table3', '--rows', 'CBN 32/GPU', 'CBN 4/GPU', '--trials', '2',
                    '--iter-time', '0.1', '--work-root', root, '--dry-run'])
    out = capsys.readouterr().out
    iters = {32: 100 * -(-1281167 // 128), 4: 100 * -(-1281167 // 16)}
    hours = {n: i * 0.1 * 4 / 3600 for n, i in iters.items()}
    assert (f'#   resnet18_cbn-k1_4xb32-100e_in1k ({iters[32]} iterations: 100 epochs of 1281167 '
            f'images, 4 GPUs x 32 images): 2 runs, {2 * hours[32]:.1f} GPU-hours') in out
    assert f'#   {IN_CFG} ({iters[4]} iterations: 100 epochs of 1281167 images, 4 GPUs x 4 images)' in out
    assert f'# total: 4 runs, {2 * hours[32] + 2 * hours[4]:.1f} GPU-hours' in out
    commands = _commands(out)
    assert commands[-1] == (f'tools/dist_train.sh configs/cbn_imagenet/{IN_CFG}.py 4 --work-dir '
                            f'{root}/table3/{IN_CFG}/seed1 --resume --cfg-options randomness.seed=1')
    # done: the ImageNet schedule's final checkpoint, epoch_100.pth
    write_run(root, 'table3', IN_CFG, 0, [_top1(70.0)])
    open(osp.join(root, 'table3', IN_CFG, 'seed0', 'epoch_100.pth'), 'w').close()
    run_table.main(['table9', '--rows', 'CBN^(1)', 'BN', '--trials', '1', '--work-root', root,
                    '--dry-run'])
    assert len(_commands(capsys.readouterr().out)) == 2
    run_table.main(['figure4', '--rows', 'CBN', '--trials', '1', '--work-root', root, '--dry-run'])
    assert f'# skip (done): figure4 {IN_CFG} seed0' in capsys.readouterr().out


def test_imagenet_model_zoo_fills_ours_log_and_checkpoint(tmp_path):
    import yaml
    root = str(tmp_path / 'runs')
    write_run(root, 'table3', IN_CFG, 0, [_top1(70.1)])
    run = osp.join(root, 'table3', IN_CFG, 'seed0')
    for epoch in (9, 100):   # the final checkpoint by number, not by name
        open(osp.join(run, f'epoch_{epoch}.pth'), 'w').close()
    collect_table.main(['--benchmark', 'imagenet', '--format', 'csv', '--work-root', root,
                        '--trials', '1', '--model-zoo', str(tmp_path)])
    line = next(x for x in (tmp_path / 'README.md').read_text().splitlines()
                if x.startswith(f'| [{IN_CFG}]'))
    cells = [c.strip() for c in line.split('|')[1:-1]]
    assert cells[1:8] == ['ResNet-18', 'CBN', '4', '4', '25', '70.0', '70.1']
    assert cells[8] == '1/1' and cells[10] == f'`{run}/epoch_100.pth`'
    meta = yaml.safe_load((tmp_path / 'metafile.yml').read_text())
    model = next(m for m in meta['Models'] if m['Name'] == IN_CFG)
    assert model['Results'][0]['Metrics'] == {'Top 1 Accuracy': 70.1}
    assert model['Paper Results'] == {'Top 1 Accuracy': 70.0}
    assert model['Metadata']['Batch Size'] == 16 and model['Metadata']['Window'] == 4
