#!/usr/bin/env python3
""" RepGraph vs the non-local block: time (inference, training step) and peak memory, in one process.

    python scripts/benchmark_repgraph.py                                   # the paper's Table 2 setting
    python scripts/benchmark_repgraph.py --height 64 --width 32 --iters 5  # a quick run

Setting (defaults): the paper's Table 2 - a 256 x 128 feature map (N = 32,768 positions; at
this size the non-local block's count, 2 N^2 C' + 3 N C C', is the paper's 601.4 G),
C = 2048, C' = 256, S = 9, batch 1, float32. Layers: ``NonLocal2d`` (F.scaled_dot_product_attention,
timm's fused path), bottleneck and simple ``RepGraph``. Fusion is 'sum' by default: the 'concat'
fusion conv (2C -> C, 275 G multiply-adds here) is the same for every layer and is not in
the paper's counts; ``--fusion concat`` includes it.

Method (``dgmn_timm.tools.benchmarking``): every layer runs one step in turn, round after round
(interleaved), warm-up rounds discarded, medians compared as ratios against the non-local
block. Inference: a forward pass under ``torch.inference_mode`` (BN in eval mode). Training
step: forward, ``mean()``, backward (train mode; no optimizer).

Peak memory (tensor memory one call needs, the profiler's allocator events):
- RepGraph (bottleneck), inference and training step, at the map and at twice its height and
  width (4x the pixels): linear memory means a ratio near 4.
- NonLocal2d, inference, in its plain form (matmul - softmax - matmul, which holds the
  N x N weights; ``fused_attn=False``) at a quarter and half of the map's height and width
  (``--nl-memory-div``; the full map needs N^2 x 4 bytes = 4.3 GB per copy): quadratic memory
  means a ratio near 16.
"""
import argparse
import json
import os
import platform
import sys

import torch

try:
    import dgmn_timm  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from dgmn_timm.tools.benchmarking import medians, peak_memory, ratios, time_interleaved
from dgmn_timm.layers import NonLocal2d, RepGraph


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--height', type=int, default=256, help='feature map height')
    p.add_argument('--width', type=int, default=128, help='feature map width')
    p.add_argument('--dim', type=int, default=2048, help='C')
    p.add_argument('--inner-dim', type=int, default=256, help="C'")
    p.add_argument('--num-nodes', type=int, default=9, help='S')
    p.add_argument('--fusion', default='sum', choices=('sum', 'concat'))
    p.add_argument('--modes', default='infer,train', help='comma-separated: infer, train')
    p.add_argument('--iters', type=int, default=3, help='measured rounds per mode')
    p.add_argument('--warmup', type=int, default=1, help='discarded rounds per mode')
    p.add_argument('--train-iters', type=int, default=None, help='measured training rounds (default --iters)')
    p.add_argument('--train-warmup', type=int, default=None, help='discarded training rounds (default --warmup)')
    p.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurements')
    p.add_argument('--nl-memory-div', type=int, default=4,
                   help='the plain non-local memory is measured at map / div and map / (div / 2)')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: default)')
    p.add_argument('--output', default=None, help='write the results as JSON here')
    return p


def _layers(args):
    torch.manual_seed(0)
    common = dict(fusion=args.fusion)
    return {
        'nonlocal': NonLocal2d(args.dim, args.inner_dim, **common),
        'repgraph_bottleneck': RepGraph(args.dim, args.inner_dim, args.num_nodes, structure='bottleneck', **common),
        'repgraph_simple': RepGraph(args.dim, args.inner_dim, args.num_nodes, structure='simple', **common),
    }


def _infer(layer, x):
    def step():
        layer.eval()
        with torch.inference_mode():
            layer(x)
    return step


def _train(layer, x):
    def step():
        layer.train()
        layer.zero_grad(set_to_none=True)
        layer(x).mean().backward()
    return step


def main(argv=None):
    args = get_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    h, w = args.height, args.width
    layers = _layers(args)
    x = torch.randn(1, args.dim, h, w)
    result = dict(setting=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(),
                  macs={name: m.macs(h, w) for name, m in layers.items()}, time={}, memory={})
    print(f'map {h}x{w} (N = {h * w}), C = {args.dim}, C\' = {args.inner_dim}, S = {args.num_nodes}, '
          f'fusion {args.fusion}, {torch.get_num_threads()} threads')
    for mode in [m for m in args.modes.split(',') if m]:
        make = {'infer': _infer, 'train': _train}[mode]
        iters = args.iters if mode == 'infer' or args.train_iters is None else args.train_iters
        warmup = args.warmup if mode == 'infer' or args.train_warmup is None else args.train_warmup
        times = time_interleaved({name: make(m, x) for name, m in layers.items()}, iters=iters, warmup=warmup)
        med = medians(times)
        speed = ratios(med, 'nonlocal')
        result['time'][mode] = dict(seconds=times, median=med, speedup_vs_nonlocal=speed)
        print(f'\n{mode} ({iters} rounds after {warmup} warm-up, medians):')
        print('| layer | GMACs | median s | speed-up vs non-local |')
        print('|---|---:|---:|---:|')
        for name in layers:
            print(f'| {name} | {result["macs"][name] / 1e9:.2f} | {med[name]:.3f} | {speed[name]:.2f}x |')
    if not args.no_memory:
        rg = layers['repgraph_bottleneck']
        mem = {}
        for scale in (1, 2):
            xs = torch.randn(1, args.dim, h * scale, w * scale)
            mem[f'repgraph_infer_{h * scale}x{w * scale}'] = peak_memory(_infer(rg, xs))
            mem[f'repgraph_train_{h * scale}x{w * scale}'] = peak_memory(_train(rg, xs))
            del xs
        nl = NonLocal2d(args.dim, args.inner_dim, fusion=args.fusion)
        nl.fused_attn = False  # the plain form, which holds the N x N weights
        d = args.nl_memory_div
        small = (h // d, w // d)
        big = (2 * h // d, 2 * w // d)
        for hh, ww in (small, big):
            mem[f'nonlocal_plain_infer_{hh}x{ww}'] = peak_memory(_infer(nl, torch.randn(1, args.dim, hh, ww)))
        result['memory'] = mem
        print('\npeak tensor memory (one call):')
        print('| layer, mode | map | MB | map | MB | ratio (4x pixels) |')
        print('|---|---|---:|---|---:|---:|')
        for mode in ('infer', 'train'):
            a, b = mem[f'repgraph_{mode}_{h}x{w}'], mem[f'repgraph_{mode}_{2 * h}x{2 * w}']
            print(f'| RepGraph bottleneck, {mode} | {h}x{w} | {a / 2 ** 20:.0f} | {2 * h}x{2 * w} | '
                  f'{b / 2 ** 20:.0f} | {b / a:.2f} |')
        a = mem[f'nonlocal_plain_infer_{small[0]}x{small[1]}']
        b = mem[f'nonlocal_plain_infer_{big[0]}x{big[1]}']
        print(f'| NonLocal2d plain, infer | {small[0]}x{small[1]} | {a / 2 ** 20:.0f} | {big[0]}x{big[1]} | '
              f'{b / 2 ** 20:.0f} | {b / a:.2f} |')
    if args.output:
        tmp = args.output + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.output)
    return result


if __name__ == '__main__':
    main()
