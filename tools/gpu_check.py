"""GPU acceptance check for CBN: correctness on CUDA against a float64 CPU reference, AMP and
half-precision modules, no host synchronisation in steady state, the step-time / peak-memory cost
of CBN against BN on a ResNet-50 + FPN, in fp32 and AMP, eager and under ``torch.compile`` (BN and
CBN; fp32, ``--compile-amp`` adds AMP), and the per-layer fixed cost (many tiny layers, where each
operation's launch is what is left: ``tools/benchmarks/benchmark_fixed_cost.py``). Beside every
step time, the host's CPU time per step (what the Python thread spends issuing the step's work,
synchronisations excluded) and its share of the step: near 1, the step is host-bound. Compiled rows
report the first steps' wall time (compilation included) apart from the steady-state step time.
Writes one Markdown report (and its JSON), rewritten after every section, so that a run stopped
from outside leaves what it measured, marked incomplete; the compiled rows, which take the longest,
come last, and ``--time-limit`` starts no section after that many seconds.

Needs only torch (>= 2.4) with CUDA, plus torchvision for the model rows: no mmcv/mmengine/mmdet, no
network. About 2-4 minutes on one modern GPU, plus the compilation of the compiled rows (minutes;
``--skip-compiled`` leaves them out).

    python tools/gpu_check.py --out DIR [--device cuda] [--quick] [--image-size 800 1216]
        [--images 2] [--steps 20] [--skip-models] [--skip-fixed-cost] [--skip-compiled]
        [--compile-backend inductor] [--compile-amp] [--time-limit SECONDS]

Without CUDA (``--device cuda`` on a machine that has none) it writes a report saying so and exits 0.
``--device cpu --quick`` runs every check that does not need CUDA (CI does). Exit code 1 when a check
fails. ``--quick`` leaves the compiled rows out (compiling takes minutes on a CPU).
"""
import argparse
import contextlib
import copy
import json
import os
import os.path as osp
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN, convert_to_cbn  # noqa: E402
from cbn_mmdet.models import iteration_clock  # noqa: E402
from cbn_mmdet.ops import fused, statistics as S  # noqa: E402

WINDOW = 3


# ---------------------------------------------------------------------------- small models
def conv_norm_net(affine=True, c=16):
    """Two conv + CBN stages (a 3×3 and an expanding 1×1), as in a bottleneck."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, c, 3, padding=1, bias=False), CBN(c, window=WINDOW, affine=affine),
                         nn.ReLU(), nn.Conv2d(c, 4 * c, 1, bias=False),
                         CBN(4 * c, window=WINDOW, affine=affine))


def _batches(steps, shape=(2, 8, 24, 20), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=gen, dtype=torch.float64) + 0.3,
             torch.randn((shape[0], 64) + shape[2:], generator=gen, dtype=torch.float64))
            for _ in range(steps)]


def _train_steps(model, data, device, dtype, channels_last=False, autocast=None):
    """SGD steps; per step the output, input gradient and parameter gradients (on the CPU, float64)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    record = []
    for x, g in data:
        x = x.detach().to(device=device, dtype=dtype, copy=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast or torch.float16,
                            enabled=autocast is not None):
            out = model(x)
        opt.zero_grad()
        (out * g.to(device=device, dtype=out.dtype)).sum().backward()
        record.append([out.detach().double().cpu(), x.grad.double().cpu()]
                      + [p.grad.double().cpu() for p in model.parameters() if p.grad is not None])
        opt.step()
    return record


def _state(model):
    return {k: v.double().cpu() for k, v in model.state_dict().items() if v.is_floating_point()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------- checks
def check_reference(device, steps):
    """The device in float32 (TF32 off) against the CPU in float64: outputs, gradients, history and
    running statistics after every step, NCHW and channels_last, affine on and off."""
    rows = []
    for affine in (True, False):
        for channels_last in (False, True):
            data = _batches(steps)
            ref = conv_norm_net(affine).double()
            test = copy.deepcopy(ref).float().to(device)
            ref_rec = _train_steps(ref, data, 'cpu', torch.float64, channels_last)
            test_rec = _train_steps(test, data, device, torch.float32, channels_last)
            err = max(_rel(a, b) for sa, sb in zip(test_rec, ref_rec) for a, b in zip(sa, sb))
            ref_state, test_state = _state(ref), _state(test)
            err_state = max(_rel(test_state[k], v) for k, v in ref_state.items())
            ok = err < 1e-4 and err_state < 1e-4 and test[1].history_length == WINDOW - 1
            rows.append(dict(check=f'{device} float32 vs CPU float64, affine={affine}, '
                             f'{"channels_last" if channels_last else "NCHW"}',
                             ok=ok, measured=f'outputs/grads {err:.1e}, history/running {err_state:.1e}',
                             limit='< 1e-4 relative'))
    return rows


def autocast_correction_error(device, dtype):
    """Error of CBN's Taylor correction under autocast against a float64 evaluation of the same
    formula from the same (reduced-precision) conv input and output, relative to the correction."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3, padding=1).to(device)
    norm = CBN(64, window=2).to(device)
    captured = []
    conv.register_forward_hook(lambda m, inp, out: captured.append(out.detach()))
    gen = torch.Generator().manual_seed(3)
    xs = [(torch.randn(2, 32, 24, 24, generator=gen).relu() + 0.5).to(device) for _ in range(2)]
    w_old, b_old = conv.weight.detach().cpu().clone(), conv.bias.detach().cpu().clone()
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        norm(conv(xs[0])).float().square().mean().backward()
    with torch.no_grad():  # an optimizer step of about 2 % of the weights
        conv.weight.add_(0.02 * conv.weight.abs().mean() * torch.randn_like(conv.weight))
        conv.bias.add_(0.02 * conv.bias.abs().mean())
    iteration_clock.next_iteration()
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        norm(conv(xs[1]))
    window = norm.past_window()
    slot = int(window['valid'].nonzero()[0, 0])
    got_mean = (window['mean_compensated'] - window['mean'])[slot].double().cpu()
    got_var = (window['var_compensated'] - window['var'])[slot].double().cpu()
    want_mean, want_var = float64_correction(
        xs[0].to(dtype).cpu(), captured[0].cpu(), (w_old, b_old),
        (conv.weight.detach().cpu(), conv.bias.detach().cpu()))
    return max(_rel(got_mean, want_mean), _rel(got_var, want_var))


def float64_correction(conv_input, conv_output, old, new):
    """Eqs. 7-8's correction ``(Δμ, Δvar)`` of a 3×3, padding-1 conv's output statistics from the
    ``old`` to the ``new`` ``(weight, bias)``, evaluated in float64 from the given input and output."""
    y, x = conv_input.double(), conv_output.double()
    (w0, b0), (w1, b1) = [tuple(t.double() for t in pair) for pair in (old, new)]
    mean, var = S.batch_moments(x)
    patch = S.patch_mean(y, (3, 3), x.shape[2:], (1, 1), (1, 1), (1, 1))
    var_grad = S.variance_weight_gradient(y, x, mean, patch, w0, (1, 1), (1, 1), (1, 1), 1)
    ref_mean, ref_var = S.compensate_history(
        mean[None], var[None], S.linear_term_mean(patch[None], w0, b0, 1),
        S.linear_term_var(var_grad[None], w0), patch[None], var_grad[None],
        torch.ones(1, dtype=torch.float64), w1, b1, 1)
    return ref_mean[0] - mean, ref_var[0] - var


def check_autocast(device):
    dtypes = [torch.bfloat16] + ([torch.float16] if torch.device(device).type == 'cuda' else [])
    rows = []
    for dtype in dtypes:
        err = autocast_correction_error(device, dtype)
        rows.append(dict(check=f'{device} autocast {str(dtype)[6:]}: Taylor correction vs float64',
                         ok=err < 1e-3, measured=f'{err:.1e} of the correction',
                         limit='< 1e-3'))
    return rows


def half_module_error(make, device, dtype, steps):
    """Largest relative error of a ``dtype`` copy of ``make()`` against the float32 model, per step,
    over outputs and gradients; the copy takes the float32 weights before each step (so errors do not
    compound), its own state (running statistics, CBN history) evolves by itself."""
    ref = make()
    model = copy.deepcopy(ref).to(device=device, dtype=dtype)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    worst = 0.0
    for x, g in _batches(steps):
        with torch.no_grad():
            for p, p_ref in zip(model.parameters(), ref.parameters()):
                p.copy_(p_ref)
        outs = []
        for net, dev, dt in ((ref, 'cpu', torch.float32), (model, device, dtype)):
            xin = x.to(device=dev, dtype=dt).requires_grad_(True)
            out = net(xin)
            net.zero_grad()
            (out * g.to(device=dev, dtype=dt)).sum().backward()
            outs.append([out.detach().double().cpu(), xin.grad.double().cpu()]
                        + [p.grad.double().cpu() for p in net.parameters()])
        worst = max([worst] + [_rel(a, b) for a, b in zip(outs[1], outs[0])])
        if not all(torch.isfinite(t).all() for t in outs[1]):
            return float('inf'), model
        opt.step()
    return worst, model


def check_half_module(device, steps):
    """A ``.to(float16/bfloat16)`` CBN model against float32, beside BN's own error the same way."""
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        err, model = half_module_error(conv_norm_net, device, dtype, steps)
        bn_err, _ = half_module_error(lambda: _with_bn(conv_norm_net()), device, dtype, steps)
        history_fp32 = all(m.history.get('history_var').dtype == torch.float32
                           for m in model.modules() if isinstance(m, CBN))
        rows.append(dict(check=f'{device} .to({str(dtype)[6:]}) module (history kept float32)',
                         ok=history_fp32 and err <= 3 * bn_err + 1e-3,
                         measured=f'error vs float32 {err:.1e} (BN: {bn_err:.1e})',
                         limit='≤ 3 × BN\'s + 1e-3, finite'))
    return rows


def _with_bn(model):
    for name, m in list(model.named_children()):
        if isinstance(m, CBN):
            bn = nn.BatchNorm2d(m.num_features, affine=m.affine)
            bn.load_state_dict(m.state_dict())
            setattr(model, name, bn)
    return model


def check_no_sync(device, steps):
    """Steady-state training steps with ``torch.cuda.set_sync_debug_mode('error')``."""
    model = conv_norm_net().to(device)
    data = _batches(steps + 2)
    _train_steps(model, data[:2], device, torch.float32)  # allocates the history
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        _train_steps_no_readback(model, data[2:], device)
        ok, measured = True, 'no synchronising call'
    except RuntimeError as err:
        ok, measured = False, str(err).splitlines()[0][:120]
    finally:
        torch.cuda.set_sync_debug_mode('default')
    return [dict(check=f'{device} training steps under set_sync_debug_mode("error")', ok=ok,
                 measured=measured, limit='no host sync')]


def _train_steps_no_readback(model, data, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    xs = [(x.float().to(device, non_blocking=True), g.float().to(device, non_blocking=True))
          for x, g in data]
    torch.cuda.synchronize()
    for x, g in xs:
        out = model(x)
        opt.zero_grad()
        (out * g).sum().backward()
        opt.step()


# ---------------------------------------------------------------------------- cost
#: the CBN variants of the model rows: their options beside ``window=4``
CBN_VARIANTS = {'naive': dict(compensate=False), 'cbn': {},
                'cbn-bf16-product': dict(var_grad_dtype='bfloat16')}


def resnet50_fpn(norm):
    """torchvision's ResNet-50 backbone with an FPN (BN in both), ``norm`` 'bn' or one of
    :data:`CBN_VARIANTS`."""
    from torchvision.models import resnet50
    from torchvision.ops import FeaturePyramidNetwork

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = resnet50()
            self.fpn = FeaturePyramidNetwork([256, 512, 1024, 2048], 256, norm_layer=nn.BatchNorm2d)

        def forward(self, x):
            b = self.body
            x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
            feats, out = {}, x
            for i, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4)):
                out = layer(out)
                feats[str(i)] = out
            return self.fpn(feats)

    torch.manual_seed(0)
    model = Detector()
    if norm != 'bn':
        convert_to_cbn(model, window=4, **CBN_VARIANTS[norm])
    return model


def training_flops(build, norm, device, images, size):
    """FLOPs of one float32 training step after a first one (torch's counter with CBN's products:
    ``tools/benchmarks/flops.py``)."""
    sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), 'benchmarks'))
    from flops import counter
    model = build(norm).to(device).train()
    x = torch.randn(images, 3, *size, device=device)
    flops = counter()
    for step in (contextlib.nullcontext(), flops):
        with step:
            sum(f.float().square().mean() for f in model(x).values()).backward()
        model.zero_grad(set_to_none=True)
        iteration_clock.next_iteration()
    return flops.get_total_flops()


def _unique_graphs():
    """Graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def measure_step(build, norm, device, amp, images, size, steps, warmup, compile_backend=None):
    """One variant's training step (forward + backward + SGD): median wall time of the synchronised
    step, median host time of the step, peak memory, the first (warm-up) steps' wall time, the number
    of CBN layers and, compiled (``torch.compile(model, backend=compile_backend)``), the graphs
    dynamo compiled during warm-up and during the timed steps (there should be none).

    The host time is the Python thread's CPU time (``time.thread_time``) spent in the step up to its
    synchronisation: on CUDA what the host spends issuing the work. Under AMP the GradScaler reads
    its inf check back before the optimizer step (a synchronisation); the step synchronises just
    before it, outside the host time, so the wait does not count as host work (the device waits
    there anyway: the wall time is the same)."""
    model = build(norm).to(device).train()
    layers = sum(isinstance(m, CBN) for m in model.modules())
    forward = model
    if compile_backend:
        torch._dynamo.reset()  # the variants share their code: each compiles its own graphs
        forward = torch.compile(model, backend=compile_backend)
        warmup = max(warmup, 3)  # CBN k = 4: the first iteration's graph, then the steady state's
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    scaler = torch.amp.GradScaler(device=torch.device(device).type, enabled=amp)
    x = torch.randn(images, 3, *size, device=device)
    cuda = torch.device(device).type == 'cuda'
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, host_times, first_steps, graphs = [], [], 0.0, [_unique_graphs()]
    for i in range(warmup + steps):
        if i == warmup:
            graphs.append(_unique_graphs())
        start, cpu = time.perf_counter(), time.thread_time()
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.float16, enabled=amp):
            loss = sum(f.float().square().mean() for f in forward(x).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if amp:
            scaler.unscale_(opt)  # (what scaler.step would do first)
        host = time.thread_time() - cpu
        if amp and cuda:
            torch.cuda.synchronize()  # scaler.step's inf check reads back: wait here, not counted
        cpu = time.thread_time()
        scaler.step(opt)
        scaler.update()
        host += time.thread_time() - cpu
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        if i >= warmup:
            times.append(wall)
            host_times.append(host)
        else:
            first_steps += wall
    graphs.append(_unique_graphs())
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else float('nan')
    del model, forward, opt, x
    if compile_backend:
        torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return dict(step_s=statistics.median(times), host_s=statistics.median(host_times), peak_mb=peak,
                first_steps_s=first_steps, warmup_steps=warmup, cbn_layers=layers,
                graphs=graphs[1] - graphs[0] if compile_backend else None,
                graphs_timed=graphs[2] - graphs[1] if compile_backend else None)


def benchmark(build, device, images, size, steps, warmup, amp_modes, compile_backend=None,
              norms=('bn', 'naive', 'cbn'), on_row=None, rows_so_far=()):
    """Rows of :func:`measure_step` per precision of ``amp_modes`` and norm of ``norms`` (eager, or
    compiled with ``compile_backend``), with time and memory as ratios to the first norm's (BN's).
    ``on_row(rows)`` after each row, with ``rows_so_far`` before this call's rows."""
    rows = []
    # the FLOP ratios of the eager float32 rows (the same arithmetic in the other modes)
    flops = ({norm: training_flops(build, norm, device, images, size) for norm in norms}
             if not compile_backend and False in amp_modes else {})
    for amp in amp_modes:
        base = None
        for norm in norms:
            m = measure_step(build, norm, device, amp, images, size, steps, warmup, compile_backend)
            base = base or m
            rows.append(dict(precision='AMP fp16' if amp else 'fp32',
                             mode='compiled' if compile_backend else 'eager', norm=norm,
                             step_ms=1e3 * m['step_s'], host_ms=1e3 * m['host_s'],
                             host_ratio=m['host_s'] / m['step_s'], peak_mb=m['peak_mb'],
                             time_ratio=m['step_s'] / base['step_s'],
                             memory_ratio=m['peak_mb'] / base['peak_mb'],
                             first_steps_s=m['first_steps_s'], warmup_steps=m['warmup_steps'],
                             graphs=m['graphs'], graphs_timed=m['graphs_timed'],
                             cbn_layers=m['cbn_layers'],
                             flop_ratio=flops[norm] / flops[norms[0]] if flops and not amp
                             else None))
            if on_row is not None:
                on_row(list(rows_so_far) + rows)
    return rows


@contextlib.contextmanager
def recording_host_time(module):
    """While active, ``module.step(model, opt, x)`` (``benchmark_fixed_cost.step``) also records the
    thread's CPU time of each step up to its ``torch.cuda.synchronize()`` (or to its end, on the CPU):
    yields ``{id(model): [seconds per step, in call order]}``, the models in the order first stepped."""
    step, synchronize = module.step, torch.cuda.synchronize
    records, synced = {}, []

    def noting_synchronize(*args, **kwargs):
        synced.append(time.thread_time())
        return synchronize(*args, **kwargs)

    def recording_step(model, opt, x):
        synced.clear()
        start = time.thread_time()
        step(model, opt, x)
        records.setdefault(id(model), []).append((synced[0] if synced else time.thread_time()) - start)

    module.step, torch.cuda.synchronize = recording_step, noting_synchronize
    try:
        yield records
    finally:
        module.step, torch.cuda.synchronize = step, synchronize


def fixed_cost(device, steps, warmup):
    """Per-layer fixed cost rows of ``benchmark_fixed_cost.py`` on ``device`` (BN, Naive CBN, CBN),
    with the host time of the same steps."""
    sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), 'benchmarks'))
    import benchmark_fixed_cost
    args = benchmark_fixed_cost.parse_args(['--device', device, '--steps', str(steps), '--warmup',
                                            str(warmup), '--threads', str(torch.get_num_threads())])
    with recording_host_time(benchmark_fixed_cost) as host:
        rows = benchmark_fixed_cost.run(args)
    # each variant is stepped first in its warm-up, in the order of ``rows``; then the timed
    # round-robin's ``steps`` steps (then untimed ones: counting operations)
    assert len(host) == len(rows), (len(host), list(rows))
    host_ms = {name: 1e3 * statistics.median(records[warmup:warmup + steps])
               for name, records in zip(rows, host.values())}
    base = rows['bn']['step_ms']
    return [dict(norm=name, ms_per_layer=r['step_ms'] / args.layers,
                 above_bn_ms=(r['step_ms'] - base) / args.layers, ops_per_layer=r['ops'] / args.layers,
                 host_ms_per_layer=host_ms[name] / args.layers, host_ratio=host_ms[name] / r['step_ms'])
            for name, r in rows.items()]


def launch_share(cost, fixed, layers):
    """Per precision: how much of the model's CBN − BN step difference (eager) ``layers`` × the
    per-layer fixed cost would explain (a share near 1 or above: the step is bound by the layer's
    operations, and batching them across layers would pay)."""
    above = {r['norm']: r['above_bn_ms'] for r in fixed}
    cost = [r for r in cost if r.get('mode', 'eager') == 'eager']
    lines = []
    for precision in dict.fromkeys(r['precision'] for r in cost):
        step = {r['norm']: r['step_ms'] for r in cost if r['precision'] == precision}
        diff = step['cbn'] - step['bn']
        lines.append(f'{precision}: CBN − BN = {diff:.1f} ms per step; {layers} CBN layers × '
                     f'{above["cbn"]:.3f} ms fixed cost = {layers * above["cbn"]:.1f} ms')
    return lines


# ---------------------------------------------------------------------------- report
def environment(device):
    env = dict(torch=torch.__version__, device=device, python=sys.version.split()[0])
    if torch.device(device).type == 'cuda':
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_precision=torch.get_float32_matmul_precision())
    # whether the fused CPU ops ran (off in this check: see run)
    env['fused_cpu_ops'] = fused.ops() is not None
    try:
        import torchvision
        env['torchvision'] = torchvision.__version__
    except Exception:  # noqa: BLE001  (an absent or broken torchvision only skips the model rows)
        env['torchvision'] = None
    return env


def _markdown_table(title, header, rows):
    """A titled Markdown table, as report lines."""
    return (['', title, '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
            + ['| ' + ' | '.join(row) + ' |' for row in rows])


def _graphs_cell(row):
    """Compiled rows: the graphs compiled in warm-up, and any compiled while timed (there should be
    none); eager rows: '-'."""
    if row.get('graphs') is None:
        return '-'
    return str(row['graphs']) + (f" (+{row['graphs_timed']} while timed)" if row['graphs_timed'] else '')


def write_report(out, env, checks, cost, notes, fixed=()):
    os.makedirs(out, exist_ok=True)
    lines = ['# CBN GPU acceptance check', '', ', '.join(f'{k}: {v}' for k, v in env.items()), '']
    lines += ['| check | result | measured | limit |', '|---|---|---|---|']
    lines += [f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r['measured']} | {r['limit']} |"
              for r in checks]
    if cost:
        lines += _markdown_table(
            'ResNet-50 + FPN (torchvision), CBN k = 4 in every norm layer; ratios against BN of the '
            'same precision and mode in the same run; host = the host\'s CPU time per step:',
            ('precision', 'mode', 'norm', 'step (ms)', 'host (ms)', 'host / step', 'peak (MiB)',
             'step / BN', 'FLOPs / BN', 'memory / BN', 'first steps', 'first steps (s)', 'graphs'),
            [(r['precision'], r['mode'], r['norm'], f"{r['step_ms']:.1f}", f"{r['host_ms']:.1f}",
              f"{r['host_ratio']:.2f}", f"{r['peak_mb']:.0f}", f"{r['time_ratio']:.2f}",
              '-' if r.get('flop_ratio') is None else f"{r['flop_ratio']:.2f}",
              f"{r['memory_ratio']:.2f}", str(r['warmup_steps']), f"{r['first_steps_s']:.1f}",
              _graphs_cell(r)) for r in cost])
    if fixed:
        lines += _markdown_table(
            'Per-layer fixed cost (`tools/benchmarks/benchmark_fixed_cost.py`: 20 × conv 16→16 3×3 + '
            'norm + ReLU, input 2×16×8×8, on CUDA each step synchronised), fp32:',
            ('norm', 'ms per layer and step', 'above BN', 'host ms per layer and step', 'host / step',
             'operations per layer and step'),
            [(r['norm'], f"{r['ms_per_layer']:.3f}", f"{r['above_bn_ms']:+.3f}",
              f"{r['host_ms_per_layer']:.3f}", f"{r['host_ratio']:.2f}", f"{r['ops_per_layer']:.0f}")
             for r in fixed])
    lines += [''] + [f'* {n}' for n in notes]
    text = '\n'.join(lines) + '\n'
    with open(osp.join(out, 'gpu_check.md'), 'w') as f:
        f.write(text)
    with open(osp.join(out, 'gpu_check.json'), 'w') as f:
        json.dump(dict(environment=env, checks=checks, cost=cost, fixed_cost=list(fixed),
                       notes=notes), f, indent=1, default=str)
    return text


HOST_TIME_NOTE = (
    'host = the Python thread\'s CPU time per step (`time.thread_time`, median), the waits at '
    'synchronisations left out (the step\'s end; under AMP the GradScaler\'s inf check); on CUDA '
    'what the host spends issuing the work: host / step near 1 = host-bound (or the device\'s launch '
    'queue was full, a launch waiting for room counts as host time), well below 1 = device-bound. '
    'On the CPU the host does the work, the main thread\'s share of it')


def compiled_rows_backend(args):
    """``(backend, None)`` where the compiled rows run, else ``(None, why not)``."""
    if args.skip_compiled:
        return None, '--skip-compiled'
    if args.quick:
        return None, '--quick (compiling takes minutes on a CPU)'
    return args.compile_backend, None


def run(args):
    # no C++ build on a GPU machine's clock: the CPU reference runs the Python path, which is what
    # the fused CPU ops are tested against (and CUDA tensors take it either way)
    with fused.disabled():
        return _run(args)


class Report:
    """What the run has measured so far, rewritten to ``gpu_check.md`` / ``.json`` after every section:
    a run stopped by its time limit (a lent GPU machine's command limit) still leaves what it
    measured, marked incomplete."""

    def __init__(self, out, env, time_limit=None):
        self.out, self.env, self.time_limit = out, env, time_limit
        self.checks, self.cost, self.fixed, self.notes = [], [], [], []
        self.started = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.started

    def may_start(self, section):
        """Whether ``section`` starts within ``--time-limit``; a note says so where it does not."""
        if self.time_limit is None or self.elapsed() < self.time_limit:
            return True
        self.notes.append(f'{section} skipped: --time-limit {self.time_limit:g} s reached after '
                          f'{self.elapsed():.0f} s')
        return False

    def save(self, running=None, cost=None):
        """The report as it stands (``cost``: the model rows including those of a section still
        running); ``running`` names the section under way."""
        notes = self.notes + ([f'incomplete: stopped while running {running} ({self.elapsed():.0f} s '
                               'in); the sections after it did not run'] if running else [])
        return write_report(self.out, self.env, self.checks, self.cost if cost is None else cost,
                            notes, self.fixed)


def _run(args):
    device = args.device
    if torch.device(device).type == 'cuda' and not torch.cuda.is_available():
        text = write_report(args.out, environment('cpu'), [], [],
                            ['skipped: CUDA is not available on this machine'])
        print(text)
        return 0
    if torch.device(device).type == 'cuda':
        # exactness checks compare against float64: no TF32 rounding of the convolutions there
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    report = Report(args.out, environment(device), args.time_limit)
    steps = 3 if args.quick else 5
    sections = [('reference', lambda: check_reference(device, steps)),
                ('autocast', lambda: check_autocast(device)),
                ('half', lambda: check_half_module(device, steps))]
    if torch.device(device).type == 'cuda':
        sections.append(('sync', lambda: check_no_sync(device, steps)))
    else:
        report.notes.append('host-sync check skipped: it needs CUDA (on CPU, '
                            'tests/test_models/test_cbn_precision.py checks that no tensor is read '
                            'back or made from Python data)')
    for name, section in sections:
        report.save(running=f'the {name} checks')
        try:
            report.checks += section()
        except Exception as err:  # noqa: BLE001  (report the failure, run the other checks)
            report.checks.append(dict(check=name, ok=False,
                                      measured=f'{type(err).__name__}: {err}'[:200], limit='runs'))
            traceback.print_exc()
    if torch.device(device).type == 'cuda':
        torch.backends.cudnn.allow_tf32 = True  # the defaults users train with
        torch.backends.cudnn.benchmark = True
    build = None
    if not args.skip_models:
        try:
            import torchvision  # noqa: F401
            build = resnet50_fpn
        except Exception:  # noqa: BLE001
            report.notes.append('model rows skipped: torchvision is not installed')
    size = tuple(args.image_size)
    amp_modes = (False, True) if torch.device(device).type == 'cuda' else (False, )
    if build is not None and report.may_start('eager model rows'):
        report.save(running='the eager model rows')
        # the bfloat16 product where GPUs have bfloat16 units (a CPU's are tested elsewhere)
        cuda = torch.device(device).type == 'cuda'
        norms = ('bn', 'naive', 'cbn') + (('cbn-bf16-product', ) if cuda else ())
        report.cost += benchmark(build, device, args.images, size, args.steps, args.warmup,
                                 amp_modes, norms=norms, rows_so_far=report.cost,
                                 on_row=lambda rows: report.save('the eager model rows', rows))
        report.notes.append(f'{args.images} images of {size[0]}×{size[1]}, median of {args.steps} '
                            f'steps after {args.warmup} warm-up steps; loss = mean square of the '
                            'FPN outputs; naive = CBN without compensation; cbn-bf16-product = '
                            "var_grad_dtype='bfloat16'; FLOPs / BN of one float32 step, CBN's "
                            'products included (their FLOP ratio is the floor of an exact float32 '
                            'product)')
    # the per-layer fixed cost before the compiled rows: compiling takes the longest
    if not args.skip_fixed_cost and report.may_start('fixed-cost rows'):
        report.save(running='the fixed-cost rows')
        try:
            report.fixed = fixed_cost(device, 10 if args.quick else 100, 2 if args.quick else 10)
        except Exception as err:  # noqa: BLE001  (a cost measurement, not a check: report and go on)
            report.notes.append(f'fixed-cost rows failed: {type(err).__name__}: {err}'[:300])
            traceback.print_exc()
    if build is not None:
        backend, why_not = compiled_rows_backend(args)
        if backend is None:
            report.notes.append(f'compiled rows skipped: {why_not}')
        elif report.may_start('compiled model rows'):
            report.save(running='the compiled model rows')
            try:
                report.cost += benchmark(build, device, args.images, size, args.steps, args.warmup,
                                         amp_modes if args.compile_amp else (False, ), backend,
                                         norms=('bn', 'cbn'), rows_so_far=report.cost,
                                         on_row=lambda rows: report.save('the compiled model rows',
                                                                         rows))
                report.notes.append(
                    f'compiled: `torch.compile(model, backend={backend!r})` (the loss and the '
                    'optimizer step eager), after `torch._dynamo.reset()`; first steps = the '
                    'warm-up steps\' wall time, compilation included (at least 3: CBN k = 4 '
                    'compiles the first iteration and the steady state); graphs = dynamo\'s '
                    'unique graphs compiled in them')
            except Exception as err:  # noqa: BLE001  (a cost measurement: report and go on)
                report.notes.append(f'compiled rows failed: {type(err).__name__}: {err}'[:300])
                traceback.print_exc()
    if report.cost or report.fixed:
        report.notes.append(HOST_TIME_NOTE)
    if report.fixed and report.cost:
        report.notes += launch_share(report.cost, report.fixed,
                                     max(r['cbn_layers'] for r in report.cost))
    print(report.save())
    return 0 if all(r['ok'] for r in report.checks) else 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True, help='folder for gpu_check.md / gpu_check.json')
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--quick', action='store_true', help='fewer steps (CI on CPU)')
    parser.add_argument('--skip-models', action='store_true', help='no ResNet-50 + FPN cost rows')
    parser.add_argument('--skip-fixed-cost', action='store_true', help='no per-layer fixed-cost rows')
    parser.add_argument('--skip-compiled', action='store_true',
                        help='no torch.compile model rows (--quick leaves them out too)')
    parser.add_argument('--compile-backend', default='inductor',
                        help='torch.compile backend of the compiled rows')
    parser.add_argument('--compile-amp', action='store_true',
                        help='compiled rows in AMP too (on CUDA; more compilation)')
    parser.add_argument('--image-size', type=int, nargs=2, default=(800, 1216))
    parser.add_argument('--images', type=int, default=2)
    parser.add_argument('--steps', type=int, default=20)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--time-limit', type=float, default=None, metavar='SECONDS',
                        help='start no further section after this many seconds (the report says '
                        'which were skipped); the report is rewritten after every section either way')
    args = parser.parse_args(argv)
    if args.time_limit is not None and not args.time_limit >= 0:
        parser.error(f'--time-limit must be a number of seconds, 0 or more; got {args.time_limit}')
    return args


if __name__ == '__main__':
    sys.exit(run(parse_args()))
