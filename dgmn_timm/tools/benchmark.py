#!/usr/bin/env python3
""" Throughput and peak memory of DGMN2 side by side with timm's peers, in one process.

    python scripts/benchmark.py                                   # all DGMN2 variants + peers, CPU
    python scripts/benchmark.py --models dgmn2_tiny,pvt_v2_b1 --batch-size 8 --iters 20
    python scripts/benchmark.py --models dgmn2_tiny,pvt_v2_b1 --sweep 224,384,512,768,1024
    python scripts/benchmark.py --device cuda --amp --compile --channels-last

Method (``dgmn_timm.tools.benchmarking``): every model is built once; then, for each measured
iteration, every model runs one step in turn (interleaved), so that load changes on a shared
machine hit all models alike. Warm-up iterations are discarded, the median step time is
reported, and ratios are taken against ``--reference`` (default pvt_v2_b1) from those medians.
Inference is a forward pass under ``torch.inference_mode``; a training step is forward,
``mean()`` loss, backward and an SGD step. Peak memory is the tensor memory of one inference
pass (``dgmn_timm.tools.benchmarking.peak_memory``).

Outputs in ``--output-dir``: throughput.csv, and with ``--sweep`` sweep.csv and sweep.png
(time per image and peak memory against input size, log-log).
"""
import argparse
import csv
import logging
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch

import timm

try:
    import dgmn_timm  # noqa: F401  (registers the models)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
    import dgmn_timm  # noqa: F401
from dgmn_timm.tools.benchmarking import medians, peak_memory, time_interleaved

DEFAULT_MODELS = ('dgmn2_tiny,dgmn2_small,dgmn2_medium,dgmn2_large,'
                  'pvt_v2_b1,pvt_v2_b2,swin_tiny_patch4_window7_224,resnet50')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--models', default=DEFAULT_MODELS, help='comma-separated timm model names')
    p.add_argument('--reference', default='pvt_v2_b1', help='ratios are printed against this model')
    p.add_argument('--device', default='cpu')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--iters', type=int, default=10, help='measured iterations per model and mode')
    p.add_argument('--warmup', type=int, default=2, help='discarded iterations per model and mode')
    p.add_argument('--modes', default='infer,train', help='infer and/or train')
    p.add_argument('--amp', action='store_true', help='autocast (bfloat16 on CPU, --amp-dtype on CUDA)')
    p.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    p.add_argument('--compile', action='store_true', help='torch.compile every model')
    p.add_argument('--channels-last', action='store_true', help='channels-last model and input')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave as is)')
    p.add_argument('--clock', default='wall', choices=['wall', 'cpu'],
                   help='wall time, or CPU time of the process (with --threads 1: robust to a shared machine)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    p.add_argument('--sweep', default='', help='comma-separated input sizes for a time / memory sweep, e.g. 224,512,1024')
    p.add_argument('--sweep-batch-size', type=int, default=1)
    p.add_argument('--sweep-iters', type=int, default=3)
    p.add_argument('--output-dir', default='benchmark_results')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--seed', type=int, default=0)
    return p


class Runner:
    """ One model with its input, optimizer and step functions. """

    def __init__(self, name: str, args, device: torch.device, img_size: int, batch_size: int):
        self.name = name
        self.device = device
        kwargs = {}
        if name.startswith('swin') and img_size != 224:
            kwargs['img_size'] = img_size
        self.model = timm.create_model(name, **kwargs).to(device)
        self.x = torch.randn(batch_size, 3, img_size, img_size, device=device)
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


def time_runners(runners: List[Runner], step: str, iters: int, warmup: int, progress,
                 clock: str = 'wall') -> Dict[str, List[float]]:
    return time_interleaved({r.name: getattr(r, step) for r in runners}, iters, warmup,
                            device=runners[0].device if runners else None, on_step=lambda: progress.update(1),
                            clock=time.process_time if clock == 'cpu' else time.perf_counter)


def _fmt_mb(b: Optional[float]) -> str:
    return 'n/a' if b is None else f'{b / 2 ** 20:.1f}'


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n.strip() for n in args.models.split(',') if n.strip()]
    ref = args.reference if args.reference in names else names[0]
    modes = [m.strip() for m in args.modes.split(',') if m.strip()]
    sweep = [int(s) for s in args.sweep.split(',') if s.strip()]
    os.makedirs(args.output_dir, exist_ok=True)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    total = len(names) * len(modes) * (args.warmup + args.iters)
    total += len(sweep) * len(names) * (1 + args.sweep_iters)
    progress = tqdm(total=total, disable=args.no_progress or tqdm is None, desc='benchmark', file=sys.stderr) \
        if tqdm is not None else None
    if progress is None:
        class _Null:
            def update(self, n): pass

            def close(self): pass
        progress = _Null()

    print(f'torch {torch.__version__}, timm {timm.__version__}, device {device}, threads {torch.get_num_threads()}, '
          f'{platform.processor() or platform.machine()}, amp={args.amp}, compile={args.compile}, '
          f'channels_last={args.channels_last}, clock={args.clock}')

    # ---- throughput at one size
    runners = [Runner(n, args, device, args.img_size, args.batch_size) for n in names]
    rows = []
    med: Dict[str, Dict[str, float]] = {}
    for mode in modes:
        med[mode] = medians(time_runners(runners, mode, args.iters, args.warmup, progress, args.clock))
    mem = {r.name: (None if args.no_memory else r.peak_memory()) for r in runners}
    for r in runners:
        r.release()
    del runners

    print(f'\nbatch {args.batch_size}, {args.img_size}x{args.img_size}, median of {args.iters} interleaved iterations')
    header = f'{"model":32s}' + ''.join(f'{m + " img/s":>14s}{"vs " + ref:>18s}' for m in modes) + f'{"peak MB":>10s}'
    print(header)
    for n in names:
        line = f'{n:32s}'
        for mode in modes:
            t = med[mode][n]
            line += f'{args.batch_size / t:14.2f}{med[mode][ref] / t:17.3f}x'
            rows.append(dict(model=n, mode=mode, batch_size=args.batch_size, img_size=args.img_size,
                             device=str(device), amp=args.amp, compile=args.compile,
                             channels_last=args.channels_last, threads=torch.get_num_threads(), clock=args.clock,
                             median_s=f'{t:.6f}', img_per_s=f'{args.batch_size / t:.3f}',
                             ratio_vs_reference=f'{med[mode][ref] / t:.4f}', reference=ref,
                             peak_mem_mb=_fmt_mb(mem[n])))
        print(line + f'{_fmt_mb(mem[n]):>10s}')
    with open(os.path.join(args.output_dir, 'throughput.csv'), 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)

    # ---- resolution sweep
    if sweep:
        srows = []
        results: Dict[str, Dict[int, tuple]] = {n: {} for n in names}
        for size in sweep:
            runners = []
            for n in names:
                try:
                    runners.append(Runner(n, args, device, size, args.sweep_batch_size))
                except Exception as e:  # e.g. a window size that does not divide the input
                    print(f'{n} @ {size}: not available ({type(e).__name__}: {str(e)[:80]})')
                    progress.update(1 + args.sweep_iters)
            ok = []
            for r in runners:
                try:
                    r.infer()
                    ok.append(r)
                except Exception as e:
                    print(f'{r.name} @ {size}: not available ({type(e).__name__}: {str(e)[:80]})')
                    progress.update(args.sweep_iters)
                progress.update(1)
            times = time_runners(ok, 'infer', args.sweep_iters, 0, progress, args.clock)
            for r in ok:
                t = statistics.median(times[r.name])
                m = None if args.no_memory else r.peak_memory()
                results[r.name][size] = (t, m)
                srows.append(dict(model=r.name, img_size=size, batch_size=args.sweep_batch_size, device=str(device),
                                  median_s=f'{t:.6f}', ms_per_img=f'{1e3 * t / args.sweep_batch_size:.3f}',
                                  peak_mem_mb=_fmt_mb(m)))
                r.release()
            del runners, ok
        print(f'\nsweep: batch {args.sweep_batch_size}, inference ms per image / peak MB '
              f'(ratio = {ref} time / model time)')
        print(f'{"model":32s}' + ''.join(f'{s:>22d}' for s in sweep))
        for n in names:
            line = f'{n:32s}'
            for s in sweep:
                if s in results[n]:
                    t, m = results[n][s]
                    rt = results.get(ref, {}).get(s)
                    ratio = f' {rt[0] / t:.2f}x' if rt else ''
                    line += f'{1e3 * t / args.sweep_batch_size:>10.1f}/{_fmt_mb(m):>6s}{ratio:>6s}'
                else:
                    line += f'{"n/a":>22s}'
            print(line)
        if len(sweep) >= 2 and not args.no_memory:
            hi = max(sweep)
            lows = sorted(s for s in sweep if s < hi)
            print(f'\npeak memory growth to {hi}^2 from ' + ', '.join(
                f'{lo}^2 (pixels x{(hi / lo) ** 2:.2f})' for lo in lows) + ':')
            for n in names:
                growth = [f'x{results[n][hi][1] / results[n][lo][1]:.2f}' for lo in lows
                          if lo in results[n] and hi in results[n] and results[n][lo][1]]
                print(f'  {n:32s} ' + '  '.join(growth))
        with open(os.path.join(args.output_dir, 'sweep.csv'), 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=list(srows[0].keys()))
            w.writeheader()
            w.writerows(srows)
        _plot(results, sweep, args, os.path.join(args.output_dir, 'sweep.png'))
    progress.close()
    print(f'\nwritten to {args.output_dir}/')


def _plot(results, sweep, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for n, res in results.items():
        sizes = [s for s in sweep if s in res]
        if not sizes:
            continue
        axes[0].plot(sizes, [1e3 * res[s][0] / args.sweep_batch_size for s in sizes], marker='o', label=n)
        if not args.no_memory:
            axes[1].plot(sizes, [res[s][1] / 2 ** 20 for s in sizes], marker='o', label=n)
    for ax, label in zip(axes, ('inference ms / image', 'peak inference memory (MB)')):
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('input size (px)')
        ax.set_ylabel(label)
        ax.grid(True, which='both', alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f'{args.device}, batch {args.sweep_batch_size}')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
