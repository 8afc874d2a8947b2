""" Float64 oracles of the ops: slow, explicit loops and integer indexing, no fused kernels, no
``grid_sample`` and no ``interpolate``. The tests and ``python -m dgmn_timm.check`` compare the ops
against these; each is written here once.

- :func:`bilinear_reference`: one bilinear read (zero outside the map, pixel centres at integer
  coordinates: ``grid_sample``'s ``align_corners=False`` convention).
- :func:`sampled_attention_reference`: ``torch.ops.dgmn_timm.sampled_attention``, with its
  position tables.
- :func:`position_reference`: the op's position term from per-row / per-column tables.
- :func:`rel_pos_reference`: DGMN2's relative-position term from its two tables.
- :func:`sample_nodes_reference`: ``sampling.sample_nodes`` (the 3x3 grid plus walks).
"""
import math
from typing import Optional

import torch

from .sampled_attention import _check_inputs
from .sampling import NUM_NODES, node_displacements

__all__ = [
    'bilinear_reference', 'sampled_attention_reference', 'position_reference', 'rel_pos_reference',
    'sample_nodes_reference', 'resize_matrix',
]


def bilinear_reference(img: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """ Read the (H, W, C) map ``img`` at pixel coordinates (py, px) (any shape P): the 4 corners by
    integer indexing, a corner outside the map reading zero. Differentiable. Returns (*P, C). """
    H, W, C = img.shape
    y0, x0 = torch.floor(py), torch.floor(px)
    out = img.new_zeros(py.shape + (C,))
    flat = img.reshape(H * W, C)
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            weight = (1 - (py - yi).abs()) * (1 - (px - xi).abs())
            inside = (yi >= 0) & (yi <= H - 1) & (xi >= 0) & (xi <= W - 1)
            row = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).long()
            out = out + (weight * inside).unsqueeze(-1) * flat[row.reshape(-1)].reshape(py.shape + (C,))
    return out


def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """ (n_out, n_in) float64 matrix of a 1-d bilinear resize (``align_corners=False``). """
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def position_reference(
        q: torch.Tensor, pos_h: Optional[torch.Tensor], pos_w: Optional[torch.Tensor],
        rel_pos_released: bool = False) -> torch.Tensor:
    """ The op's position term, one pixel at a time: q (B, H, W, nh, hd) unscaled queries, pos_h (H, K, hd),
    pos_w (W, K, hd) (either may be None) -> (B, H, W, nh, K) float64. With ``rel_pos_released`` the
    (H, W) grid of height terms is transposed and that (W, H) image resized to (H, W). """
    q = q.double()
    B, H, W, nh, _ = q.shape
    K = (pos_h if pos_h is not None else pos_w).shape[1]
    height = q.new_zeros(B, H, W, nh, K)
    width = q.new_zeros(B, H, W, nh, K)
    for y in range(H):
        for x in range(W):
            if pos_h is not None:
                height[:, y, x] = q[:, y, x] @ pos_h[y].double().t()
            if pos_w is not None:
                width[:, y, x] = q[:, y, x] @ pos_w[x].double().t()
    if rel_pos_released:
        # the transposed grid, (W, H), resized to (H, W) by explicit resize matrices
        image = height.transpose(1, 2)
        height = torch.einsum('iw,bwhnk,jh->bijnk', resize_matrix(W, H), image, resize_matrix(H, W))
    return height + width


def rel_pos_reference(
        q: torch.Tensor, rel_height: torch.Tensor, rel_width: torch.Tensor, rel_pos_released: bool = True,
        num_nodes: int = NUM_NODES) -> torch.Tensor:
    """ DGMN2's relative-position logits: q (B, H, W, nh, c), tables (L, c) resized to H + K - 1 /
    W + K - 1 rows; node m of the query at (y, x) gets <q, height[H - 1 - y + m]> + <q, width[W - 1 - x + m]>
    (the height term released-style with ``rel_pos_released``). Returns (B, H, W, nh, K) float64. """
    _, H, W, _, _ = q.shape
    K = num_nodes
    th = resize_matrix(rel_height.shape[0], H + K - 1) @ rel_height.double()
    tw = resize_matrix(rel_width.shape[0], W + K - 1) @ rel_width.double()
    pos_h = torch.stack([torch.stack([th[H - 1 - y + m] for m in range(K)]) for y in range(H)])
    pos_w = torch.stack([torch.stack([tw[W - 1 - x + m] for m in range(K)]) for x in range(W)])
    return position_reference(q, pos_h, pos_w, rel_pos_released)


def sampled_attention_reference(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        pos_h: Optional[torch.Tensor] = None, pos_w: Optional[torch.Tensor] = None,
        rel_pos_released: bool = False) -> torch.Tensor:
    """ Slow float64 oracle of :func:`sampled_attention`: explicit loops over images, heads and nodes,
    :func:`bilinear_reference` reads, :func:`position_reference` for the tables. Differentiable.
    Returns float64. """
    K = _check_inputs(qkv, offset, bias, pos_h, pos_w)
    qkv = qkv.double()
    offset = offset.double()
    B, H, W, _, nh, hd = qkv.shape
    if pos_h is not None or pos_w is not None:
        pos = position_reference(qkv[:, :, :, 0], pos_h, pos_w, rel_pos_released)
        bias = pos if bias is None else bias.double() + pos
    ys = torch.arange(H, dtype=torch.float64, device=qkv.device).view(H, 1)
    xs = torch.arange(W, dtype=torch.float64, device=qkv.device).view(1, W)
    images = []
    for b in range(B):
        heads = []
        for h in range(nh):
            q, k, v = qkv[b, :, :, 0, h], qkv[b, :, :, 1, h], qkv[b, :, :, 2, h]  # (H, W, hd)
            logits, values = [], []
            for n in range(K):
                py = ys + offset[b, :, :, h, 2 * n]
                px = xs + offset[b, :, :, h, 2 * n + 1]
                logit = scale * (q * bilinear_reference(k, py, px)).sum(-1)
                if bias is not None:
                    logit = logit + bias[b, :, :, h, n].double()
                logits.append(logit)
                values.append(bilinear_reference(v, py, px))
            p = torch.stack(logits, -1).softmax(-1)
            heads.append(sum(p[..., n, None] * values[n] for n in range(K)))
        images.append(torch.stack(heads, 2))
    return torch.stack(images)


def sample_nodes_reference(x: torch.Tensor, offset: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """ Oracle of ``sampling.sample_nodes``: x (B, C, H, W), offset (B, 2K, H, W) walks (dy, dx) per node
    from the 3x3 grid of spacing ``dilation``. Returns (B, C, K, H * W) float64. """
    x = x.double()
    offset = offset.double()
    B, C, H, W = x.shape
    base = node_displacements(dilation, dtype=torch.float64)
    ys = torch.arange(H, dtype=torch.float64).view(H, 1)
    xs = torch.arange(W, dtype=torch.float64).view(1, W)
    out = []
    for b in range(B):
        img = x[b].permute(1, 2, 0)  # (H, W, C)
        nodes = [bilinear_reference(img, ys + base[k, 0] + offset[b, 2 * k], xs + base[k, 1] + offset[b, 2 * k + 1])
                 for k in range(NUM_NODES)]
        out.append(torch.stack(nodes).permute(3, 0, 1, 2))  # (C, K, H, W)
    return torch.stack(out).reshape(B, C, NUM_NODES, H * W)
