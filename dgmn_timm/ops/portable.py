""" The sampled-attention op as plain PyTorch ops (``grid_sample``): scriptable, ONNX-exportable,
autograd-native. Same function as ``torch.ops.dgmn_timm.sampled_attention``. """
from typing import Optional

import torch
import torch.nn.functional as F

from .sampling import pixel_grid


def sampled_attention_portable(
        qkv: torch.Tensor,
        offset: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: float,
        attn_drop: float = 0.,
        training: bool = False,
) -> torch.Tensor:
    """ :func:`sampled_attention` as ``grid_sample`` plus plain ops: scriptable, ONNX-exportable,
    autograd-native (double backward), with dropout ``attn_drop`` on the weights when ``training``.

    Coordinates are built in float32 (float64 for float64 offsets) by type promotion against a
    float32 base grid; half-precision maps are sampled in float32.
    """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    N = H * W
    q = qkv[:, :, :, 0].permute(0, 3, 4, 1, 2).reshape(B * nh, hd, N, 1)
    kv = qkv[:, :, :, 1:].permute(0, 4, 3, 5, 1, 2).reshape(B * nh, 2 * hd, H, W)
    off = offset.reshape(B, H, W, nh, K, 2).permute(0, 3, 1, 2, 4, 5).reshape(B * nh, H, W, K, 2)
    ys = torch.arange(H, device=qkv.device, dtype=torch.float32).view(1, H, 1, 1)
    xs = torch.arange(W, device=qkv.device, dtype=torch.float32).view(1, 1, W, 1)
    grid = pixel_grid(ys + off[..., 0], xs + off[..., 1], H, W).reshape(B * nh, N, K, 2)
    nodes = F.grid_sample(kv.to(grid.dtype), grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    nodes = nodes.to(qkv.dtype)  # (B * nh, 2 * hd, N, K): keys and values in one call
    logits = (q * nodes[:, :hd]).sum(1) * scale  # (B * nh, N, K)
    if bias is not None:
        logits = logits + bias.permute(0, 3, 1, 2, 4).reshape(B * nh, N, K)
    p = logits.softmax(dim=-1)
    p = F.dropout(p, attn_drop, training)
    out = (p.unsqueeze(1) * nodes[:, hd:]).sum(-1)  # (B * nh, hd, N)
    return out.reshape(B, nh, hd, H, W).permute(0, 3, 4, 1, 2)
