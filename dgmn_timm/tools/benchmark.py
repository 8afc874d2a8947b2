#!/usr/bin/env python3
""" Speed and memory of the models and layers of this package, each against its peer in the same process.

    python -m dgmn_timm.benchmark                                   # DGMN2 variants and timm peers, CPU
    python -m dgmn_timm.benchmark --models dgmn2_tiny,pvt_v2_b1 --batch-size 8 --iters 20
    python -m dgmn_timm.benchmark --models dgmn2_tiny,pvt_v2_b1 --sweep 224,512,1024 --plot sweep.png
    python -m dgmn_timm.benchmark --models dgmn2_tiny,pvt_v2_b1 --onnx       # ONNX Runtime (exportable=True)
    python -m dgmn_timm.benchmark --device cuda --amp --compile --channels-last
    python -m dgmn_timm.benchmark repgraph                          # RepGraph vs non-local, the paper's Table 2
    python -m dgmn_timm.benchmark cdgc                              # CDGC head peak memory against M

What is measured (the first argument, default ``models``):

- ``models``: timm models by name (``--models``; DGMN2, the DGMN / RepGraph ResNets and any timm
  peer). Inference is a forward pass under ``torch.inference_mode``; a training step is forward,
  ``mean()`` loss, backward and an SGD step; ``--onnx`` adds each model exported with
  ``exportable=True`` (``torch.onnx.export``) and run by ONNX Runtime on the CPU with ``--threads``
  threads. Ratios are taken against ``--reference`` (default pvt_v2_b1). Peak memory is the tensor
  memory of one inference pass. ``--sweep`` adds inference time and peak memory against input size.
- ``repgraph``: the layers ``NonLocal2d`` (``F.scaled_dot_product_attention``), bottleneck and
  simple ``RepGraph`` on one feature map (default the paper's Table 2 setting: 256 x 128, C = 2048,
  C' = 256, S = 9, batch 1; ``--img-size`` is the map's size here); ratios against the non-local
  block. Peak memory of RepGraph at the map and at twice its height and width, and of the plain
  non-local block (which holds its N x N weights) at ``--nl-memory-div`` fractions of it.
- ``cdgc``: peak memory of one forward + backward of the CDGC layer for each number of classes M
  (default a 97 x 97 map, C = 512, M = 1 2 4 8 19), next to the M x N x N adjacency of the dense
  form (computed, never built). ``--limit-gb`` makes the command exit 1 above a limit.

Method (``dgmn_timm.tools.benchmarking``): every candidate runs one step in turn, round after
round (interleaved), so that load changes on a shared machine hit all alike; warm-up rounds are
discarded and medians compared. ``--output FILE`` writes everything as JSON.
"""
import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

import timm

from dgmn_timm.layers import CDGC, NonLocal2d, RepGraph
from dgmn_timm.tools.benchmarking import medians, peak_memory, ratios, time_interleaved
from dgmn_timm.tools.cli import HelpFormatter, UsageError, check_model_name, check_positive, run_cli, set_threads
from dgmn_timm.tools.engine import resolve_device

DEFAULT_MODELS = ('dgmn2_tiny,dgmn2_small,dgmn2_medium,dgmn2_large,'
                  'pvt_v2_b1,pvt_v2_b2,swin_tiny_patch4_window7_224,resnet50')
SUITES = ('models', 'repgraph', 'cdgc')
MB = 2 ** 20
# per suite: batch size, map size (H, W), channels
SUITE_DEFAULTS = {'models': (8, (224, 224), None), 'repgraph': (1, (256, 128), 2048), 'cdgc': (1, (97, 97), 512)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m dgmn_timm.benchmark', description=__doc__.split('\n\n')[0].strip(),
                                epilog=__doc__.split('\n\n', 1)[1], formatter_class=HelpFormatter)
    p.add_argument('suite', nargs='?', default='models', choices=SUITES, help='what to measure')
    g = p.add_argument_group('shared')
    g.add_argument('--device', default='auto', help='cpu, cuda, cuda:N, or auto (cuda if available)')
    g.add_argument('--threads', type=int, default=None,
                   help='intra-op CPU threads (default: OMP_NUM_THREADS if set, else every core of this process)')
    g.add_argument('--batch-size', type=int, default=None, help='default: 8 (models), 1 (repgraph, cdgc)')
    g.add_argument('--img-size', type=int, nargs='+', default=None, metavar='SIZE',
                   help='input size, one side or H W (repgraph, cdgc: the feature map); default: 224 (models), '
                        '256 128 (repgraph), 97 97 (cdgc)')
    g.add_argument('--iters', type=int, default=None, help='measured rounds (default: 10 models, 3 repgraph)')
    g.add_argument('--warmup', type=int, default=None, help='discarded rounds (default: 2 models, 1 repgraph)')
    g.add_argument('--modes', default='infer,train', help='infer and/or train (models, repgraph)')
    g.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurements')
    g.add_argument('--output', default=None, metavar='FILE', help='write the results as JSON here')
    g.add_argument('--overwrite', action='store_true', help='replace an existing --output / --plot file')
    g.add_argument('--no-progress', action='store_true', help='no progress bar')
    g.add_argument('--seed', type=int, default=0, help='seed of the weights and inputs')
    m = p.add_argument_group('models')
    m.add_argument('--models', default=DEFAULT_MODELS, help='comma-separated timm model names')
    m.add_argument('--reference', default='pvt_v2_b1', help='ratios are taken against this model')
    m.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, --amp-dtype on CUDA)')
    m.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'],
                   help='autocast dtype of --amp on a GPU (bfloat16 on CPU)')
    m.add_argument('--compile', action='store_true', help='torch.compile every model')
    m.add_argument('--exportable', action='store_true',
                   help='build the models with exportable=True (the portable path every graph-level route takes)')
    m.add_argument('--channels-last', action='store_true', help='channels-last model and input')
    m.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                   help='wall time, or CPU time of the process (with --threads 1: robust to a shared machine)')
    m.add_argument('--onnx', action='store_true',
                   help='also time each model exported with exportable=True in ONNX Runtime (CPU, inference)')
    m.add_argument('--onnx-profile', type=int, default=0, metavar='N',
                   help='also --onnx, and print the N operator types that take most of ONNX Runtime\'s kernel time')
    m.add_argument('--sweep', default='', help='comma-separated input sizes for a time / memory sweep, e.g. 224,512,1024')
    m.add_argument('--sweep-batch-size', type=int, default=1, help='batch size of the sweep')
    m.add_argument('--sweep-iters', type=int, default=3, help='measured rounds per size of the sweep')
    m.add_argument('--plot', default=None, metavar='FILE', help='with --sweep: plot time and memory against size (PNG)')
    lay = p.add_argument_group('repgraph, cdgc')
    lay.add_argument('--dim', type=int, default=None, help='feature channels C (default: 2048 repgraph, 512 cdgc)')
    lay.add_argument('--fusion', default=None, choices=('sum', 'concat'), help='default: sum (repgraph), concat (cdgc)')
    lay.add_argument('--inner-dim', type=int, default=256, help="repgraph: C'")
    lay.add_argument('--num-nodes', type=int, default=9, help='repgraph: S')
    lay.add_argument('--nl-memory-div', type=int, default=4,
                     help='repgraph: the plain non-local memory is measured at map / div and map / (div / 2)')
    lay.add_argument('--classes', type=int, nargs='+', default=[1, 2, 4, 8, 19], help='cdgc: numbers of classes M')
    lay.add_argument('--split', choices=('even', 'one'), default='even',
                     help='cdgc: pixel i in class i mod M (even), or every pixel in one class (one)')
    lay.add_argument('--limit-gb', type=float, default=None, help='cdgc: exit with status 1 if a peak exceeds this')
    return p


def _check_args(args: argparse.Namespace):
    """ Every mistake that can be seen in the command line, before any work. """
    batch, size, dim = SUITE_DEFAULTS[args.suite]
    args.batch_size = batch if args.batch_size is None else args.batch_size
    if args.img_size is None:
        args.img_size = list(size)
    elif len(args.img_size) == 1:
        args.img_size = args.img_size * 2
    elif len(args.img_size) != 2:
        raise UsageError(f'--img-size takes one size or H W, got {len(args.img_size)} numbers')
    args.dim = dim if args.dim is None else args.dim
    args.fusion = args.fusion or ('concat' if args.suite == 'cdgc' else 'sum')
    args.iters = args.iters if args.iters is not None else (3 if args.suite == 'repgraph' else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.suite == 'repgraph' else 2)
    check_positive(args, 'batch_size', 'iters', 'sweep_batch_size', 'sweep_iters', 'inner_dim', 'num_nodes',
                   'nl_memory_div', 'threads')
    check_positive(args, 'warmup', 'onnx_profile', allow_zero=('warmup', 'onnx_profile'))
    if min(args.img_size) < 1 or (args.dim is not None and args.dim < 1) or min(args.classes) < 1:
        raise UsageError('--img-size, --dim and --classes must be positive')
    args.modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    if not args.modes or set(args.modes) - {'infer', 'train'}:
        raise UsageError(f'--modes takes infer and/or train, got {",".join(args.modes) or "nothing"}')
    try:
        args.sweep = [int(s) for s in args.sweep.split(',') if s.strip()]
    except ValueError:
        raise UsageError(f'--sweep takes comma-separated sizes, got {args.sweep!r}') from None
    if args.suite == 'models':
        args.models = [check_model_name(n.strip()) for n in args.models.split(',') if n.strip()]
        if not args.models:
            raise UsageError('--models names no model')
        if args.reference not in args.models:
            args.reference = args.models[0]
    if (args.onnx or args.onnx_profile) and args.suite != 'models':
        raise UsageError('--onnx measures models; it has no meaning for the layers')
    args.onnx = args.onnx or args.onnx_profile > 0
    if args.plot and not args.sweep:
        raise UsageError('--plot needs --sweep')
    for path in (args.output, args.plot):
        if path and os.path.lexists(path) and not args.overwrite:
            raise UsageError(f'{path} exists; give --overwrite to replace it, or another file')
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise UsageError(f'the folder of {path} does not exist')
    if args.onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError('--onnx needs onnxruntime (pip install onnxruntime)') from None


class _Progress:
    """ A tqdm bar, or nothing. """

    def __init__(self, total: int, disable: bool):
        self.bar = None
        if not disable:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc='benchmark', file=sys.stderr)

    def update(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# models


class Runner:
    """ One model with its input, optimizer and step functions. """

    def __init__(self, name: str, args, device: torch.device, img_size, batch_size: int):
        self.name = name
        self.device = device
        kwargs = {}
        if name.startswith('swin') and tuple(img_size) != (224, 224):
            kwargs['img_size'] = tuple(img_size)
        if args.exportable:
            kwargs['exportable'] = True
        self.model = timm.create_model(name, **kwargs).to(device)
        self.x = torch.randn(batch_size, 3, *img_size, device=device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        if args.compile:
            # inductor's C++ toolchain probe logs a CUDA-runtime warning on CPU-only machines
            logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
        self.fn = torch.compile(self.model) if args.compile else self.model
        self.opt = None
        if args.amp:
            dtype = torch.bfloat16 if device.type == 'cpu' else getattr(torch, args.amp_dtype)
            self.amp = lambda: torch.autocast(device.type, dtype=dtype)
        else:
            self.amp = nullcontext

    def infer(self):
        self.model.eval()
        with torch.inference_mode(), self.amp():
            self.fn(self.x)

    def train(self):
        if self.opt is None:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-6, momentum=0.9)
        self.model.train()
        with self.amp():
            loss = self.fn(self.x).float().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def peak_memory(self) -> float:
        """ Peak tensor memory of one inference pass, bytes. """
        return peak_memory(self.infer, self.device)

    def release(self):
        del self.model, self.fn, self.x, self.opt


def export_onnx(name: str, path: str, batch_size: int, img_size) -> None:
    """ ``name`` built with ``exportable=True`` (the portable path), exported to ONNX at a fixed input size. """
    model = timm.create_model(name, exportable=True).eval()
    x = torch.randn(batch_size, 3, *img_size)
    with torch.no_grad():
        torch.onnx.export(model, (x,), path, dynamo=True, optimize=True, verbose=False)


def onnx_session(path: str, threads: int, profile_prefix: Optional[str] = None):
    """ An ONNX Runtime CPU session with every graph optimisation and ``threads`` intra-op threads. """
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])


def onnx_op_profile(sess, feed, runs: int = 3) -> Dict[str, float]:
    """ Share of ONNX Runtime's kernel time per operator type over ``runs`` runs of a profiling session. """
    for _ in range(runs):
        sess.run(None, feed)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    os.remove(path)
    per_op: Dict[str, float] = {}
    for e in events:
        if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time'):
            op = e.get('args', {}).get('op_name', '?')
            per_op[op] = per_op.get(op, 0.) + e.get('dur', 0)
    total = sum(per_op.values()) or 1.
    return {op: t / total for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}


def _time_onnx(args, threads: int, progress) -> Dict[str, Any]:
    import numpy as np
    size = args.img_size
    out: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions, feeds = {}, {}
        for name in args.models:
            path = os.path.join(tmp, f'{name}.onnx')
            export_onnx(name, path, args.batch_size, size)
            sessions[name] = onnx_session(path, threads)
            x = np.random.default_rng(args.seed).standard_normal((args.batch_size, 3, *size), dtype=np.float32)
            feeds[name] = {sessions[name].get_inputs()[0].name: x}
        steps = {n: (lambda s=s, f=feeds[n]: s.run(None, f)) for n, s in sessions.items()}
        times = time_interleaved(steps, args.iters, args.warmup, on_step=progress.update)
        out['median_s'] = medians(times)
        out['ratio'] = ratios(out['median_s'], args.reference)
        if args.onnx_profile:
            out['profile'] = {}
            for name in args.models:
                sess = onnx_session(os.path.join(tmp, f'{name}.onnx'), threads, os.path.join(tmp, f'prof_{name}'))
                out['profile'][name] = onnx_op_profile(sess, feeds[name])
    return out


def run_models(args, device: torch.device, threads: int) -> Dict[str, Any]:
    names, ref = args.models, args.reference
    size = args.img_size
    total = len(names) * len(args.modes) * (args.warmup + args.iters)
    total += len(args.sweep) * len(names) * (1 + args.sweep_iters)
    total += len(names) * (args.warmup + args.iters) if args.onnx else 0
    progress = _Progress(total, args.no_progress)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    print(f'torch {torch.__version__}, timm {timm.__version__}, device {device}, threads {threads}, '
          f'{platform.processor() or platform.machine()}, amp={args.amp}, compile={args.compile}, '
          f'exportable={args.exportable}, channels_last={args.channels_last}, clock={args.clock}')
    result: Dict[str, Any] = dict(reference=ref, batch_size=args.batch_size, img_size=size, rows=[])

    runners = [Runner(n, args, device, size, args.batch_size) for n in names]
    med: Dict[str, Dict[str, float]] = {}
    for mode in args.modes:
        med[mode] = medians(time_interleaved({r.name: getattr(r, mode) for r in runners}, args.iters, args.warmup,
                                             device=device, on_step=progress.update, clock=clock))
    mem = {r.name: (None if args.no_memory else r.peak_memory()) for r in runners}
    for r in runners:
        r.release()
    del runners
    onnx = _time_onnx(args, threads, progress) if args.onnx else None
    routes = list(args.modes) + (['onnx'] if onnx else [])
    med.update({'onnx': onnx['median_s']} if onnx else {})

    print(f'\nbatch {args.batch_size}, {size[0]}x{size[1]}, median of {args.iters} interleaved rounds')
    print(f'{"model":32s}' + ''.join(f'{m + " img/s":>14s}{"vs " + ref:>18s}' for m in routes) + f'{"peak MB":>10s}')
    for n in names:
        line = f'{n:32s}'
        for mode in routes:
            t = med[mode][n]
            line += f'{args.batch_size / t:14.2f}{med[mode][ref] / t:17.3f}x'
            result['rows'].append(dict(model=n, mode=mode, median_s=t, img_per_s=args.batch_size / t,
                                       ratio_vs_reference=med[mode][ref] / t))
        result['rows'].append(dict(model=n, mode='memory', peak_mem_mb=None if mem[n] is None else mem[n] / MB))
        print(line + f'{_fmt_mb(mem[n]):>10s}')
    if onnx and 'profile' in onnx:
        result['onnx_profile'] = onnx['profile']
        for n, prof in onnx['profile'].items():
            top = list(prof.items())[:args.onnx_profile]
            print(f'ONNX Runtime kernel time, {n}: ' + ', '.join(f'{op} {100 * s:.0f}%' for op, s in top))
    if args.sweep:
        result['sweep'] = _sweep(args, device, progress, clock)
    progress.close()
    return result


def _sweep(args, device, progress, clock) -> List[Dict[str, Any]]:
    names, ref = args.models, args.reference
    rows: List[Dict[str, Any]] = []
    results: Dict[str, Dict[int, tuple]] = {n: {} for n in names}
    for size in args.sweep:
        ok = []
        for n in names:
            try:
                r = Runner(n, args, device, (size, size), args.sweep_batch_size)
                r.infer()
                ok.append(r)
            except Exception as e:  # e.g. a window size that does not divide the input
                print(f'{n} @ {size}: not available ({type(e).__name__}: {str(e)[:80]})')
                progress.update(args.sweep_iters)
            progress.update(1)
        times = time_interleaved({r.name: r.infer for r in ok}, args.sweep_iters, 0, device=device,
                                 on_step=progress.update, clock=clock) if ok else {}
        for r in ok:
            t = statistics.median(times[r.name])
            m = None if args.no_memory else r.peak_memory()
            results[r.name][size] = (t, m)
            rows.append(dict(model=r.name, img_size=size, batch_size=args.sweep_batch_size, median_s=t,
                             ms_per_img=1e3 * t / args.sweep_batch_size, peak_mem_mb=None if m is None else m / MB))
            r.release()
        del ok
    print(f'\nsweep: batch {args.sweep_batch_size}, inference ms per image / peak MB (ratio = {ref} time / model time)')
    print(f'{"model":32s}' + ''.join(f'{s:>22d}' for s in args.sweep))
    for n in names:
        line = f'{n:32s}'
        for s in args.sweep:
            if s in results[n]:
                t, m = results[n][s]
                rt = results.get(ref, {}).get(s)
                ratio = f' {rt[0] / t:.2f}x' if rt else ''
                line += f'{1e3 * t / args.sweep_batch_size:>10.1f}/{_fmt_mb(m):>6s}{ratio:>6s}'
            else:
                line += f'{"n/a":>22s}'
        print(line)
    if args.plot:
        _plot(results, args)
    return rows


def _fmt_mb(b: Optional[float]) -> str:
    return 'n/a' if b is None else f'{b / MB:.1f}'


def _plot(results, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, res in results.items():
        sizes = [s for s in args.sweep if s in res]
        if not sizes:
            continue
        axes[0].plot(sizes, [1e3 * res[s][0] / args.sweep_batch_size for s in sizes], marker='o', label=n)
        if not args.no_memory:
            axes[1].plot(sizes, [res[s][1] / MB for s in sizes], marker='o', label=n)
    for ax, label in zip(axes, ('inference ms / image', 'peak inference memory (MB)')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('input size (px)')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f'{args.device}, batch {args.sweep_batch_size}')
    fig.tight_layout()
    tmp = args.plot + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, args.plot)


# --------------------------------------------------------------------------------------------
# RepGraph vs non-local


def _layer_infer(layer, x):
    def step():
        layer.eval()
        with torch.inference_mode():
            layer(x)
    return step


def _layer_train(layer, x):
    def step():
        layer.train()
        layer.zero_grad(set_to_none=True)
        layer(x).mean().backward()
    return step


def run_repgraph(args, device: torch.device, threads: int) -> Dict[str, Any]:
    h, w = args.img_size
    common = dict(fusion=args.fusion)
    layers = {
        'nonlocal': NonLocal2d(args.dim, args.inner_dim, **common),
        'repgraph_bottleneck': RepGraph(args.dim, args.inner_dim, args.num_nodes, structure='bottleneck', **common),
        'repgraph_simple': RepGraph(args.dim, args.inner_dim, args.num_nodes, structure='simple', **common),
    }
    layers = {n: m.to(device) for n, m in layers.items()}
    x = torch.randn(args.batch_size, args.dim, h, w, device=device)
    result = dict(macs={name: m.macs(h, w) for name, m in layers.items()}, time={}, memory={})
    print(f'map {h}x{w} (N = {h * w}), batch {args.batch_size}, C = {args.dim}, C\' = {args.inner_dim}, '
          f'S = {args.num_nodes}, fusion {args.fusion}, {device}, {threads} threads')
    progress = _Progress(len(args.modes) * len(layers) * (args.iters + args.warmup), args.no_progress)
    for mode in args.modes:
        make = {'infer': _layer_infer, 'train': _layer_train}[mode]
        times = time_interleaved({name: make(m, x) for name, m in layers.items()}, iters=args.iters,
                                 warmup=args.warmup, device=device, on_step=progress.update)
        med = medians(times)
        speed = ratios(med, 'nonlocal')
        result['time'][mode] = dict(seconds=times, median=med, speedup_vs_nonlocal=speed)
        print(f'\n{mode} ({args.iters} rounds after {args.warmup} warm-up, medians):')
        print('| layer | GMACs | median s | speed-up vs non-local |')
        print('|---|---:|---:|---:|')
        for name in layers:
            print(f'| {name} | {result["macs"][name] / 1e9:.2f} | {med[name]:.3f} | {speed[name]:.2f}x |')
    progress.close()
    if not args.no_memory:
        rg = layers['repgraph_bottleneck']
        mem = {}
        for scale in (1, 2):
            xs = torch.randn(args.batch_size, args.dim, h * scale, w * scale, device=device)
            mem[f'repgraph_infer_{h * scale}x{w * scale}'] = peak_memory(_layer_infer(rg, xs), device)
            mem[f'repgraph_train_{h * scale}x{w * scale}'] = peak_memory(_layer_train(rg, xs), device)
            del xs
        nl = NonLocal2d(args.dim, args.inner_dim, fusion=args.fusion).to(device)
        nl.fused_attn = False  # the plain form, which holds the N x N weights
        d = args.nl_memory_div
        small = (max(1, h // d), max(1, w // d))
        big = (max(1, 2 * h // d), max(1, 2 * w // d))
        for hh, ww in (small, big):
            xs = torch.randn(args.batch_size, args.dim, hh, ww, device=device)
            mem[f'nonlocal_plain_infer_{hh}x{ww}'] = peak_memory(_layer_infer(nl, xs), device)
        result['memory'] = mem
        print('\npeak tensor memory (one call):')
        print('| layer, mode | map | MB | map | MB | ratio (4x pixels) |')
        print('|---|---|---:|---|---:|---:|')
        for mode in ('infer', 'train'):
            a, b = mem[f'repgraph_{mode}_{h}x{w}'], mem[f'repgraph_{mode}_{2 * h}x{2 * w}']
            print(f'| RepGraph bottleneck, {mode} | {h}x{w} | {a / MB:.0f} | {2 * h}x{2 * w} | {b / MB:.0f} | '
                  f'{b / a:.2f} |')
        a = mem[f'nonlocal_plain_infer_{small[0]}x{small[1]}']
        b = mem[f'nonlocal_plain_infer_{big[0]}x{big[1]}']
        print(f'| NonLocal2d plain, infer | {small[0]}x{small[1]} | {a / MB:.0f} | {big[0]}x{big[1]} | '
              f'{b / MB:.0f} | {b / a:.2f} |')
    return result


# --------------------------------------------------------------------------------------------
# CDGC memory


def class_logits(batch: int, num_classes: int, height: int, width: int, split: str, device) -> torch.Tensor:
    """ Coarse logits whose argmax puts pixel i in class i mod M (even) or every pixel in class 0 (one). """
    pixels = torch.arange(height * width, device=device)
    labels = pixels % num_classes if split == 'even' else torch.zeros_like(pixels)
    onehot = F.one_hot(labels, num_classes).t().float().view(1, num_classes, height, width)
    return onehot.expand(batch, -1, -1, -1).contiguous()


def _cdgc_peak(args, device: torch.device, num_classes: int) -> Dict[str, Any]:
    height, width = args.img_size
    torch.manual_seed(args.seed)
    layer = CDGC(args.dim, num_classes, fusion=args.fusion).to(device)
    x = torch.randn(args.batch_size, args.dim, height, width, device=device, requires_grad=True)
    coarse = class_logits(args.batch_size, num_classes, height, width, args.split, device)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x, coarse).sum().backward()

    step()  # warm-up: first-call allocations of the kernels
    peak = peak_memory(step, device)
    n = height * width
    return {
        'classes': num_classes,
        'peak_mb': peak / MB,
        'params_mb': sum(p.numel() * p.element_size() for p in layer.parameters()) / MB,
        'dense_adjacency_mb': args.batch_size * num_classes * n * n * 4 / MB,
    }


def run_cdgc(args, device: torch.device, threads: int) -> Dict[str, Any]:
    height, width = args.img_size
    print(f'CDGC forward + backward, {args.batch_size} x {args.dim} x {height} x {width} (N = {height * width}), '
          f'{args.split} split, fusion {args.fusion}, {device}, {threads} threads')
    print(f'{"M":>4} {"peak MB":>10} {"per class":>10} {"params MB":>10} {"dense M x N x N MB":>20}')
    rows = []
    for num_classes in args.classes:
        r = _cdgc_peak(args, device, num_classes)
        rows.append(r)
        print(f'{num_classes:>4} {r["peak_mb"]:>10.1f} {r["peak_mb"] / num_classes:>10.1f} '
              f'{r["params_mb"]:>10.1f} {r["dense_adjacency_mb"]:>20.0f}')
    result: Dict[str, Any] = dict(rows=rows)
    if args.limit_gb is not None:
        result['over_limit'] = [r['classes'] for r in rows if r['peak_mb'] > args.limit_gb * 1024]
    return result


# --------------------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """ Run the command; returns what ``--output`` holds. ``UsageError`` for a mistake, before any work. """
    args = build_parser().parse_args(argv)
    _check_args(args)
    device = resolve_device(args.device)
    threads = set_threads(args.threads, workers=0)
    torch.manual_seed(args.seed)
    run = {'models': run_models, 'repgraph': run_repgraph, 'cdgc': run_cdgc}[args.suite]
    result = run(args, device, threads)
    setting = {k: v for k, v in vars(args).items() if k not in ('overwrite', 'no_progress')}
    result = dict(suite=args.suite, setting=setting, torch=torch.__version__, timm=timm.__version__,
                  device=str(device), threads=threads, machine=platform.processor() or platform.machine(), **result)
    if args.output:
        tmp = args.output + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.output)
        print(f'\nwritten to {args.output}')
    if result.get('over_limit'):
        print(f'peak above {args.limit_gb} GB for M = {result["over_limit"]}', file=sys.stderr)
        sys.exit(1)
    return result


if __name__ == '__main__':
    sys.exit(run_cli(main))
