#!/usr/bin/env python3
""" Peak memory of one forward + backward of the CDGC layer (dgmn_timm.layers.CDGC).

For each number of classes M the pixels of an H x W map are split among the classes (evenly:
pixel i in class i mod M; or ``--split one``: every pixel in one class, the others empty), and
one forward + backward of the layer (features requiring gradients, parameter gradients
included) is measured with ``dgmn_timm.tools.benchmarking.peak_memory``: the peak of live tensor
memory during the call (CPU: the profiler's allocation events; CUDA: max_memory_allocated).
The dense form's M x N x N adjacency is printed next to it for scale (computed, never built).

    python scripts/benchmark_cdgc.py                       # 97 x 97, C = 512, M = 1 2 4 8 19, CPU
    python scripts/benchmark_cdgc.py --split one --classes 19
    python scripts/benchmark_cdgc.py --limit-gb 1.0        # exit status 1 if a peak exceeds 1 GB
"""
import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from dgmn_timm.tools.benchmarking import peak_memory
from dgmn_timm.layers import CDGC

MB = 2 ** 20


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', type=int, nargs=2, default=[97, 97], metavar=('H', 'W'),
                   help='feature map size (97 x 97: a 769 x 769 Cityscapes crop at output stride 8)')
    p.add_argument('--dim', type=int, default=512, help='feature channels C')
    p.add_argument('--classes', type=int, nargs='+', default=[1, 2, 4, 8, 19], help='numbers of classes M')
    p.add_argument('--batch', type=int, default=1)
    p.add_argument('--split', choices=('even', 'one'), default='even', help='how pixels are split among the classes')
    p.add_argument('--fusion', choices=('concat', 'sum'), default='concat')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: default)')
    p.add_argument('--limit-gb', type=float, default=None, help='exit with status 1 if a peak exceeds this')
    p.add_argument('--json', default=None, help='also write the results to this file')
    args = p.parse_args(argv)
    if min(args.classes) < 1 or args.dim < 1 or args.batch < 1 or min(args.size) < 1:
        p.error('--classes, --dim, --batch and --size must be positive')
    return args


def class_logits(batch: int, num_classes: int, height: int, width: int, split: str, device) -> torch.Tensor:
    """ Coarse logits whose argmax puts pixel i in class i mod M (even) or every pixel in class 0 (one). """
    pixels = torch.arange(height * width, device=device)
    labels = pixels % num_classes if split == 'even' else torch.zeros_like(pixels)
    onehot = F.one_hot(labels, num_classes).t().float().view(1, num_classes, height, width)
    return onehot.expand(batch, -1, -1, -1).contiguous()


def measure(args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    device = torch.device(args.device)
    height, width = args.size
    torch.manual_seed(0)
    layer = CDGC(args.dim, num_classes, fusion=args.fusion).to(device)
    x = torch.randn(args.batch, args.dim, height, width, device=device, requires_grad=True)
    coarse = class_logits(args.batch, num_classes, height, width, args.split, device)

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
        'dense_adjacency_mb': args.batch * num_classes * n * n * 4 / MB,
    }


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    height, width = args.size
    print(f'CDGC forward + backward, {args.batch} x {args.dim} x {height} x {width} (N = {height * width}), '
          f'{args.split} split, fusion {args.fusion}, {args.device}, torch {torch.__version__}')
    print(f'{"M":>4} {"peak MB":>10} {"per class":>10} {"params MB":>10} {"dense M x N x N MB":>20}')
    results = []
    for num_classes in args.classes:
        r = measure(args, num_classes)
        results.append(r)
        print(f'{num_classes:>4} {r["peak_mb"]:>10.1f} {r["peak_mb"] / num_classes:>10.1f} '
              f'{r["params_mb"]:>10.1f} {r["dense_adjacency_mb"]:>20.0f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'results': results}, f, indent=2)
    if args.limit_gb is not None:
        over = [r for r in results if r['peak_mb'] > args.limit_gb * 1024]
        if over:
            print(f'peak above {args.limit_gb} GB for M = {[r["classes"] for r in over]}', file=sys.stderr)
            sys.exit(1)
    return results


if __name__ == '__main__':
    main()
