""" Deformable node sampling shared by DGMN2 attention and the DGMN v1 module.

For every output position (y, x) of a (B, C, H, W) map, K = 9 nodes are read at

    (y - d + i * d + dy_k,  x - d + j * d + dx_k),   k = 3 * i + j,  i, j in 0..2

(a 3x3 neighbourhood with dilation d, plus a predicted fractional walk). Reads are
bilinear and a corner outside the map contributes zero (the deformable conv v1
convention). ``F.grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``
computes exactly that when a pixel coordinate p on an axis of length L is given as the
normalised coordinate (2p + 1) / L - 1.

Offsets follow the deformable-convolution layout: channel 2k holds dy_k (rows) and
channel 2k + 1 holds dx_k (columns).

``sample_nodes`` is the fast path used by the models. ``sample_nodes_reference`` is a
slow float64 oracle written with explicit corner gathers; tests compare the two.
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['sample_nodes', 'sample_nodes_reference', 'node_grid', 'pixel_grid', 'KERNEL_SIZE', 'NUM_NODES']

KERNEL_SIZE = 3
NUM_NODES = KERNEL_SIZE * KERNEL_SIZE


def node_displacements(
        dilation: int = 1, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ (K, 2) displacement (dy, dx) of node k = 3i + j of the 3x3 grid from its query: ((i - 1) d, (j - 1) d). """
    k = torch.arange(9, device=device)  # literals: TorchScript cannot close over NUM_NODES / KERNEL_SIZE
    return torch.stack((k // 3 - 1, k % 3 - 1), dim=1).to(dtype) * dilation


def pixel_grid(py: torch.Tensor, px: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ grid_sample coordinates (..., 2) = (gx, gy) of pixel positions ``py``, ``px`` (any shape).

    A pixel coordinate p on an axis of length L is the normalised coordinate (2p + 1) / L - 1
    (``align_corners=False``).
    """
    gy = (2. * py + 1.) / height - 1.
    gx = (2. * px + 1.) / width - 1.
    return torch.stack((gx, gy), dim=-1)


def node_grid(
        offset_y: torch.Tensor,
        offset_x: torch.Tensor,
        height: int,
        width: int,
        dilation: int = 1,
) -> torch.Tensor:
    """ Normalised grid_sample coordinates of the K nodes of every position.

    Args:
        offset_y, offset_x: (B, K, H * W) row / column walks in pixels.
        height, width: map size.
        dilation: spacing of the 3x3 neighbourhood.

    Returns:
        (B, K, H * W, 2) grid of (gx, gy). The base coordinates are float32, so ordinary type
        promotion makes the grid float32 for float32 / half-precision walks (half precision
        cannot address the pixels of a 56-wide map to better than ~1/8 px) and float64 for
        float64 walks, without a branch on the dtype (FX can trace it).
    """
    device = offset_y.device
    num_nodes, ks = 9, 3  # literals: TorchScript cannot close over module globals
    k = torch.arange(num_nodes, device=device)
    # node k = 3i + j sits at (-d + i*d, -d + j*d) around its query
    ky = ((k // ks) - 1).to(torch.float32) * dilation
    kx = ((k % ks) - 1).to(torch.float32) * dilation
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    # base pixel coordinates, (K, H*W)
    base_y = (ky[:, None, None] + ys[None, :, None]).expand(num_nodes, height, width).reshape(num_nodes, -1)
    base_x = (kx[:, None, None] + xs[None, None, :]).expand(num_nodes, height, width).reshape(num_nodes, -1)
    return pixel_grid(base_y + offset_y, base_x + offset_x, height, width)


def sample_nodes(
        x: torch.Tensor,
        offset: torch.Tensor,
        dilation: int = 1,
        offset_channels_last: bool = False,
) -> torch.Tensor:
    """ Bilinearly sample the K = 9 nodes of every position of ``x``.

    Args:
        x: (B, C, H, W) map. To sample keys and values at the same points, concatenate
            them along C and split the result.
        offset: (B, 2K, H, W) walks (deformable-conv layout, (dy, dx) per node), or
            (B, H * W, 2K) when ``offset_channels_last`` is True (the layout a Linear
            over tokens produces).
        dilation: spacing of the base 3x3 neighbourhood.
        offset_channels_last: layout of ``offset``, see above.

    Returns:
        (B, C, K, H * W) sampled nodes, same dtype as ``x``.
    """
    B, C, H, W = x.shape
    num_nodes = 9
    if offset_channels_last:
        off = offset.reshape(B, H * W, num_nodes, 2).permute(0, 2, 1, 3)
    else:
        off = offset.reshape(B, num_nodes, 2, H * W).transpose(2, 3)
    grid = node_grid(off[..., 0], off[..., 1], H, W, dilation)
    # grid_sample needs input and grid of one dtype: reduced precision maps are sampled in
    # float32 (``.to`` returns the map itself when the dtypes already agree)
    out = F.grid_sample(x.to(grid.dtype), grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return out.to(x.dtype)


def sample_nodes_reference(
        x: torch.Tensor,
        offset: torch.Tensor,
        dilation: int = 1,
) -> torch.Tensor:
    """ Slow, obviously-correct oracle for :func:`sample_nodes` (float64, explicit corners).

    Same arguments as ``sample_nodes`` with ``offset`` in (B, 2K, H, W) layout.
    Returns (B, C, K, H * W) in float64.
    """
    x = x.double()
    offset = offset.double()
    B, C, H, W = x.shape
    out = x.new_zeros(B, C, NUM_NODES, H, W)
    ys = torch.arange(H, dtype=torch.float64).view(H, 1).expand(H, W)
    xs = torch.arange(W, dtype=torch.float64).view(1, W).expand(H, W)
    for k in range(NUM_NODES):
        i, j = divmod(k, KERNEL_SIZE)
        py = ys - dilation + i * dilation + offset[:, 2 * k]  # (B, H, W)
        px = xs - dilation + j * dilation + offset[:, 2 * k + 1]
        y0 = torch.floor(py)
        x0 = torch.floor(px)
        for cy, cx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            yi = y0 + cy
            xi = x0 + cx
            wy = 1. - (py - yi).abs()
            wx = 1. - (px - xi).abs()
            inside = (yi >= 0) & (yi <= H - 1) & (xi >= 0) & (xi <= W - 1)
            yc = yi.clamp(0, H - 1).long()
            xc = xi.clamp(0, W - 1).long()
            for b in range(B):
                vals = x[b][:, yc[b], xc[b]]  # (C, H, W)
                out[b, :, k] += vals * (wy[b] * wx[b] * inside[b].double())
    return out.reshape(B, C, NUM_NODES, H * W)
