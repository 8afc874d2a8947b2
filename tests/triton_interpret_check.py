""" Run by tests/test_perf.py in a subprocess with TRITON_INTERPRET=1 (it must be set before
triton is imported): the Triton kernels on CPU tensors, forward and gradients, against the
float64 reference. Exit 77 = interpreter unavailable. """
import os
import sys

assert os.environ.get('TRITON_INTERPRET') == '1'
try:
    import triton  # noqa: F401
    from dgmn_timm.ops.triton_sampled_attention import triton_backward, triton_forward
except Exception as e:  # pragma: no cover
    print('unavailable:', type(e).__name__, e)
    sys.exit(77)

import torch  # noqa: E402

from dgmn_timm.ops import sampled_attention_reference  # noqa: E402


def inputs(B, H, W, nh, hd, K, walk, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3, nh, hd, generator=g, dtype=torch.float64)
    off = torch.randn(B, H, W, nh, 2 * K, generator=g, dtype=torch.float64) * walk
    b = torch.randn(B, H, W, nh, K, generator=g, dtype=torch.float64) if bias else None
    return qkv, off, b


failures = []
for (B, H, W, nh, hd, K, walk, bias) in [(2, 5, 4, 2, 8, 9, 1.5, True), (1, 1, 1, 1, 16, 9, 1.0, True),
                                         (1, 3, 6, 1, 12, 1, 3.0, False), (1, 4, 3, 2, 4, 27, 2.0, True)]:
    qkv, off, b = inputs(B, H, W, nh, hd, K, walk, bias)
    if K > 1:
        off[..., :2] += 1e4  # node 0 far outside: zero reads, zero gradient
    scale = hd ** -0.5
    args = [t.requires_grad_() for t in (qkv, off, b) if t is not None]
    ref = sampled_attention_reference(qkv, off, b, scale)
    go = torch.randn(ref.shape, dtype=torch.float64)
    refg = torch.autograd.grad(ref, args, go)
    f32 = [t.detach().float() for t in (qkv, off)] + [None if b is None else b.detach().float()]
    out, lse = triton_forward(*f32, scale)
    grads = triton_backward(go.float(), *f32, out, lse, scale)
    err = (out.double() - ref).abs().max().item()
    gerr = [(g.double() - r).abs().max().item() for g, r in zip(grads, refg)]
    print((B, H, W, nh, hd, K, bias), 'forward', err, 'grads', gerr)
    if err > 1e-5 or max(gerr) > 1e-4:
        failures.append((B, H, W, nh, hd, K))
# reduced precision inputs, float32 math inside
qkv, off, b = inputs(1, 4, 4, 2, 8, 9, 1.5, True)
off = off.round() + 0.25
bf = [t.bfloat16() for t in (qkv, off, b)]
out, lse = triton_forward(*bf, 8 ** -0.5)
ref = sampled_attention_reference(*[t.double() for t in bf], 8 ** -0.5)
err = (out.double() - ref).abs().max().item()
grads = triton_backward(torch.ones_like(out), *bf, out, lse, 8 ** -0.5)
print('bfloat16 forward', err, out.dtype, [g.dtype for g in grads])
if err > 3e-2 or out.dtype != torch.bfloat16 or any(g.dtype != torch.bfloat16 for g in grads):
    failures.append('bf16')
# the op's Triton glue with the position tables (pos_h, pos_w, released height term), float32
from dgmn_timm.ops.sampled_attention import _triton_attend, _triton_attend_backward  # noqa: E402
for (B, H, W, nh, hd) in [(2, 4, 6, 2, 8), (1, 5, 5, 1, 4)]:
    qkv, off, b = inputs(B, H, W, nh, hd, 9, 1.5, True, seed=2)
    g = torch.Generator().manual_seed(3)
    pos_h, pos_w = (torch.randn(L, 9, hd, generator=g, dtype=torch.float64) for L in (H, W))
    args = [t.requires_grad_() for t in (qkv, off, b, pos_h, pos_w)]
    ref = sampled_attention_reference(qkv, off, b, 0.4, pos_h, pos_w, True)
    go = torch.randn(ref.shape, dtype=torch.float64)
    refg = torch.autograd.grad(ref, args, go)
    f32 = [t.detach().float() for t in args]
    out, lse, _ = _triton_attend(*f32[:3], 0.4, *f32[3:], True)
    grads = _triton_attend_backward(go.float(), *f32, out, lse, 0.4, True, True, True)
    err = (out.double() - ref).abs().max().item()
    gerr = [(g.double() - r).abs().max().item() for g, r in zip(grads, refg)]
    print((B, H, W, nh, hd), 'position tables: forward', err, 'grads', gerr)
    if err > 1e-5 or max(gerr) > 1e-4:
        failures.append(('pos', B, H, W, nh, hd))
print('FAILED' if failures else 'OK', failures)
sys.exit(1 if failures else 0)
