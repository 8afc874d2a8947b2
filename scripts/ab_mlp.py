#!/usr/bin/env python3
""" A/B timing of the row-blocked MLP (``dgmn_timm.kernels.chunked_mlp``) in whole-model train steps.

In each process, dgmn2 with blocked MLPs, dgmn2 with plain MLPs and a timm peer take turns
(one train step each, interleaved, the order rotating every round), and the medians and minor page faults per step are
printed; ``--processes N`` repeats that in N fresh processes and summarises the ratios.

    python scripts/ab_mlp.py --processes 5 --iters 12
"""
import argparse
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time


def one_process(args) -> dict:
    import torch
    import timm
    import dgmn_timm  # noqa: F401
    cm = importlib.import_module('dgmn_timm.kernels.chunked_mlp')  # the module (the package exports the function)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model)
    peer = None if args.peer == 'none' else timm.create_model(args.peer)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    blocked_min = cm.CHUNKED_MLP_MIN_BYTES

    def step(m, min_bytes):
        cm.CHUNKED_MLP_MIN_BYTES = min_bytes
        m.zero_grad(set_to_none=True)
        m(x).mean().backward()

    variants = {'blocked': (model, blocked_min), 'plain': (model, 1 << 62)}
    if peer is not None:
        variants['peer'] = (peer, 1 << 62)
    times = {k: [] for k in variants}
    faults = {k: [] for k in variants}
    names = list(variants)
    for it in range(args.iters):
        # rotate the order each round, so that no variant always follows the same one
        for k in names[it % len(names):] + names[:it % len(names)]:
            m, min_bytes = variants[k]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(m, min_bytes)
            times[k].append(time.perf_counter() - t0)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    skip = min(3, args.iters - 1)
    return {k: dict(ms=1e3 * statistics.median(times[k][skip:]), faults=statistics.median(faults[k][skip:]))
            for k in variants}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='dgmn2_tiny')
    parser.add_argument('--peer', default='pvt_v2_b1', help="timm model timed alongside, or 'none'")
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--iters', type=int, default=12)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--processes', type=int, default=1)
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args)))
        return
    runs = []
    for i in range(args.processes):
        cmd = [sys.executable, __file__, '--child'] + [
            f'--{k.replace("_", "-")}={v}' for k, v in vars(args).items() if k not in ('child', 'processes')]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        runs.append(r)
        line = f'process {i + 1}: ' + ', '.join(
            f'{k} {v["ms"]:.0f} ms ({v["faults"]:.0f} faults)' for k, v in r.items())
        line += f'; blocked vs plain {r["plain"]["ms"] / r["blocked"]["ms"]:.3f}x'
        if 'peer' in r:
            line += (f', vs {args.peer}: blocked {r["peer"]["ms"] / r["blocked"]["ms"]:.3f}x'
                     f', plain {r["peer"]["ms"] / r["plain"]["ms"]:.3f}x')
        print(line, flush=True)
    if len(runs) > 1:
        gmean = statistics.geometric_mean
        line = (f'geometric mean over {len(runs)} processes: blocked vs plain '
                f'{gmean([r["plain"]["ms"] / r["blocked"]["ms"] for r in runs]):.3f}x')
        if 'peer' in runs[0]:
            line += (f', vs {args.peer}: blocked {gmean([r["peer"]["ms"] / r["blocked"]["ms"] for r in runs]):.3f}x'
                     f', plain {gmean([r["peer"]["ms"] / r["plain"]["ms"] for r in runs]):.3f}x')
        print(line)


if __name__ == '__main__':
    main()
