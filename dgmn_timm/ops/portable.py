""" The sampled-attention op as plain PyTorch ops: scriptable, FX-traceable, ONNX-exportable (standard
operators: Gather, MatMul, Softmax and elementwise ops), autograd-native. Same function as
``torch.ops.dgmn_timm.sampled_attention``.

Bilinear sampling is linear in the map, so a sampled key is a weighted sum of 4 rows of qkv (its
corners) and the attention reads the corners themselves, channels-last, as the CPU kernel does:

- the 4K corner rows of every query are gathered from qkv's key and value rows by flat index (a
  corner outside the map gets weight zero and a clamped, valid row);
- the query is contracted with its 4K key corners (one batched product), and the bilinear weights
  are applied to those dots: logit_k = scale * sum_c w_kc <q, k_c> + bias_k;
- the output is one batched product of the weights p_k * w_kc with the 4K value corners.

No transposes of qkv and no ``grid_sample``: ONNX Runtime runs the gathers as row copies and the
products as MatMul, and ``torch.compile`` fuses the gathers into the products.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .sampling import axis_corners


def corner_rows(offset: torch.Tensor, batch: int, height: int, width: int, heads: int
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Flat row indices and bilinear weights of the 4 corners of every node.

    Args:
        offset: (B, H, W, nh, 2K) node displacements (dy, dx) in pixels.

    Returns:
        index: (B, H, W, nh, K, 4) int64 row of each corner in a (B * H * W * nh)-row table ordered
            like qkv's rows (batch, y, x, head); a corner outside the map gets a clamped row.
        weight: (B, H, W, nh, K, 4) bilinear weights, zero for a corner outside the map; float32
            (float64 for float64 offsets).
    """
    K = offset.shape[-1] // 2
    off = offset.reshape(batch, height, width, heads, K, 2)
    ys = torch.arange(height, device=offset.device, dtype=torch.float32).view(1, height, 1, 1, 1)
    xs = torch.arange(width, device=offset.device, dtype=torch.float32).view(1, 1, width, 1, 1)
    iy0, iy1, wy0, wy1, _, _ = axis_corners(ys + off[..., 0], height)
    ix0, ix1, wx0, wx1, _, _ = axis_corners(xs + off[..., 1], width)
    yi = torch.stack((iy0, iy0, iy1, iy1), dim=-1)
    xi = torch.stack((ix0, ix1, ix0, ix1), dim=-1)
    weight = torch.stack((wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1), dim=-1)
    b = torch.arange(batch, device=offset.device).view(batch, 1, 1, 1, 1, 1) * (height * width)
    h = torch.arange(heads, device=offset.device).view(1, 1, 1, heads, 1, 1)
    index = (b + yi * width + xi) * heads + h
    return index, weight


def sampled_attention_portable(
        qkv: torch.Tensor,
        offset: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: float,
        attn_drop: float = 0.,
        training: bool = False,
) -> torch.Tensor:
    """ :func:`sampled_attention` as corner gathers and batched products (module doc): scriptable,
    ONNX-exportable, autograd-native (double backward), with dropout ``attn_drop`` on the weights
    when ``training``.

    The bilinear weights are float32 (float64 for float64 offsets); half-precision qkv is
    gathered and multiplied in its own dtype, the logits and weights are float32.
    """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    N = H * W
    # (B, N, nh, ...): the products' batch dims hold the map's size only as N = H * W, so that
    # torch.export proves every reshape for named size ranges
    index, weight = corner_rows(offset, B, H, W, nh)
    index = index.reshape(-1)
    weight = weight.reshape(B, N, nh, K, 4)
    qkv = qkv.reshape(B, N, 3, nh, hd)
    keys = qkv[:, :, 1].reshape(-1, hd).index_select(0, index).reshape(B, N, nh, 4 * K, hd)
    dots = torch.matmul(keys, qkv[:, :, 0].unsqueeze(-1)).reshape(B, N, nh, K, 4)
    logits = (dots * weight).sum(-1) * scale  # (B, N, nh, K)
    if bias is not None:
        logits = logits + bias.reshape(B, N, nh, K)
    p = logits.softmax(dim=-1)
    p = F.dropout(p, attn_drop, training)
    pw = (p.unsqueeze(-1) * weight).reshape(B, N, nh, 1, 4 * K).to(qkv.dtype)
    values = qkv[:, :, 2].reshape(-1, hd).index_select(0, index).reshape(B, N, nh, 4 * K, hd)
    return torch.matmul(pw, values).reshape(B, H, W, nh, hd)
