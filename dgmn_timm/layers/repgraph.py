""" RepGraph: the Representative Graph layer (ECCV 2020), and its non-local baseline

Paper: `Representative Graph Neural Network` - Changqian Yu, Yifan Liu, Changxin Gao,
    Chunhua Shen, Nong Sang (ECCV 2020), arXiv:2008.05202

A non-local layer lets every position attend to all H * W positions. RepGraph lets it
attend to S representative nodes instead, sampled at learned offsets:

    q, k, v = 1x1 convs (C_in -> C')                 (one conv producing 3 C' channels)
    o       = 1x1 conv (C_in -> 2S), pixels          (node n: o[2n] rows, o[2n + 1] columns)
    k_n, v_n = k, v read bilinearly at p + o_n(p)    (a corner outside the map reads zero)
    y_p     = sum_n softmax_n(<q_p, k_n>) v_n        (no 1/sqrt(C') scaling)
    out     = x + W_y y ('sum')  or  fuse([x, W_y y]) ('concat', 1x1 conv 2C -> C)

Structures: 'simple' applies the above to x (C_in = C, W_y a 1x1 conv C' -> C with bias);
'bottleneck' first reduces x (1x1 conv C -> C' + BN + ReLU), runs the above on the
reduced map (C_in = C'), and expands back (W_y = 1x1 conv C' -> C + BN).

Grid RepGraph (``grid`` = g > 1): the map is cut into g x g cells (the last row / column
of cells is cut short where g does not divide H or W). The offsets are regressed on the
cell averages (``avg_pool2d(kernel=g, stride=g, ceil_mode=True)``) and are the same for
all positions of a cell, measured from the cell's *anchor*: the centre of the cell's
pixels inside the map, ((y0 + y1) / 2, (x0 + x1) / 2) for a cell spanning rows y0..y1 and
columns x0..x1. So every position of a cell reads the same S nodes; the displacement
handed to the attention op is (anchor - position) + cell offset. g = 1 is plain RepGraph.

Group RepGraph (``groups`` = G > 1): the C' channels form G groups of C' / G, each with its
own softmax over the S nodes (the op's heads); all groups read the same nodes.

Initialisation: as an inserted layer the block is the identity: 'sum' zero-initialises the
last BN's weight (bottleneck) or W_y (simple); 'concat' starts its fuse conv as [I, 0]
(passing x through) and keeps W_y trainable. The offset conv keeps nn.Conv2d's default
(random, small offsets): zero would put all S nodes on the query itself, and identical
nodes get identical gradients and never separate.

The sampling and attention are ``dgmn_timm.ops.sampled_attention`` (the package's one
bilinear sampler and its fast kernels), or ``sampled_attention_portable``: ``fused_attn``,
decided at construction by ``use_fused_sampled_attention`` as in DGMN2 (timm's
``set_fused_attn`` and ``set_layer_config(exportable=..., scriptable=...)`` switches).

``NonLocal2d`` is the embedded-Gaussian non-local block (Wang et al., CVPR 2018) with the
same inner width: the baseline the paper compares against.

@inproceedings{yu2020representative,
  title={Representative Graph Neural Network},
  author={Yu, Changqian and Liu, Yifan and Gao, Changxin and Shen, Chunhua and Sang, Nong},
  booktitle={ECCV},
  year={2020}
}
"""
from typing import Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import use_fused_attn

try:
    from timm.layers import register_notrace_function
except ImportError:  # pragma: no cover - very old timm
    def register_notrace_function(fn):
        return fn

from .dgmn import identity_fuse_
from .fused import use_fused_sampled_attention
from ..ops import attention_weights, sampled_attention, sampled_attention_portable

__all__ = ['RepGraph', 'NonLocal2d', 'grid_displacement', 'REPGRAPH_STRUCTURES', 'REPGRAPH_FUSIONS']

REPGRAPH_STRUCTURES = ('bottleneck', 'simple')
REPGRAPH_FUSIONS = ('sum', 'concat')


def _inner_width(dim: int, inner_dim: Optional[int], fusion: str) -> int:
    """ Check ``fusion``; the width C' of queries, keys and values (default C // 4, at least 1). """
    if fusion not in REPGRAPH_FUSIONS:
        raise ValueError(f"fusion must be one of {REPGRAPH_FUSIONS}, got {fusion!r}")
    return inner_dim or max(dim // 4, 1)


@register_notrace_function
def grid_displacement(offset: torch.Tensor, height: int, width: int, grid: int) -> torch.Tensor:
    """ Per-position displacements from per-cell offsets (grid RepGraph).

    Args:
        offset: (B, 2S, ceil(H / g), ceil(W / g)) offsets of every cell, in pixels from the
            cell's anchor (the centre of the cell's pixels inside the map), (dy, dx) per node.
        height, width: map size H, W.
        grid: cell side g in pixels.

    Returns:
        (B, H, W, 2S): for position (y, x) in cell (y // g, x // g), the cell's offsets plus
        (anchor - position); float32 (float64 for float64 offsets), since half precision cannot
        hold pixel distances across a large map to sub-pixel accuracy.
    """
    device = offset.device
    ys = torch.arange(height, device=device)
    xs = torch.arange(width, device=device)
    cy = torch.div(ys, grid, rounding_mode='floor')
    cx = torch.div(xs, grid, rounding_mode='floor')
    # anchor - position, exact in float32 (half-integers); adding it to the cell offsets promotes
    # reduced-precision offsets to float32 and keeps float64 ones, with no branch on the dtype (FX).
    # The anchor is the centre of rows c * g .. min((c + 1) * g, H) - 1 of cell c.
    dy = ((cy * grid + torch.clamp(cy * grid + grid, max=height) - 1 - 2 * ys).float() * 0.5).view(1, height, 1, 1)
    dx = ((cx * grid + torch.clamp(cx * grid + grid, max=width) - 1 - 2 * xs).float() * 0.5).view(1, 1, width, 1)
    B, S2 = offset.shape[0], offset.shape[1]
    cell = offset.index_select(2, cy).index_select(3, cx).permute(0, 2, 3, 1)  # (B, H, W, 2S)
    cell = cell.reshape(B, height, width, S2 // 2, 2)
    shift = torch.stack((dy.expand(1, height, width, 1), dx.expand(1, height, width, 1)), dim=-1)
    return (cell + shift).reshape(B, height, width, S2)


class RepGraph(nn.Module):
    """ Representative Graph layer: every position attends to S sampled nodes; (B, C, H, W) -> same.

    Args:
        dim: channels C of the input and output.
        inner_dim: C', width of the queries, keys and values (default C // 4).
        num_nodes: S, sampled nodes per position.
        structure: 'bottleneck' (reduce C -> C' first, expand after) or 'simple'.
        fusion: 'sum' (x + W_y y) or 'concat' (1x1 conv over [x, W_y y]).
        grid: g, offsets per g x g cell (1: per position).
        groups: G, softmax per group of C' / G channels.
        norm_layer, act_layer: of the bottleneck's reduce / expand.
    """

    def __init__(
            self,
            dim: int,
            inner_dim: Optional[int] = None,
            num_nodes: int = 9,
            structure: str = 'bottleneck',
            fusion: str = 'sum',
            grid: int = 1,
            groups: int = 1,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if structure not in REPGRAPH_STRUCTURES:
            raise ValueError(f"structure must be one of {REPGRAPH_STRUCTURES}, got {structure!r}")
        inner_dim = _inner_width(dim, inner_dim, fusion)
        if num_nodes < 1:
            raise ValueError(f'num_nodes must be >= 1, got {num_nodes}')
        if grid < 1:
            raise ValueError(f'grid must be >= 1, got {grid}')
        if groups < 1 or inner_dim % groups:
            raise ValueError(f'groups ({groups}) must divide inner_dim ({inner_dim})')
        self.dim = dim
        self.inner_dim = inner_dim
        self.num_nodes = num_nodes
        self.structure = structure
        self.fusion = fusion
        self.grid = grid
        self.groups = groups
        self.fused_attn = use_fused_sampled_attention()

        if structure == 'bottleneck':
            self.reduce = nn.Conv2d(dim, inner_dim, 1, bias=False, **dd)
            self.reduce_norm = norm_layer(inner_dim, **dd)
            self.reduce_act = act_layer(inplace=True)
            in_op = inner_dim
        else:
            self.reduce = nn.Identity()
            self.reduce_norm = nn.Identity()
            self.reduce_act = nn.Identity()
            in_op = dim
        self.qkv = nn.Conv2d(in_op, 3 * inner_dim, 1, **dd)
        self.offset = nn.Conv2d(in_op, 2 * num_nodes, 1, **dd)
        bottleneck = structure == 'bottleneck'
        self.proj = nn.Conv2d(inner_dim, dim, 1, bias=not bottleneck, **dd)
        self.proj_norm = norm_layer(dim, **dd) if bottleneck else nn.Identity()
        self.fuse = nn.Conv2d(2 * dim, dim, 1, bias=False, **dd) if fusion == 'concat' else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """ Default conv init, then the identity start (see the module docstring). """
        for m in self.modules():
            if m is not self and hasattr(m, 'reset_parameters'):
                m.reset_parameters()
        if self.fuse is None:
            # the last affine map of the branch: the norm after W_y (bottleneck), else W_y itself
            last = self.proj_norm if getattr(self.proj_norm, 'weight', None) is not None else self.proj
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
        else:
            identity_fuse_(self.fuse, self.dim)

    def _displacements(self, z: torch.Tensor) -> torch.Tensor:
        """ (B, H, W, 2S) node displacements (dy, dx) from every position, in pixels. """
        H, W = z.shape[-2:]
        if self.grid == 1:
            return self.offset(z).permute(0, 2, 3, 1)
        pooled = F.avg_pool2d(z, self.grid, self.grid, ceil_mode=True)
        return grid_displacement(self.offset(pooled), H, W, self.grid)

    def _attend(self, z: torch.Tensor) -> torch.Tensor:
        """ (B, C', H, W) aggregated values y from the (reduced) map z. """
        B, _, H, W = z.shape
        nh, hd = self.groups, self.inner_dim // self.groups
        qkv = self.qkv(z).reshape(B, 3, nh, hd, H, W).permute(0, 4, 5, 1, 2, 3)  # (B, H, W, 3, nh, hd)
        # shared by the G groups as an expanded, stride-0 view (the ops take any strides)
        offset = self._displacements(z).unsqueeze(3).expand(B, H, W, nh, 2 * self.num_nodes)
        if self.fused_attn:
            y = sampled_attention(qkv, offset, None, 1.0)
        else:
            y = sampled_attention_portable(qkv, offset, None, 1.0)
        return y.permute(0, 3, 4, 1, 2).reshape(B, self.inner_dim, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.reduce_act(self.reduce_norm(self.reduce(x)))
        y = self.proj_norm(self.proj(self._attend(z)))
        if self.fuse is not None:
            return self.fuse(torch.cat([x, y], dim=1))
        return x + y

    @torch.jit.ignore
    def nodes(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """ Where every position looks: node positions and attention weights, for inspection.

        Returns:
            positions (B, S, H, W, 2): pixel (y, x) of the S nodes of every query (map coordinates);
            weights (B, G, S, H, W): softmax over the S nodes per channel group.
        """
        z = self.reduce_act(self.reduce_norm(self.reduce(x)))
        B, _, H, W = z.shape
        nh, hd, S = self.groups, self.inner_dim // self.groups, self.num_nodes
        qkv = self.qkv(z).reshape(B, 3, nh, hd, H, W).permute(0, 4, 5, 1, 2, 3)
        disp = self._displacements(z)  # (B, H, W, 2S)
        weights = attention_weights(qkv, disp.unsqueeze(3).expand(B, H, W, nh, 2 * S), None, 1.0)
        ys = torch.arange(H, device=x.device, dtype=disp.dtype).view(1, H, 1, 1)
        xs = torch.arange(W, device=x.device, dtype=disp.dtype).view(1, 1, W, 1)
        d = disp.reshape(B, H, W, S, 2)
        positions = torch.stack((d[..., 0] + ys, d[..., 1] + xs), dim=-1).permute(0, 3, 1, 2, 4)
        return positions, weights.permute(0, 3, 4, 1, 2)

    @torch.jit.ignore
    def macs_parts(self, height: int, width: int) -> Dict[str, int]:
        """ Analytic multiply-accumulates per part on a ``height`` x ``width`` map (batch 1).

        Parts: 'reduce', 'expand' (bottleneck), 'qkv', 'offset' (on the pooled map for
        grid > 1), 'attention' (S C' for the logits + S C' for the weighted sum per
        position), 'fuse' (concat). Not counted: bilinear sampling, softmax, norms,
        activations, pooling, biases, the residual add.
        """
        n = height * width
        c, ci, s, g = self.dim, self.inner_dim, self.num_nodes, self.grid
        in_op = ci if self.structure == 'bottleneck' else c
        n_cells = -(-height // g) * -(-width // g)
        parts = {
            'reduce': c * ci * n if self.structure == 'bottleneck' else 0,
            'qkv': in_op * 3 * ci * n,
            'offset': in_op * 2 * s * n_cells,
            'attention': 2 * s * ci * n,
            'expand': ci * c * n,
            'fuse': 2 * c * c * n if self.fuse is not None else 0,
        }
        return parts

    @torch.jit.ignore
    def macs(self, height: int, width: int) -> int:
        """ Total of ``macs_parts``. """
        return sum(self.macs_parts(height, width).values())

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, inner_dim={self.inner_dim}, num_nodes={self.num_nodes}, '
                f'structure={self.structure}, fusion={self.fusion}, grid={self.grid}, groups={self.groups}')


class NonLocal2d(nn.Module):
    """ Embedded-Gaussian non-local block; (B, C, H, W) -> same.

    theta, phi, g = 1x1 convs C -> C' (one conv producing 3 C' channels); every position
    attends to all H * W positions with softmax(theta_p . phi_q) (no scaling, as in the
    non-local paper); W_z = 1x1 conv C' -> C + BN. Fusion as in ``RepGraph`` ('sum':
    x + z with the BN weight zero-initialised, so an inserted block starts as the identity;
    'concat': a 1x1 conv over [x, z] starting as [I, 0]).

    The attention is ``F.scaled_dot_product_attention(scale=1)`` when timm's fused attention
    is on at construction (its CPU / CUDA kernels never hold the (HW)^2 weights), else the
    plain matmul - softmax - matmul (which holds them).
    """

    def __init__(
            self,
            dim: int,
            inner_dim: Optional[int] = None,
            fusion: str = 'sum',
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        inner_dim = _inner_width(dim, inner_dim, fusion)
        self.dim = dim
        self.inner_dim = inner_dim
        self.fusion = fusion
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Conv2d(dim, 3 * inner_dim, 1, **dd)
        self.proj = nn.Conv2d(inner_dim, dim, 1, bias=False, **dd)
        self.proj_norm = norm_layer(dim, **dd)
        self.fuse = nn.Conv2d(2 * dim, dim, 1, bias=False, **dd) if fusion == 'concat' else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for m in (self.qkv, self.proj, self.proj_norm):
            m.reset_parameters()
        if self.fuse is None:
            nn.init.zeros_(self.proj_norm.weight)
        else:
            identity_fuse_(self.fuse, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, 1, self.inner_dim, H * W).transpose(-1, -2).unbind(1)
        if self.fused_attn:
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        else:
            y = (q @ k.transpose(-1, -2)).softmax(dim=-1) @ v
        y = y.transpose(-1, -2).reshape(B, self.inner_dim, H, W)
        y = self.proj_norm(self.proj(y))
        if self.fuse is not None:
            return self.fuse(torch.cat([x, y], dim=1))
        return x + y

    @torch.jit.ignore
    def macs_parts(self, height: int, width: int) -> Dict[str, int]:
        """ Analytic multiply-accumulates per part (batch 1): 'qkv', 'attention' (N C' for the
        logits + N C' for the weighted sum per position, N = H W), 'expand' (W_z), 'fuse'
        (concat). Not counted: softmax, norm, biases, the residual add. """
        n = height * width
        c, ci = self.dim, self.inner_dim
        return {
            'reduce': 0,
            'qkv': c * 3 * ci * n,
            'offset': 0,
            'attention': 2 * n * ci * n,
            'expand': ci * c * n,
            'fuse': 2 * c * c * n if self.fuse is not None else 0,
        }

    @torch.jit.ignore
    def macs(self, height: int, width: int) -> int:
        """ Total of ``macs_parts``. """
        return sum(self.macs_parts(height, width).values())

    def extra_repr(self) -> str:
        return f'dim={self.dim}, inner_dim={self.inner_dim}, fusion={self.fusion}'
