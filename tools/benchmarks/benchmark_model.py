"""Model-level cost of CBN (the paper's Table 8 analog): Faster/Mask R-CNN R50-FPN with 4conv1fc heads.

Per normalizer variant, in its own subprocess: training-step time, peak memory, CBN history size, FLOPs
and inference time, against BN in the same run. Design: docs/analysis.md. Prints the table.

    .venv/bin/python tools/benchmarks/benchmark_model.py [--arch faster|mask] [--size 320 448]
        [--images 2] [--rois 128] [--repeats 5] [--warmup 2] [--skip-flops] [--skip-inference] [--amp]
        [--interleave] [--variants bn gn cbn-head cbn-all naive-all cbn-all-sub2]

``--gather-weights`` instead times what compensating all layers at once would add per step: gathering
the current weights of every compensated conv into one flat tensor (``torch.cat``, CBN k=4 in all
layers, after one training step has bound each layer to its conv).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

import torch

import record

VARIANTS = {
    # name: (norm type, where: 'head' = FPN + box/mask heads over a frozen-BN backbone; 'all' = also
    #        the backbone's stages 2-4 (frozen_stages=1, norm_eval=False), extra norm kwargs)
    'bn': ('BN', 'all', {}),
    'gn': ('GN', 'all', {'num_groups': 32}),
    'cbn-head': ('CBN', 'head', {'window': 4}),
    'cbn-all': ('CBN', 'all', {'window': 4}),
    'naive-all': ('CBN', 'all', {'window': 4, 'compensate': False}),
    'cbn-all-bf16': ('CBN', 'all', {'window': 4, 'history_dtype': 'bfloat16'}),
    'cbn-all-bf16-product': ('CBN', 'all', {'window': 4, 'var_grad_dtype': 'bfloat16'}),
    'cbn-all-sub2': ('CBN', 'all', {'window': 4, 'statistics_gradients': 'subsampled'}),
}


def _rss_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return float('nan')


def build_model(arch, variant, rois):
    import mmdet
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    name = ('faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py' if arch == 'faster' else
            'mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py')
    cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', name))
    norm_type, where, extra = VARIANTS[variant]
    norm_cfg = dict(type=norm_type, requires_grad=True, **extra)
    model = cfg.model
    model.backbone.init_cfg = None
    if where == 'all':
        model.backbone.update(norm_cfg=norm_cfg, norm_eval=False, frozen_stages=1)
    model.neck.norm_cfg = norm_cfg
    head = model.roi_head.bbox_head
    model.roi_head.bbox_head = dict(
        type='Shared4Conv1FCBBoxHead', in_channels=256, fc_out_channels=1024, roi_feat_size=7,
        num_classes=80, norm_cfg=norm_cfg, bbox_coder=head.bbox_coder, reg_class_agnostic=False,
        loss_cls=head.loss_cls, loss_bbox=head.loss_bbox)
    if arch == 'mask':
        model.roi_head.mask_head.norm_cfg = norm_cfg
    model.train_cfg.rcnn.sampler.num = rois
    return MODELS.build(model)


def prepare(args, variant, device):
    """``(model, data, train_step)`` for one variant: the model, a fixed batch and an SGD step."""
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_model(args.arch, variant, args.rois).to(device)
    packed = demo_mm_inputs(batch_size=args.images, image_shapes=[(3, *args.size)] * args.images,
                            num_items=[5] * args.images, num_classes=80,
                            with_mask=args.arch == 'mask')
    data = model.data_preprocessor(packed, True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def train_step():
        with torch.autocast(device, enabled=args.amp,
                            dtype=torch.float16 if device == 'cuda' else torch.bfloat16):
            losses = model.loss(data['inputs'], data['data_samples'])
        loss, _ = model.parse_losses(losses)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, data, train_step


def _device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def _timed(fn, device):
    """Seconds that ``fn()`` takes, its queued device work included."""
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_interleaved(args):
    """Training-step times of all variants in one process, in rounds (each round times one step of
    every variant, in turn), so that drifts of the machine's speed hit every variant alike."""
    warnings.simplefilter('ignore')
    import cbn_mmdet  # noqa: F401
    device = _device()
    steps = {}
    for variant in args.variants:
        model, _, steps[variant] = prepare(args, variant, device)
        model.train()
    times = {v: [] for v in steps}
    for i in range(args.warmup + args.repeats):
        for variant, step in steps.items():
            seconds = _timed(step, device)
            if i >= args.warmup:
                times[variant].append(seconds)
    print(json.dumps({v: statistics.median(t) for v, t in times.items()}))


def run_one(args):
    warnings.simplefilter('ignore')
    import cbn_mmdet  # noqa: F401
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    from flops import counter as flop_counter
    import_mb = _rss_mb()
    device = _device()
    model, data, train_step = prepare(args, args.variant, device)
    model.train()
    times = [_timed(train_step, device) for _ in range(args.warmup + args.repeats)][args.warmup:]
    flops = flop_counter()
    if not args.skip_flops:
        with flops:
            train_step()
    model.eval()
    infer = [float('nan')]
    with torch.no_grad():
        if not args.skip_inference:
            infer = [_timed(lambda: model.predict(data['inputs'], data['data_samples']), device)
                     for _ in range(args.warmup + args.repeats)][args.warmup:]
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2**20
        import_mb = 0.0
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    history = sum(m.history.nbytes() for m in model.modules()
                  if isinstance(m, CrossIterationBatchNorm2d))
    print(json.dumps(dict(variant=args.variant, train_s=statistics.median(times),
                          infer_s=statistics.median(infer), peak_mb=peak,
                          above_import_mb=peak - import_mb, history_mb=history / 2**20,
                          gflops=flops.get_total_flops() / 1e9, device=device)))


def gather_weights(args):
    """CBN layers, compensated convs, their weights' size, and the median time of one ``torch.cat``
    of those weights (what a step compensating all layers at once from one flat buffer would add)."""
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    device = _device()
    model, _, train_step = prepare(args, 'cbn-all', device)
    train_step()
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    weights = [m._producer.last[0].weight.reshape(-1) for m in layers
               if m._producer.last is not None and m._producer.last[0] is not None]
    times = [_timed(lambda: torch.cat(weights), device)
             for _ in range(args.warmup + args.repeats * 5)][args.warmup:]
    row = dict(cbn_layers=len(layers), compensated=len(weights),
               floats=sum(w.numel() for w in weights), gather_ms=1e3 * statistics.median(times),
               device=device)
    print(f'{row["cbn_layers"]} CBN layers, {row["compensated"]} bound to a trainable conv, '
          f'{row["floats"] / 1e6:.1f} M weights; gathering them into one tensor: '
          f'{row["gather_ms"]:.2f} ms (median of {args.repeats * 5}, {device}, '
          f'{torch.get_num_threads()} threads)')
    return row


def _run(cmd, variant, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f'variant {variant} failed')
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', choices=['faster', 'mask'], default='faster')
    parser.add_argument('--size', type=int, nargs=2, default=[320, 448])
    parser.add_argument('--images', type=int, default=2)
    parser.add_argument('--rois', type=int, default=128, help='RoIs sampled per image for the heads')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps before the timed ones')
    parser.add_argument('--skip-flops', action='store_true')
    parser.add_argument('--skip-inference', action='store_true')
    parser.add_argument('--no-memory', action='store_true',
                        help='CPU: take the peak RSS from the timing run (no separate memory run)')
    parser.add_argument('--amp', action='store_true')
    parser.add_argument('--interleave', action='store_true',
                        help='time the training steps of all variants in one process, round-robin '
                        '(memory, FLOPs and inference still come from one process per variant)')
    parser.add_argument('--gather-weights', action='store_true',
                        help='only time gathering the compensated convs\' weights into one tensor')
    parser.add_argument('--variant', help=argparse.SUPPRESS)
    parser.add_argument('--run-interleaved', action='store_true', help=argparse.SUPPRESS)
    record.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.gather_weights:
        return gather_weights(args)
    if args.run_interleaved:
        return run_interleaved(args)
    if args.variant:
        return run_one(args)
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, '--variant', variant, '--arch', args.arch, '--size',
               *map(str, args.size), '--images', str(args.images), '--rois', str(args.rois),
               # with --interleave the step times come from the interleaved run below
               '--repeats', str(1 if args.interleave else args.repeats),
               '--warmup', str(1 if args.interleave else args.warmup)] + [
                   flag for flag, on in (('--amp', args.amp), ('--skip-flops', args.skip_flops),
                                         ('--skip-inference', args.skip_inference)) if on]
        rows.append(_run(cmd, variant, os.environ))
        if not torch.cuda.is_available() and not args.no_memory:
            # Peak memory in its own process: with every allocation above 64 KiB mapped separately,
            # freed tensors leave the RSS, so its peak follows the live tensors (this slows allocation
            # down, so the timings come from the run above, with glibc's default behaviour).
            memory_cmd = cmd[:cmd.index('--repeats')] + [
                '--repeats', '1', '--warmup', '1', '--skip-flops', '--skip-inference']
            memory = _run(memory_cmd, variant, dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536'))
            rows[-1].update(peak_mb=memory['peak_mb'], above_import_mb=memory['above_import_mb'])
        print(f'# {variant}: {rows[-1]}', flush=True)
    if args.interleave:
        cmd = [sys.executable, __file__, '--run-interleaved', '--variants', *args.variants, '--arch',
               args.arch, '--size', *map(str, args.size), '--images', str(args.images), '--rois',
               str(args.rois), '--repeats', str(args.repeats), '--warmup', str(args.warmup)] + (
                   ['--amp'] if args.amp else [])
        medians = _run(cmd, 'interleaved', os.environ)
        for r in rows:
            r['train_s'] = medians[r['variant']]
        print(f'# interleaved step times: {medians}', flush=True)
    base = rows[0]
    lines = [f'{args.arch} R-CNN R50-FPN 4conv1fc, {args.images} x {args.size[0]}x{args.size[1]}, '
             f'{args.rois} RoIs/image, device {base["device"]}{", AMP" if args.amp else ""}; '
             f'ratios vs {base["variant"]} in the same run'
             f'{"; step times interleaved in one process" if args.interleave else ""}', '',
             '| variant | train step s | ratio | peak MB | ratio | peak above imports MB | ratio | '
             'CBN history MB | GFLOPs/step | ratio | inference s | ratio |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        lines.append(
            f'| {r["variant"]} | {r["train_s"]:.3f} | {r["train_s"] / base["train_s"]:.2f} | '
            f'{r["peak_mb"]:.0f} | {r["peak_mb"] / base["peak_mb"]:.2f} | '
            f'{r["above_import_mb"]:.0f} | {r["above_import_mb"] / base["above_import_mb"]:.2f} | '
            f'{r["history_mb"]:.0f} | {r["gflops"]:.1f} | '
            f'{r["gflops"] / base["gflops"] if base["gflops"] else float("nan"):.2f} | '
            f'{r["infer_s"]:.3f} | {r["infer_s"] / base["infer_s"]:.2f} |')
    print('\n' + '\n'.join(lines))
    record.record(args, '\n'.join(lines), __file__, argv)


if __name__ == '__main__':
    main()
