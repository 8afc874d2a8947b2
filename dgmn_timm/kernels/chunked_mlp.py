""" Row-chunked transformer MLP, ``fc2(gelu(fc1(x)))``, for large token counts on CPU.

The MLP's hidden activation is ``mlp_ratio`` times wider than the tokens: for DGMN2-Tiny's
stage 1 at batch 8 and 224 x 224 it is a (25088, 512) float32 tensor, 51 MB, and the plain
composition writes three of them per training step (fc1's output, GELU's output, and the
gradient that fc2's backward produces). Allocations that large are fresh memory on every call
(glibc serves anything above 32 MiB with ``mmap``), so they are page-faulted each time, and
none of them fits in cache.

Every row of the MLP is independent, so this computes it a block of rows at a time, each
block's hidden activation a few MB:

- forward: ``h = fc1(x_blk)``, ``a = gelu(h)``, ``y_blk = fc2(a)`` written into the output.
  Only ``h`` is kept for the backward (the plain path keeps ``h`` and ``a``); without autograd
  nothing is kept and GELU runs in place.
- backward, per block: ``a`` recomputed from ``h`` (in cache), ``dW2 += dy^T a``,
  ``dh = gelu'(h) * (dy W2)`` in place, ``dW1 += dh^T x``, ``dx_blk = dh W1``.

Outputs equal the plain composition exactly (the same per-row products); weight gradients
are sums over the same terms in blocks, equal to rounding. Double backward
(``create_graph=True``) recomputes the block with autograd, so it stays differentiable.

``RowBlockedMlp`` is a drop-in for timm's ``Mlp`` (same arguments and key names) that runs
this, for DGMN2's ``mlp_layer=`` argument. docs/PERF.md has its measured effect.
"""
from typing import List, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['chunked_mlp', 'RowBlockedMlp', 'use_chunked_mlp', 'CHUNKED_MLP_MIN_BYTES', 'CHUNKED_MLP_BLOCK_BYTES']

# hidden activations from this size on are computed faster in blocks (docs/PERF.md)
CHUNKED_MLP_MIN_BYTES = 32 * 2 ** 20
# bytes of hidden activation per block (1024 rows of DGMN2 stage 1, 512 of stage 2)
CHUNKED_MLP_BLOCK_BYTES = 2 * 2 ** 20


def use_chunked_mlp(x: torch.Tensor, hidden: int, weight: torch.Tensor) -> bool:
    """ Whether ``RowBlockedMlp`` is expected to beat the plain MLP on inputs like ``x`` (..., C).

    CPU tensors (CUDA has a caching allocator), float32 or float64 like the weights (bfloat16 /
    float16 weight gradients would be rounded once per block instead of once), and a
    ``hidden``-wide activation of at least ``CHUNKED_MLP_MIN_BYTES``. Nothing calls it per
    forward: it helps choose ``mlp_layer`` for a workload.
    """
    if x.device.type != 'cpu' or x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.float64):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * hidden * x.element_size() >= CHUNKED_MLP_MIN_BYTES


def _block_rows(hidden: int, element_size: int) -> int:
    return max(64, CHUNKED_MLP_BLOCK_BYTES // (hidden * element_size))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class _ChunkedMlp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        N = x.shape[0]
        hidden = w1.shape[0]
        step = _block_rows(hidden, x.element_size())
        keep = any(ctx.needs_input_grad)
        out = x.new_empty(N, w2.shape[0])
        hs: List[torch.Tensor] = []
        for s in range(0, N, step):
            h = _linear(x[s:s + step], w1, b1, x.new_empty(min(step, N - s), hidden))
            if keep:
                hs.append(h)
                a = F.gelu(h)
            else:
                a = torch.ops.aten.gelu_(h)
            _linear(a, w2, b2, out[s:s + step])
        if keep:
            ctx.save_for_backward(x, w1, b1, w2, b2, *hs)
            ctx.step = step
        return out

    @staticmethod
    def backward(ctx, gy):
        x, w1, b1, w2, b2, *hs = ctx.saved_tensors
        if torch.is_grad_enabled():
            return _ChunkedMlp._backward_differentiable(ctx, gy, x, w1, b1, w2, b2)
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        step = ctx.step
        gy = gy.contiguous()
        dx = torch.empty_like(x) if need_x else None
        dw1 = torch.zeros_like(w1) if need_w1 else None
        db1 = torch.zeros_like(b1) if need_b1 else None
        dw2 = torch.zeros_like(w2) if need_w2 else None
        for i, h in enumerate(hs):
            s = i * step
            g = gy[s:s + step]
            if dw2 is not None:
                dw2.addmm_(g.t(), F.gelu(h))
            if dx is None and dw1 is None and db1 is None:
                continue
            dh = torch.mm(g, w2)
            torch.ops.aten.gelu_backward.grad_input(dh, h, grad_input=dh)
            if dw1 is not None:
                dw1.addmm_(dh.t(), x[s:s + step])
            if db1 is not None:
                db1.add_(dh.sum(0))
            if dx is not None:
                torch.mm(dh, w1, out=dx[s:s + step])
        db2 = gy.sum(0) if need_b2 else None
        return dx, dw1, db1, dw2, db2

    @staticmethod
    def _backward_differentiable(ctx, gy, x, w1, b1, w2, b2):
        """ Under ``create_graph=True``: the plain composition's gradients, with a graph. """
        inputs = (x, w1, b1, w2, b2)
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
        y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
        grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


def chunked_mlp(
        x: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: Optional[torch.Tensor],
        fc2_weight: torch.Tensor,
        fc2_bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """ ``F.linear(F.gelu(F.linear(x, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)`` in row blocks.

    ``x`` is (..., C); any leading shape. Exact (erf) GELU, as ``nn.GELU()``.
    """
    if fc1_weight.dim() != 2 or fc2_weight.dim() != 2 or x.shape[-1] != fc1_weight.shape[1] \
            or fc2_weight.shape[1] != fc1_weight.shape[0]:
        raise ValueError(
            f'chunked_mlp: shapes do not chain: x {tuple(x.shape)}, fc1 {tuple(fc1_weight.shape)}, '
            f'fc2 {tuple(fc2_weight.shape)}')
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    out = _ChunkedMlp.apply(x2, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return out.view(*lead, fc2_weight.shape[0])


class RowBlockedMlp(nn.Module):
    """ timm's ``Mlp`` (fc1 -> exact GELU -> fc2, the same arguments and key names) run by :func:`chunked_mlp`.

    Chosen at construction as DGMN2's MLP: ``timm.create_model('dgmn2_tiny', mlp_layer=RowBlockedMlp)``;
    its state dict is interchangeable with the default ``Mlp``'s. It pays off for large maps on CPU
    in eager mode (see :func:`use_chunked_mlp`). GELU only, no dropout.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            bias: bool = True,
            drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if act_layer is not nn.GELU or drop:
            raise ValueError('RowBlockedMlp computes fc2(gelu(fc1(x))) only: use act_layer=nn.GELU and drop=0 '
                             '(or timm.layers.Mlp)')
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return chunked_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
