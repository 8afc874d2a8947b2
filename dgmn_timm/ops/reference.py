""" Float64 oracles of the ops: slow, explicit loops and integer indexing, no fused kernels.
The tests and ``python -m dgmn_timm.check`` compare the ops against these. """
from typing import Optional

import torch
import torch.nn.functional as F

from .sampled_attention import _check_inputs


def sampled_attention_reference(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        pos_h: Optional[torch.Tensor] = None, pos_w: Optional[torch.Tensor] = None,
        rel_pos_released: bool = False) -> torch.Tensor:
    """ Slow float64 oracle of :func:`sampled_attention`: explicit loops over heads, nodes and the
    4 bilinear corners, reading the map by integer indexing (no ``grid_sample``); the position
    term one pixel at a time. Differentiable. Returns float64. """
    K = _check_inputs(qkv, offset, bias, pos_h, pos_w)
    qkv = qkv.double()
    offset = offset.double()
    B, H, W, _, nh, hd = qkv.shape
    if pos_h is not None or pos_w is not None:
        pos = torch.zeros(B, H, W, nh, K, dtype=torch.float64, device=qkv.device)
        for y in range(H):
            for x in range(W):
                q = qkv[:, y, x, 0]  # (B, nh, hd)
                if pos_h is not None:
                    # the height term computed at (y, x) of the (H, W) grid
                    pos[:, y, x] = pos[:, y, x] + q @ pos_h[y].double().t()
        if pos_h is not None and rel_pos_released:
            # that grid read as a (W, H) image, resized to (H, W)
            pos = pos.transpose(1, 2).reshape(B, W, H, nh * K).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(H, W), mode='bilinear', align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(B, H, W, nh, K)
        if pos_w is not None:
            width = torch.stack([qkv[:, :, x, 0] @ pos_w[x].double().t() for x in range(W)], dim=2)
            pos = pos + width
        bias = pos if bias is None else bias.double() + pos
    ys = torch.arange(H, dtype=torch.float64, device=qkv.device).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float64, device=qkv.device).view(1, 1, W)
    b = torch.arange(B, device=qkv.device).view(B, 1, 1)
    heads = []
    for h in range(nh):
        q, k, v = qkv[:, :, :, 0, h], qkv[:, :, :, 1, h], qkv[:, :, :, 2, h]  # (B, H, W, hd)
        logits, values = [], []
        for n in range(K):
            py = ys + offset[:, :, :, h, 2 * n]
            px = xs + offset[:, :, :, h, 2 * n + 1]
            y0, x0 = torch.floor(py), torch.floor(px)
            k_n = v_n = 0.
            for cy in (0, 1):
                for cx in (0, 1):
                    yi, xi = y0 + cy, x0 + cx
                    weight = (1 - (py - yi).abs()) * (1 - (px - xi).abs())
                    inside = (yi >= 0) & (yi <= H - 1) & (xi >= 0) & (xi <= W - 1)
                    weight = (weight * inside.double()).unsqueeze(-1)
                    yc, xc = yi.clamp(0, H - 1).long(), xi.clamp(0, W - 1).long()
                    k_n = k_n + weight * k[b, yc, xc]
                    v_n = v_n + weight * v[b, yc, xc]
            logit = scale * (q * k_n).sum(-1)
            if bias is not None:
                logit = logit + bias[:, :, :, h, n].double()
            logits.append(logit)
            values.append(v_n)
        p = torch.stack(logits, -1).softmax(-1)
        heads.append(sum(p[..., n, None] * values[n] for n in range(K)))
    return torch.stack(heads, 3)
