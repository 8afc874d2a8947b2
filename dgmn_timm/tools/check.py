""" Does this machine run DGMN's op right and fast? One command, for you and for bug reports.

    python -m dgmn_timm.check                              # every available device, a table
    python -m dgmn_timm.check --device cuda --output check_cuda.json

What it checks, on each device:

- the versions (Python, torch, timm, torchvision, Triton), and which kernel the op
  ``torch.ops.dgmn_timm.sampled_attention`` takes there and why;
- the op and its portable path (``grid_sample``) against the float64 oracle
  ``dgmn_timm.ops.sampled_attention_reference``, on unit-scale random inputs with random
  fractional node offsets (a fresh model's walks are zero: every node on a whole pixel, where a
  bilinear-weight bug is invisible): the output and the gradient of every input (qkv, offset,
  bias, both position tables), float32, and on CUDA bfloat16 and float16 too. Cases: K = 9 with
  a bias, DGMN2's position tables in both conventions (released and clean; a square map too),
  RepGraph's call (permuted qkv, offsets shared by the heads as a stride-0 view, no bias,
  scale 1), another K with offsets far outside a 1-pixel-wide map, a 1x1 map;
- a DGMN2 attention layer in float32 (fused op and portable path, both position conventions) against the
  same layer in float64 through the oracle: output and the gradients of its input and weights;
- a short timing of dgmn2_tiny against timm's pvt_v2_b1 at 224x224 (inference and a train step,
  interleaved, medians; autocast on CUDA) and the peak tensor memory of each.

Errors are the max absolute difference from the float64 oracle. A float32 check passes below
1e-3; bfloat16 / float16 below 3e-2 / 4e-3 times max(1, max |reference|) (the inputs are rounded
to that dtype first, so this bounds the kernel's error, not the rounding of the inputs).
The timing is reported, never failed (a shared machine's load would make it flaky); a ratio
far below docs/PERF.md's is worth a bug report.

Exit code: 0 if every check passed, 1 if any failed, 2 for a usage error (``error:`` line).
"""
import argparse
import copy
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import timm

from ..models.dgmn2 import DynamicGraphAttention
from ..ops import position_logits, sampled_attention, sampled_attention_portable, sampled_attention_reference
from ..ops.sampled_attention import _uses_triton
from .benchmark import Runner
from .benchmarking import medians, peak_memory, time_interleaved
from .cli import HelpFormatter, UsageError, run_cli

__all__ = ['build_parser', 'main', 'TOLERANCES']

# dtype -> tolerance of the max absolute error; half precision: times max(1, max |reference|)
TOLERANCES = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 4e-3}

# name, (B, H, W, heads, head_dim, K), bias, position tables (None, 'released', 'clean'), layout, offset scale
OP_CASES = [
    ('K=9, bias, 5x7', (2, 5, 7, 2, 8, 9), True, None, 'plain', 1.5),
    ('K=9, position released, 7x5', (1, 7, 5, 2, 8, 9), False, 'released', 'plain', 1.5),
    ('K=9, position released, 6x6', (1, 6, 6, 1, 8, 9), True, 'released', 'plain', 1.5),
    ('K=9, position clean + bias, 5x3', (2, 5, 3, 2, 4, 9), True, 'clean', 'plain', 1.5),
    ('RepGraph call, K=9, 9x7', (2, 9, 7, 2, 4, 9), False, None, 'repgraph', 2.0),
    ('K=4, far offsets, 3x1', (1, 3, 1, 2, 4, 4), True, None, 'plain', 3.0),
    ('K=9, 1x1 map', (1, 1, 1, 2, 6, 9), True, 'clean', 'plain', 1.5),
]

# the timing: dgmn2_tiny against this reference, at 224x224
TIMED_MODELS = ('dgmn2_tiny', 'pvt_v2_b1')
TIMING = {'cpu': dict(batch_size=1, iters=5, warmup=1), 'cuda': dict(batch_size=64, iters=10, warmup=3)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m dgmn_timm.check', description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--device', default='auto',
                   help='cpu, cuda, cuda:N, or auto (every available device: cpu, and cuda if available)')
    p.add_argument('--output', default=None, metavar='FILE', help='also write the results as JSON to this file')
    p.add_argument('--overwrite', action='store_true', help='replace an existing --output file')
    p.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: torch\'s choice)')
    p.add_argument('--no-timing', action='store_true', help='correctness only (skip the timing of dgmn2_tiny)')
    return p


# --------------------------------------------------------------------------------------------
# the environment


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def versions() -> Dict[str, Optional[str]]:
    """ Versions of Python, the platform and the packages the op depends on (None: not importable). """
    v = {
        'python': platform.python_version(),
        'platform': platform.platform(),
        'dgmn_timm': _version('dgmn_timm'),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'torchvision': _version('torchvision'),
        'triton': _version('triton'),
        'numpy': _version('numpy'),
        'torch_cuda': torch.version.cuda,
        'cpu_threads': str(torch.get_num_threads()),
    }
    return v


def kernel_of(device: torch.device) -> Dict[str, str]:
    """ Which kernel the op takes on ``device`` for float32 inputs, and why. """
    probe = torch.empty(0, device=device)
    if _uses_triton(probe):
        return {'kernel': 'triton',
                'why': f'CUDA with Triton {_version("triton")} importable (float64 inputs take the gather kernel)'}
    if device.type == 'cuda':
        return {'kernel': 'gather',
                'why': 'Triton is not importable, so CUDA takes the gather kernel (slower: pip install triton)'}
    return {'kernel': 'gather', 'why': f'{device.type}: the embedding-bag gather kernel (the kernel of every '
                                       'device but CUDA with Triton)'}


def device_info(device: torch.device) -> Dict[str, str]:
    info = kernel_of(device)
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info['name'] = props.name
        info['capability'] = f'{props.major}.{props.minor}'
        info['memory_gb'] = f'{props.total_memory / 2 ** 30:.1f}'
    else:
        info['name'] = platform.processor() or platform.machine()
    return info


# --------------------------------------------------------------------------------------------
# the op against its float64 oracle


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def op_inputs(dims: Sequence[int], bias: bool, pos: Optional[str], layout: str, walk: float, seed: int = 0):
    """ float64 leaves of one case: qkv (or its permuted base), offset (or its one-head base), bias, pos_h, pos_w. """
    B, H, W, nh, hd, K = dims
    g = torch.Generator().manual_seed(seed)
    leaves = {}
    if layout == 'repgraph':
        # RepGraph: qkv a permuted conv output, offsets shared by the heads (expanded, stride 0)
        leaves['qkv'] = _randn(g, B, 3, nh, hd, H, W)
        offset = _randn(g, B, H, W, 1, 2 * K) * walk
    else:
        leaves['qkv'] = _randn(g, B, H, W, 3, nh, hd)
        offset = _randn(g, B, H, W, nh, 2 * K) * walk
    if K == 9:  # DGMN2's 3x3 neighbourhood plus fractional walks
        k = torch.arange(9)
        offset = offset + torch.stack((k // 3 - 1, k % 3 - 1), -1).reshape(18).double()
    leaves['offset'] = offset
    if bias:
        leaves['bias'] = _randn(g, B, H, W, nh, K)
    if pos is not None:
        leaves['pos_h'] = _randn(g, H, K, hd) * hd ** -0.5
        leaves['pos_w'] = _randn(g, W, K, hd) * hd ** -0.5
    return leaves, _randn(g, B, H, W, nh, hd)


def _op_args(leaves: Dict[str, torch.Tensor], dims: Sequence[int], layout: str):
    """ The op's tensor arguments from the leaves (views as the layer would pass them). """
    B, H, W, nh, hd, K = dims
    qkv, offset = leaves['qkv'], leaves['offset']
    if layout == 'repgraph':
        qkv = qkv.permute(0, 4, 5, 1, 2, 3)
        offset = offset.expand(B, H, W, nh, 2 * K)
    return qkv, offset, leaves.get('bias'), leaves.get('pos_h'), leaves.get('pos_w')


def _call(path: str, args, scale: float, released: bool) -> torch.Tensor:
    """ The op ('fused'), its portable path or the oracle on the same arguments.

    The position convention is passed by position (the op's last argument): one call site.
    """
    qkv, offset, bias, pos_h, pos_w = args
    if path == 'fused':
        return sampled_attention(qkv, offset, bias, scale, pos_h, pos_w, released)
    if path == 'reference':
        return sampled_attention_reference(qkv, offset, bias, scale, pos_h, pos_w, released)
    if pos_h is not None:
        pos = position_logits(qkv[:, :, :, 0], pos_h, pos_w, released)
        bias = pos if bias is None else bias + pos
    return sampled_attention_portable(qkv, offset, bias, scale)


def _forward_backward(path, leaves64, grad64, dims, layout, scale, released, device, dtype):
    """ Output and input gradients (float64, CPU) of ``path`` on the leaves cast to ``dtype`` on ``device``. """
    leaves = {k: v.to(device, dtype).requires_grad_() for k, v in leaves64.items()}
    out = _call(path, _op_args(leaves, dims, layout), scale, released)
    grads = torch.autograd.grad(out, list(leaves.values()), grad64.to(device, out.dtype))
    result = {'out': out.detach().double().cpu()}
    result.update({k: g.double().cpu() for k, g in zip(leaves, grads)})
    return result


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.


def _tolerance(ref: Dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """ The tolerance for these results (see the module doc). """
    tol = TOLERANCES[dtype]
    if dtype != torch.float32:
        tol *= max([1.] + [r.abs().max().item() for r in ref.values() if r.numel()])
    return tol


def check_op(device: torch.device, dtypes: Sequence[torch.dtype]) -> List[dict]:
    """ The fused op and the portable path against the oracle on every case of ``OP_CASES``. """
    results = []
    for name, dims, bias, pos, layout, walk in OP_CASES:
        leaves64, grad64 = op_inputs(dims, bias, pos, layout, walk)
        scale = 1.0 if layout == 'repgraph' else dims[4] ** -0.5
        released = pos == 'released'
        for dtype in dtypes:
            # the oracle on the inputs as this dtype rounds them: the check bounds the kernel, not the rounding
            rounded = {k: v.to(dtype).double() for k, v in leaves64.items()}
            ref = _forward_backward('reference', rounded, grad64, dims, layout, scale, released, 'cpu', torch.float64)
            for path in ('fused', 'portable'):
                record = dict(device=str(device), check=f'op {path}: {name}', dtype=str(dtype)[6:],
                              tol=_tolerance(ref, dtype))
                try:
                    got = _forward_backward(path, rounded, grad64, dims, layout, scale, released, device, dtype)
                except Exception as e:  # a kernel that fails to run is a failed check, reported with its error
                    results.append(dict(record, ok=False, error=f'{type(e).__name__}: {e}'[:500]))
                    continue
                errs = {('fwd_err' if k == 'out' else f'grad_{k}_err'): _err(got[k], ref[k]) for k in ref}
                results.append(dict(record, ok=all(e <= record['tol'] for e in errs.values()), **errs))
    return results


# --------------------------------------------------------------------------------------------
# a DGMN2 attention layer against the same layer in float64 through the oracle


def _layer_reference(layer: DynamicGraphAttention, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    qkv, offset, pos_h, pos_w = layer.attention_inputs(x)
    y = sampled_attention_reference(qkv, offset, None, layer.scale, pos_h, pos_w, layer.rel_pos_released)
    return layer.proj(y.reshape(B, H, W, C))


def check_layer(device: torch.device) -> List[dict]:
    """ DynamicGraphAttention (fused and portable, both position conventions) on a 7x5 map from a 7x7
    table, with random walks, in float32, against its float64 twin through the oracle. """
    dtypes = (torch.float32,)
    results = []
    for released in (True, False):
        g = torch.Generator().manual_seed(1)
        for portable in (False, True):
            torch.manual_seed(0)
            layer = DynamicGraphAttention(16, num_heads=2, table_size=(7, 7), rel_pos_released=released)
            layer.fused_attn = not portable  # the path under test, whatever timm's switches say
            with torch.no_grad():
                layer.walk.weight.normal_(0., 0.5, generator=g)
                layer.walk.bias.uniform_(-1., 1., generator=g)
            x64 = torch.randn(2, 7, 5, 16, generator=g, dtype=torch.float64)
            go64 = torch.randn(2, 7, 5, 16, generator=g, dtype=torch.float64)
            for dtype in dtypes:
                twin = copy.deepcopy(layer).double()
                with torch.no_grad():  # the float64 twin holds the weights as this dtype rounds them
                    for p in twin.parameters():
                        p.copy_(p.to(dtype).double())
                x = x64.to(dtype).double().requires_grad_()
                ref_out = _layer_reference(twin, x)
                ref = dict(zip(['out', 'x'] + [n for n, _ in twin.named_parameters()],
                               [ref_out.detach()] + list(torch.autograd.grad(ref_out, [x, *twin.parameters()], go64))))
                mod = copy.deepcopy(layer).to(device, dtype)
                xd = x.detach().to(device, dtype).requires_grad_()
                convention = 'released' if released else 'clean'
                record = dict(device=str(device), check=f'DGMN2 layer {"portable" if portable else "fused"}: '
                                                         f'position {convention}, walks, 7x5',
                              dtype=str(dtype)[6:], tol=_tolerance(ref, dtype))
                try:
                    out = mod(xd)
                    grads = torch.autograd.grad(out, [xd, *mod.parameters()], go64.to(device, dtype))
                except Exception as e:
                    results.append(dict(record, ok=False, error=f'{type(e).__name__}: {e}'[:500]))
                    continue
                got = dict(zip(['out', 'x'] + [n for n, _ in mod.named_parameters()],
                               [out.detach()] + list(grads)))
                got = {k: v.double().cpu() for k, v in got.items()}
                errs = {'fwd_err': _err(got['out'], ref['out']), 'grad_x_err': _err(got['x'], ref['x']),
                        'grad_weights_err': max(_err(got[k], ref[k]) for k in ref if k not in ('out', 'x'))}
                results.append(dict(record, ok=all(e <= record['tol'] for e in errs.values()), **errs))
    return results


# --------------------------------------------------------------------------------------------
# timing


def _load() -> Optional[float]:
    """ The machine's 1-minute load average (other processes slow the timing down), None where unknown. """
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def check_timing(device: torch.device) -> dict:
    """ dgmn2_tiny against pvt_v2_b1: median seconds per step (interleaved), ratios, peak memory. """
    cfg = TIMING['cuda' if device.type == 'cuda' else 'cpu']
    amp = device.type == 'cuda'
    torch.manual_seed(0)
    options = argparse.Namespace(exportable=False, channels_last=False, compile=False, amp=amp, amp_dtype='bfloat16')
    runners = {name: Runner(name, options, device, (224, 224), cfg['batch_size']) for name in TIMED_MODELS}
    steps = {name: (r.infer, r.train) for name, r in runners.items()}
    result = dict(device=str(device), batch_size=cfg['batch_size'], img_size=224, iters=cfg['iters'],
                  amp='bfloat16' if amp else None, threads=torch.get_num_threads(), load_average=_load())
    ref = TIMED_MODELS[1]
    for i, mode in enumerate(('infer', 'train')):
        med = medians(time_interleaved({n: s[i] for n, s in steps.items()}, cfg['iters'], cfg['warmup'], device))
        for n in TIMED_MODELS:
            result[f'{n}_{mode}_s'] = med[n]
            result[f'{n}_{mode}_img_per_s'] = cfg['batch_size'] / med[n]
        result[f'{mode}_ratio'] = med[ref] / med[TIMED_MODELS[0]]
    for n, (infer, train) in steps.items():
        result[f'{n}_infer_peak_mb'] = peak_memory(infer, device) / 2 ** 20
        result[f'{n}_train_peak_mb'] = peak_memory(train, device) / 2 ** 20
    return result


# --------------------------------------------------------------------------------------------
# the command


def _devices(spec: str) -> List[torch.device]:
    if spec == 'auto':
        return [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise UsageError(f'--device: {e}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {spec}: CUDA is not available on this machine (torch {torch.__version__}, '
                         f'built with CUDA {torch.version.cuda})')
    return [device]


def _fmt_errs(r: dict) -> str:
    if 'error' in r:
        return r['error']
    return ' '.join(f'{k[:-4]}={v:.1e}' for k, v in r.items() if k.endswith('_err'))


def run_checks(devices: Sequence[torch.device], timing: bool = True,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """ Everything the command reports, as one JSON-ready dict (``ok``: every check passed). """
    t0 = time.perf_counter()
    report = {'versions': versions(), 'devices': {}, 'checks': [], 'timing': []}
    for device in devices:
        report['devices'][str(device)] = device_info(device)
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16] if device.type == 'cuda' else [])
        for results in (check_op(device, dtypes), check_layer(device)):
            for r in results:
                log(f'{"ok  " if r["ok"] else "FAIL"} {r["device"]:6s} {r["dtype"]:8s} {r["check"]:50s} '
                    f'tol {r["tol"]:.0e}  {_fmt_errs(r)}')
            report['checks'].extend(results)
        if timing:
            try:
                report['timing'].append(check_timing(device))
            except Exception as e:  # e.g. out of memory: reported, not a failed check
                report['timing'].append({'device': str(device), 'error': f'{type(e).__name__}: {e}'[:500]})
    report['ok'] = all(r['ok'] for r in report['checks'])
    report['seconds'] = time.perf_counter() - t0
    return report


def print_report(report: dict):
    v = report['versions']
    print('versions: ' + ', '.join(f'{k} {val}' for k, val in v.items() if k not in ('platform',)))
    print(f'platform: {v["platform"]}')
    for dev, info in report['devices'].items():
        extra = ''.join(f', {k} {info[k]}' for k in ('capability', 'memory_gb') if k in info)
        print(f'{dev}: {info["name"]}{extra}; kernel: {info["kernel"]} ({info["why"]})')
    failed = [r for r in report['checks'] if not r['ok']]
    print(f'\ncorrectness against the float64 oracle: {len(report["checks"]) - len(failed)} of '
          f'{len(report["checks"])} checks passed (max absolute errors; bf16 / fp16 tolerances scale with the values)')
    worst: Dict[tuple, dict] = {}
    for r in report['checks']:
        key = (r['device'], r['dtype'])
        e = max([v for k, v in r.items() if k.endswith('_err')] + [float('inf') if 'error' in r else 0.])
        if key not in worst or e > worst[key]['e']:
            worst[key] = {'e': e, 'check': r['check']}
    for (dev, dt), w in worst.items():
        print(f'  {dev:6s} {dt:8s} largest error {w["e"]:.1e}  ({w["check"]})')
    for r in failed:
        print(f'  FAILED {r["device"]} {r["dtype"]} {r["check"]}: tolerance {r["tol"]:.1e}, {_fmt_errs(r)}')
    for t in report['timing']:
        a, b = TIMED_MODELS
        if 'error' in t:
            print(f'\ntiming on {t["device"]} failed: {t["error"]}')
            continue
        load = '' if t['load_average'] is None else f', load average {t["load_average"]:.1f}'
        print(f'\ntiming on {t["device"]}: batch {t["batch_size"]}, 224x224, median of {t["iters"]} interleaved '
              f'steps, threads {t["threads"]}, autocast {t["amp"] or "off"}{load}')
        print(f'  {"model":12s}{"infer img/s":>13s}{"train img/s":>13s}{"infer peak MB":>15s}{"train peak MB":>15s}')
        for n in (a, b):
            print(f'  {n:12s}{t[f"{n}_infer_img_per_s"]:13.2f}{t[f"{n}_train_img_per_s"]:13.2f}'
                  f'{t[f"{n}_infer_peak_mb"]:15.1f}{t[f"{n}_train_peak_mb"]:15.1f}')
        print(f'  {a} / {b}: inference {t["infer_ratio"]:.2f}x, train step {t["train_ratio"]:.2f}x '
              '(docs/PERF.md has the expected ratios; on a busy machine, load above the cores, they are noise)')
    print(f'\n{"all checks passed" if report["ok"] else "SOME CHECKS FAILED"} ({report["seconds"]:.0f} s)')


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f'--threads must be at least 1, got {args.threads}')
        torch.set_num_threads(args.threads)
    if args.output and os.path.exists(args.output) and not args.overwrite:
        raise UsageError(f'--output {args.output} exists; pass --overwrite to replace it')
    devices = _devices(args.device)
    report = run_checks(devices, timing=not args.no_timing, log=lambda s: print(s, file=sys.stderr, flush=True))
    print_report(report)
    if args.output:
        tmp = f'{args.output}.tmp'
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=1)
        os.replace(tmp, args.output)
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(run_cli(main))
