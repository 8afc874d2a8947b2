""" Bilinear sampling and the 3x3 node grid, each defined once for the package.

Pixel convention: pixel i of an axis covers [i - 0.5, i + 0.5], so pixel centres sit at integer
coordinates (``grid_sample``'s ``align_corners=False``; a pixel coordinate p on an axis of length
L is its normalised coordinate (2p + 1) / L - 1). A read at p mixes pixels floor(p) and
floor(p) + 1 with weights 1 - frac(p) and frac(p), and a pixel outside the map reads zero (the
deformable-convolution convention). :func:`axis_corners` computes those indices and weights; the
op's CPU kernel (forward and backward, so the visualisation's attention weights too) uses it.
:func:`pixel_grid` states the same convention for ``grid_sample``, which :func:`sample_nodes` calls
(faster there than gathers, ONNX-exportable, twice differentiable). The Triton kernel has its
own copy in Triton. All are tested against one float64 oracle (``dgmn_timm.ops.reference``).

The node grid: for every output position (y, x), K = 9 nodes are read at

    (y + (i - 1) * d + dy_k,  x + (j - 1) * d + dx_k),   k = 3 * i + j,  i, j in 0..2

(a 3x3 neighbourhood with dilation d, :func:`node_displacements`, plus a predicted fractional
walk). Walks follow the deformable-convolution layout: channel 2k holds dy_k (rows) and channel
2k + 1 holds dx_k (columns).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['axis_corners', 'node_displacements', 'pixel_grid', 'sample_nodes', 'KERNEL_SIZE', 'NUM_NODES']

KERNEL_SIZE = 3
NUM_NODES = KERNEL_SIZE * KERNEL_SIZE


def node_displacements(
        dilation: int = 1, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ (K, 2) displacement (dy, dx) of node k = 3i + j of the 3x3 grid from its query: ((i - 1) d, (j - 1) d). """
    k = torch.arange(9, device=device)  # literals: TorchScript cannot close over NUM_NODES / KERNEL_SIZE
    return torch.stack((k // 3 - 1, k % 3 - 1), dim=1).to(dtype) * dilation


def axis_corners(
        p: torch.Tensor, length: int, index_dtype: torch.dtype = torch.int64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ The two pixels a bilinear read at coordinate ``p`` (any shape) mixes on an axis of ``length`` pixels.

    Returns:
        i0, i1: indices of pixels floor(p) and floor(p) + 1, clamped into the map (always safe to
            gather; a pixel outside has weight zero).
        w0, w1: their weights 1 - frac(p) and frac(p), zero for a pixel outside the map.
        in0, in1: whether each pixel is inside the map; the
            derivatives of w0 and w1 by p are -in0 and in1 (the right derivative at integers; zero
            beyond -1 and length, where both pixels are outside).
    """
    # beyond -1 / length both pixels are outside: both weights and their gradients are zero there
    lo = torch.floor(p)
    frac = p - lo
    in0 = (lo >= 0.) & (lo <= length - 1)
    in1 = (lo >= -1.) & (lo <= length - 2)
    w0 = (1. - frac) * in0
    w1 = frac * in1
    i0 = lo.to(index_dtype)
    return i0.clamp(0, length - 1), (i0 + 1).clamp(0, length - 1), w0, w1, in0, in1


def pixel_grid(py: torch.Tensor, px: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """ ``grid_sample`` coordinates (..., 2) = (gx, gy) of pixel positions ``py``, ``px`` (any shape):
    the same convention for code that samples with ``grid_sample``. """
    gy = (2. * py + 1.) / height - 1.
    gx = (2. * px + 1.) / width - 1.
    return torch.stack((gx, gy), dim=-1)


def sample_nodes(
        x: torch.Tensor,
        offset: torch.Tensor,
        dilation: int = 1,
) -> torch.Tensor:
    """ Bilinearly sample the K = 9 nodes of every position of ``x`` (module doc).

    Args:
        x: (B, C, H, W) map. To sample keys and values at the same points, concatenate
            them along C and split the result.
        offset: (B, 2K, H, W) walks (deformable-conv layout, (dy, dx) per node).
        dilation: spacing of the base 3x3 neighbourhood.

    Returns:
        (B, C, K, H * W) sampled nodes, same dtype as ``x``. Coordinates and reads are float32
        for float32 / half-precision inputs (half precision cannot address the pixels of a
        56-wide map to better than ~1/8 px) and float64 for float64 walks: ordinary type
        promotion against the float32 base grid, no branch on the dtype (FX traces it).
    """
    B, C, H, W = x.shape
    base = node_displacements(dilation, x.device)  # (K, 2) float32
    K = base.shape[0]
    N = H * W
    off = offset.reshape(B, K, 2, N).transpose(2, 3)  # (B, K, N, 2)
    ys = torch.arange(H, device=x.device, dtype=torch.float32).view(H, 1).expand(H, W).reshape(1, 1, N)
    xs = torch.arange(W, device=x.device, dtype=torch.float32).view(1, W).expand(H, W).reshape(1, 1, N)
    py = off[..., 0] + (ys + base[:, 0].view(1, K, 1))
    px = off[..., 1] + (xs + base[:, 1].view(1, K, 1))
    # grid_sample reads with the same convention as axis_corners and is 2x faster here (forward and
    # backward) than four gathers, exports to ONNX and has a double backward
    grid = pixel_grid(py, px, H, W)
    # input and grid of one dtype: reduced precision maps are sampled in float32 (``.to`` returns the
    # map itself when the dtypes already agree)
    out = F.grid_sample(x.to(grid.dtype), grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return out.to(x.dtype)
