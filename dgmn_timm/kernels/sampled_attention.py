""" DGMN2's sampled attention: every query attends to K = 9 bilinearly sampled key/value nodes.

Layout (token-major, the layout a ``Linear`` over channels-last tokens produces, so no
permutes are needed):

- ``qkv``: (B, H, W, 3, nh, hd) queries, keys and values of ``nh`` heads.
- ``offset``: (B, H, W, nh, 18) walks, index 2k = row (dy), 2k + 1 = column (dx) of node k.
- ``rel``: (B, H, W, nh, 9) position logits added before the softmax (spec section 3).
- result: (B, H, W, nh, hd), heads side by side.

Node k = 3i + j of the query at (y, x) is read at (y - 1 + i + dy_k, x - 1 + j + dx_k),
bilinearly, a corner outside the map reading zero (spec section 2).

CPU path (``sampled_attention_cpu``), the one eager CPU models use
------------------------------------------------------------------
Bilinear sampling is linear in the map, so a sampled key is a weighted sum of 4 table
rows and the whole attention can be written with two fused gather primitives of
PyTorch's embedding-bag kernels, without ever materialising the 9x-sized sampled keys
and values (the straightforward port's cost on CPU: fresh 100 MB tensors, permutes):

- logits_k = scale * <q, sum_c w_kc K[i_kc]> + r_k = scale * sum_c w_kc <q, K[i_kc]> + r_k:
  the 36 dot products <q, K[i]> per query are one
  ``_embedding_bag_per_sample_weights_backward`` call (a gather-dot, no copies).
- out = sum_k p_k sum_c w_kc V[i_kc]: one ``embedding_bag(mode='sum')`` with 36 rows per
  query and weights p_k * w_kc.

Keys and values are zero-padded by one row/column on top/left and two on bottom/right
(one copy of k and v, no 9x tensor), so every corner index is valid, a corner outside
the map reads a zero row, and positions can be clamped to the padded range without
changing any value (beyond the range all 4 corners are zero, and grid_sample's gradient
there is zero too). The backward is explicit (a custom ``autograd.Function``): the
gradients of the corner weights are two more gather-dots, dq is one embedding bag, and
the scatter into the key/value tables is written as a gather too: the corner indices
are sorted once (int32 radix sort) and the transposed bags are embedding bags over the
queries (``include_last_offset``), which avoids ``index_add_`` over a 36x-sized tensor.

Given the two resized position tables instead of (or besides) ``rel``, the CPU path also
computes the position term (``dgmn_timm.models.dgmn2.graph_attention`` does this for small
maps): one GEMM of the queries against both tables, whose 9 + 9 used columns per query are
two ``as_strided`` band views (``_rel_pos_bands``); the backward writes the logits' gradient
into the bands of a dense dG and adds dG @ tables straight into dq.

Portable path (``sampled_attention_portable``)
----------------------------------------------
``sample_nodes`` (one ``grid_sample`` call for keys and values, channel-first) plus plain
tensor ops; autograd-native, TorchScript-scriptable and ONNX-exportable (``grid_sample``
becomes ONNX ``GridSample``, opset 16). Used under ``torch.jit.script``, ONNX export, and
for attention dropout in training.
"""
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

try:
    from timm.layers import register_notrace_function
except ImportError:  # pragma: no cover - very old timm
    def register_notrace_function(fn):
        return fn

from ..sampling import sample_nodes

__all__ = [
    'sampled_attention', 'sampled_attention_cpu', 'sampled_attention_portable', 'node_corners',
    'attention_weights', 'triton_available', 'uses_gather_path',
]

_NUM_NODES = 9
_NUM_CORNERS = 4

DOUBLE_BACKWARD_MESSAGE = (
    "Double backward (create_graph=True, e.g. a gradient penalty) through DGMN2's fused sampled "
    "attention is not supported on this device: its backward is hand-written. Use the "
    "autograd-native grid_sample path: create the model after timm.layers.set_fused_attn(False) "
    "(or with the environment variable TIMM_FUSED_ATTN=0), or set fused_attn = False on its "
    "attention layers (for m in model.modules(): if hasattr(m, 'fused_attn'): m.fused_attn = False).")

# base grids per (H, W, device, dtype); tiny, but building one costs ~10 small ops per call
_BASE_GRIDS: Dict[Tuple[int, int, str, torch.dtype], torch.Tensor] = {}
# offsets / offset2bag of the fixed-size bags of the gather-dots, per (bags, size, device, dtype)
_BAG_INDEX: Dict[Tuple[int, int, str, torch.dtype], Tuple[torch.Tensor, torch.Tensor]] = {}
_TRITON_OK: List[Optional[bool]] = [None]


def triton_available() -> bool:
    """ True if Triton imports (checked once). """
    if _TRITON_OK[0] is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_OK[0] = True
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_OK[0] = False
    return bool(_TRITON_OK[0])


def _no_autocast(device_type: str):
    """ Autocast disabled (the internal products keep float32 / float64), where autocast exists. """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # half / bfloat16 are sampled in float32: coordinates need sub-pixel accuracy, and
    # the gathers accumulate 36 products per output.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _build_base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ (H, W, 1, 9, 2) padded pixel coordinates (y + i, x + j) of node k = 3i + j.

    The unpadded position is (y - 1 + i, x - 1 + j); the padding shifts it by one.
    """
    i = torch.arange(3, device=device, dtype=dtype)
    by = (torch.arange(height, device=device, dtype=dtype).view(height, 1, 1) + i.view(1, 3, 1))
    bx = (torch.arange(width, device=device, dtype=dtype).view(width, 1, 1) + i.view(1, 1, 3))
    by = by.expand(height, 3, 3).reshape(height, 1, 9).expand(height, width, 9)
    bx = bx.expand(width, 3, 3).reshape(1, width, 9).expand(height, width, 9)
    return torch.stack((by, bx), dim=-1).view(height, width, 1, 9, 2)


def _cached(cache: Dict, limit: int, build, a: int, b: int, device: torch.device, dtype: torch.dtype):
    """ ``build(a, b, device, dtype)``, memoised in ``cache`` (emptied past ``limit`` entries).

    Under torch.compile the value is built inline, so no Python-side state is traced.
    """
    if torch.compiler.is_compiling():
        return build(a, b, device, dtype)
    key = (a, b, str(device), dtype)
    out = cache.get(key)
    if out is None:
        if len(cache) > limit:
            cache.clear()
        out = build(a, b, device, dtype)
        cache[key] = out
    return out


def _base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return _cached(_BASE_GRIDS, 64, _build_base_grid, height, width, device, dtype)


def node_corners(
        offset: torch.Tensor,
        height: int,
        width: int,
        num_heads: int,
        need_mask: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """ Corner rows and bilinear weights of the 9 nodes of every query and head.

    The table the rows index is the zero-padded key/value map (B, H + 3, W + 3, 2, nh, hd)
    (one row/column of zeros on top/left, two on bottom/right) viewed as (rows, hd): the
    key of head h at padded pixel P is row 2 * nh * P + h, its value row 2 * nh * P + nh + h.

    Args:
        offset: (B, H, W, nh, 18) walks, (dy, dx) per node.
        height, width: map size H, W.
        num_heads: nh.
        need_mask: also return where the (unclamped) position lies in the padded range,
            i.e. where the position has a gradient.

    Returns:
        idx: (B * H * W * nh * 36,) key rows, corners in the order (y0, x0), (y0, x0 + 1),
            (y0 + 1, x0), (y0 + 1, x0 + 1); add nh for the value rows. int32 when the
            table has fewer than 2**31 rows, else int64.
        w: (M, 9, 4) bilinear weights (M = B * H * W * nh), float32 (float64 for float64 offsets).
        gy, gx: (M, 9, 4) the row and column factors of w (w = gy * gx): gy = (1 - fy, 1 - fy, fy, fy),
            gx = (1 - fx, fx, 1 - fx, fx) for fractional parts fy, fx of the position.
        mask: (M, 9, 2) bool or None.
    """
    B = offset.shape[0]
    nh = num_heads
    device = offset.device
    cdt = _compute_dtype(offset.dtype)
    Hp, Wp = height + 3, width + 3
    rows = B * Hp * Wp * 2 * nh
    itype = torch.int32 if rows < 2 ** 31 - 1 else torch.int64
    M = B * height * width * nh

    pos = offset.reshape(B, height, width, nh, _NUM_NODES, 2).to(cdt) + _base_grid(height, width, device, cdt)
    lim = torch.tensor([height + 1., width + 1.], device=device, dtype=cdt)
    mask: Optional[torch.Tensor] = None
    if need_mask:
        mask = ((pos >= 0.) & (pos <= lim)).reshape(M, _NUM_NODES, 2)
    # beyond the padded range all 4 corners read zeros: clamping changes no value
    pos = torch.clamp(pos, min=torch.zeros_like(lim), max=lim)
    # pos >= 0 now, so truncation is floor
    frac = torch.frac(pos)
    fl = pos.to(itype)
    stride = torch.tensor([Wp * 2 * nh, 2 * nh], device=device, dtype=itype)
    corner = torch.tensor([0, 2 * nh, Wp * 2 * nh, (Wp + 1) * 2 * nh], device=device, dtype=itype)
    corner = corner + (torch.arange(B, device=device, dtype=itype) * (Hp * Wp * 2 * nh)).view(B, 1, 1, 1, 1, 1) \
        + torch.arange(nh, device=device, dtype=itype).view(1, 1, 1, nh, 1, 1)
    idx = ((fl * stride).sum(-1, dtype=itype).unsqueeze(-1) + corner).reshape(-1)
    # factors of the 4 corner weights, (1 - f) or f per axis; affine in f: base + f * sign
    gy = torch.addcmul(_corner_const(0, device, cdt), frac[..., 0:1], _corner_const(1, device, cdt))
    gx = torch.addcmul(_corner_const(2, device, cdt), frac[..., 1:2], _corner_const(3, device, cdt))
    gy = gy.view(M, _NUM_NODES, _NUM_CORNERS)
    gx = gx.view(M, _NUM_NODES, _NUM_CORNERS)
    return idx, gy * gx, gy, gx, mask


def _corner_const(which: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ Per-corner constants: 0 / 1 = base / sign of the row factor, 2 / 3 = of the column factor. """
    table = ((1., 1., 0., 0.), (-1., -1., 1., 1.), (1., 0., 1., 0.), (-1., 1., -1., 1.))
    return torch.tensor(table[which], device=device, dtype=dtype)


def _build_bag_index(num_bags: int, bag_size: int, device: torch.device, dtype: torch.dtype):
    bags = torch.arange(num_bags, device=device, dtype=dtype)
    return bags * bag_size, bags.view(num_bags, 1).expand(num_bags, bag_size).reshape(-1)


def _bag_index(num_bags: int, bag_size: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """ offsets and offset2bag of ``num_bags`` bags of ``bag_size`` consecutive entries (cached). """
    return _cached(_BAG_INDEX, 32, _build_bag_index, num_bags, bag_size, device, dtype)


def _gather_dot(rows_of: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, bag_size: int) -> torch.Tensor:
    """ out[j] = <rows_of[j // bag_size], table[idx[j]]>, fused (no gathered copy). """
    offsets, offset2bag = _bag_index(rows_of.shape[0], bag_size, idx.device, idx.dtype)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows_of, table, idx, offsets, offset2bag, 0, -1)


def _gather_sum(idx: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ out[m] = sum_j weights[m, j] * table[idx[m, j]], fused. idx, weights: (M, J). """
    return F.embedding_bag(idx, table, per_sample_weights=weights, mode='sum')


def _tables(qkv: torch.Tensor, scale: float, cdt: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """ scaled queries (M, hd) and the padded key/value table (rows, hd), see ``node_corners``. """
    B, H, W, _, nh, hd = qkv.shape
    qs = (qkv[:, :, :, 0].to(cdt) * scale).view(-1, hd)
    # (B, H + 3, W + 3, 2, nh, hd): zero only the border, copy the interior (F.pad fills it all first)
    kv = qkv.new_empty((B, H + 3, W + 3, 2, nh, hd), dtype=cdt)
    kv[:, :1].zero_()
    kv[:, H + 1:].zero_()
    kv[:, 1:H + 1, :1].zero_()
    kv[:, 1:H + 1, W + 1:].zero_()
    kv[:, 1:H + 1, 1:W + 1].copy_(qkv[:, :, :, 1:])
    return qs, kv.view(-1, hd)


def _forward_core(
        qs: torch.Tensor, table: torch.Tensor, nh: int, idx: torch.Tensor, w: torch.Tensor, rel: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ qs (M, hd) scaled queries; table (rows, hd); idx (M * 36,) key rows; w (M, 9, 4); rel (M, 9).

    Returns out (M, hd), p (M, 9), dots (M, 9, 4) = <qs, K[corner]>, wp (M, 9, 4) = w * p.
    """
    M = qs.shape[0]
    dots = _gather_dot(qs, table, idx, _NUM_NODES * _NUM_CORNERS).view(M, _NUM_NODES, _NUM_CORNERS)
    # rel + sum_c w_c dots_c as one tiny batched matmul per (query, node)
    logits = torch.baddbmm(rel.reshape(-1, 1, 1), dots.view(-1, 1, _NUM_CORNERS), w.view(-1, _NUM_CORNERS, 1))
    p = logits.view(M, _NUM_NODES).softmax(dim=-1)
    # value rows are key rows + nh: a view of the same table starting nh rows later
    wp = w * p.unsqueeze(-1)
    out = _gather_sum(idx.view(M, -1), table[nh:], wp.view(M, -1))
    return out, p, dots, wp


def _rel_pos_bands(
        G: torch.Tensor, B: int, H: int, W: int, nh: int, len_h: int, released: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ The position logits as two zero-copy views of G = q @ [table_h; table_w]^T.

    G is (B * H * W * nh, L), a row per query (b, y, x, h), a column per row of the
    resized height table (len_h = H + 8 columns) and then of the width table (W + 8).
    The width term <q[y, x], table_w[W - 1 - x + m]> is the band G[row(y, x), len_h + W - 1 - x + m],
    the clean height term the band G[row(y, x), H - 1 - y + m]; the released height term
    (square maps) reads the transposed query grid, G[row(x, y), H - 1 - x + m]. Each band is
    an ``as_strided`` view with a stride of (row stride - 1) along x or y.
    Returns the (B, H, W, nh, 9) width and height views.
    """
    L = G.shape[1]
    sb, sy, sx, sh = H * W * nh * L, W * nh * L, nh * L, L
    size = (B, H, W, nh, _NUM_NODES)
    width = torch.as_strided(G, size, (sb, sy, sx - 1, sh, 1), G.storage_offset() + len_h + W - 1)
    if released:
        height = torch.as_strided(G, size, (sb, sx, sy - 1, sh, 1), G.storage_offset() + H - 1)
    else:
        height = torch.as_strided(G, size, (sb, sy - 1, sx, sh, 1), G.storage_offset() + H - 1)
    return width, height


def _row_offsets(rows: torch.Tensor, sorted_rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """ (num_rows + 1,) int64: where each row's entries start in ``sorted_rows`` (and the end).

    Eager: the running count of entries per row (``bincount``, 2x faster than ``searchsorted``);
    compiled: ``searchsorted``, whose output shape does not depend on the data.
    """
    if torch.compiler.is_compiling():
        return torch.searchsorted(
            sorted_rows, torch.arange(num_rows + 1, device=rows.device, dtype=rows.dtype)).long()
    offsets = rows.new_zeros(num_rows + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows, minlength=num_rows), 0, out=offsets[1:])
    return offsets


class _SampledAttentionCPU(torch.autograd.Function):
    """ Fused sample + attend with gather-only forward and backward (see module doc). """

    @staticmethod
    def forward(
            ctx,
            qkv: torch.Tensor,
            offset: torch.Tensor,
            rel: Optional[torch.Tensor],
            scale: float,
            table_h: Optional[torch.Tensor] = None,
            table_w: Optional[torch.Tensor] = None,
            released: bool = True,
    ) -> torch.Tensor:
        # the internal products must not be autocast: everything runs in float32 / float64
        with _no_autocast(qkv.device.type):
            return _SampledAttentionCPU._forward(ctx, qkv, offset, rel, scale, table_h, table_w, released)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        with _no_autocast(grad_out.device.type):
            return _SampledAttentionCPU._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, qkv, offset, rel, scale, table_h, table_w, released) -> torch.Tensor:
        B, H, W, _, nh, hd = qkv.shape
        cdt = _compute_dtype(qkv.dtype)
        M = B * H * W * nh
        idx, w, gy, gx, mask = node_corners(offset, H, W, nh, need_mask=ctx.needs_input_grad[1])
        qs, table = _tables(qkv, scale, cdt)
        tables = None
        logits_in = None if rel is None else rel.reshape(M, _NUM_NODES).to(cdt)
        if table_h is not None:
            # position term as one GEMM against both tables, read through two band views
            tables = torch.cat((table_h, table_w)).to(cdt)
            G = torch.mm(qs, tables.t() * (1. / scale))
            width, height = _rel_pos_bands(G, B, H, W, nh, table_h.shape[0], released)
            pos = (width + height).view(M, _NUM_NODES)
            logits_in = pos if logits_in is None else pos + logits_in
        assert logits_in is not None
        out, p, dots, wp = _forward_core(qs, table, nh, idx, w.to(cdt), logits_in)
        if any(ctx.needs_input_grad[:3]) or any(ctx.needs_input_grad[4:6]):
            ctx.save_for_backward(qs, table, idx, w, gy, gx, mask, p, dots, wp, tables)
            ctx.scale = scale
            ctx.dims = (B, H, W, nh, hd)
            ctx.dtypes = (qkv.dtype, offset.dtype, None if rel is None else rel.dtype,
                          None if table_h is None else table_h.dtype)
            ctx.len_h = 0 if table_h is None else table_h.shape[0]
            ctx.released = released
        return out.view(B, H, W, nh, hd).to(qkv.dtype)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        qs, table, idx, w, gy, gx, mask, p, dots, wp, tables = ctx.saved_tensors
        B, H, W, nh, hd = ctx.dims
        qkv_dtype, offset_dtype, rel_dtype, table_dtype = ctx.dtypes
        Hp, Wp = H + 3, W + 3
        M = qs.shape[0]
        cdt = qs.dtype
        go = grad_out.to(cdt).contiguous().view(M, hd)

        # d out / d (p_k w_kc) = <go, V[i_kc]>
        vdots = _gather_dot(go, table[nh:], idx, _NUM_NODES * _NUM_CORNERS).view(M, _NUM_NODES, _NUM_CORNERS)
        dp = torch.bmm(vdots.view(-1, 1, _NUM_CORNERS), w.view(-1, _NUM_CORNERS, 1)).view(M, _NUM_NODES)
        # softmax backward, (M, 9)
        dlogits = p * (dp - torch.bmm(p.view(M, 1, _NUM_NODES), dp.view(M, _NUM_NODES, 1)).view(M, 1))
        wk = w * dlogits.unsqueeze(-1)  # d logits / d (scaled q . K[i_kc])

        grad_qkv = grad_offset = grad_rel = grad_th = grad_tw = None
        dG: Optional[torch.Tensor] = None
        if tables is not None:
            # the position term's gradient: dlogits written into the two bands of a dense dG
            dG = qs.new_zeros(M, tables.shape[0])
            d_width, d_height = _rel_pos_bands(dG, B, H, W, nh, ctx.len_h, ctx.released)
            dl = dlogits.view(B, H, W, nh, _NUM_NODES)
            d_width.copy_(dl)
            d_height.copy_(dl)
            if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
                d_tables = torch.mm(dG.t(), qs) * (1. / ctx.scale)
                grad_th = d_tables[:ctx.len_h].to(table_dtype)
                grad_tw = d_tables[ctx.len_h:].to(table_dtype)
        if ctx.needs_input_grad[0]:
            dq = _gather_sum(idx.view(M, -1), table, wk.view(M, -1)) * ctx.scale
            if dG is not None:
                dq = torch.addmm(dq, dG, tables)  # + the position term's d q
            # the scatter into the table, written as gathers: sort the corner entries by row,
            # then one bag per row over the queries that read it
            sorted_rows, order = torch.sort(idx.view(-1))
            bag_offsets = _row_offsets(idx.view(-1), sorted_rows, table.shape[0])
            src = order // (_NUM_NODES * _NUM_CORNERS)
            grad_table = F.embedding_bag(
                src, qs, bag_offsets, mode='sum', per_sample_weights=wk.view(-1).index_select(0, order), include_last_offset=True)
            grad_v = F.embedding_bag(
                src, go, bag_offsets, mode='sum', per_sample_weights=wp.view(-1).index_select(0, order),
                include_last_offset=True)
            grad_table[nh:] += grad_v[:-nh]  # value rows are key rows + nh
            grad_kv = grad_table.view(B, Hp, Wp, 2, nh, hd)[:, 1:H + 1, 1:W + 1]
            grad_qkv = torch.cat((dq.view(B, H, W, 1, nh, hd), grad_kv), dim=3).to(qkv_dtype)
        if ctx.needs_input_grad[1]:
            # d/dw_kc, then through w_kc = gy * gx with d gy / d fy = +-1 (fy = position - floor)
            dw = torch.addcmul(vdots * p.unsqueeze(-1), dots, dlogits.unsqueeze(-1))
            dfy = torch.matmul(dw * gx, _corner_const(1, dw.device, dw.dtype))
            dfx = torch.matmul(dw * gy, _corner_const(3, dw.device, dw.dtype))
            grad_offset = torch.stack((dfy, dfx), dim=-1)
            if mask is not None:
                grad_offset = grad_offset * mask
            grad_offset = grad_offset.view(B, H, W, nh, 2 * _NUM_NODES).to(offset_dtype)
        if ctx.needs_input_grad[2]:
            grad_rel = dlogits.view(B, H, W, nh, _NUM_NODES).to(rel_dtype)
        return grad_qkv, grad_offset, grad_rel, None, grad_th, grad_tw, None


def sampled_attention_cpu(
        qkv: torch.Tensor,
        offset: torch.Tensor,
        rel: Optional[torch.Tensor],
        scale: float,
        table_h: Optional[torch.Tensor] = None,
        table_w: Optional[torch.Tensor] = None,
        released: bool = True,
) -> torch.Tensor:
    """ The gather-based path (any device; the default off CUDA). Shapes as in the module doc.

    With ``table_h`` / ``table_w`` (the position tables already resized to H + 8 / W + 8 rows)
    the position term is computed inside (one GEMM read through band views, see
    ``_rel_pos_bands``) and added to ``rel`` (which may then be None). ``released`` selects the
    released height term, which this fused form supports for square maps only.
    """
    if table_h is not None:
        B, H, W = qkv.shape[:3]
        if table_w is None or table_h.shape[0] != H + 8 or table_w.shape[0] != W + 8:
            raise ValueError('table_h / table_w must be resized to H + 8 / W + 8 rows')
        if released and H != W:
            raise ValueError('the released height term is fused for square maps only; pass rel instead')
    elif rel is None:
        raise ValueError('pass the position logits rel or the position tables')
    return _SampledAttentionCPU.apply(qkv, offset, rel, scale, table_h, table_w, released)


def _needs_portable(attn_drop: float, training: bool, fused: bool = True) -> bool:
    """ ONNX export, attention dropout and ``fused=False`` take the portable path. """
    return not fused or torch.onnx.is_in_onnx_export() or (attn_drop > 0. and training)


def _uses_triton(qkv: torch.Tensor) -> bool:
    return qkv.is_cuda and qkv.dtype != torch.float64 and triton_available()


def uses_gather_path(qkv: torch.Tensor, attn_drop: float = 0., training: bool = False, fused: bool = True) -> bool:
    """ True where ``sampled_attention`` runs ``sampled_attention_cpu`` (see its dispatch). """
    return not _needs_portable(attn_drop, training, fused) and not _uses_triton(qkv)


def attention_weights(qkv: torch.Tensor, offset: torch.Tensor, rel: torch.Tensor, scale: float) -> torch.Tensor:
    """ (B, H, W, nh, 9) softmax weights of the nodes, computed as the CPU path's forward does. """
    B, H, W, _, nh, hd = qkv.shape
    cdt = _compute_dtype(qkv.dtype)
    M = B * H * W * nh
    with _no_autocast(qkv.device.type):
        return _attention_weights(qkv, offset, rel, scale, cdt, M)


def _attention_weights(qkv: torch.Tensor, offset: torch.Tensor, rel: torch.Tensor, scale: float, cdt: torch.dtype,
                       M: int) -> torch.Tensor:
    B, H, W, _, nh, hd = qkv.shape
    idx, w, _, _, _ = node_corners(offset, H, W, nh)
    qs, table = _tables(qkv, scale, cdt)
    _, p, _, _ = _forward_core(qs, table, nh, idx, w.to(cdt), rel.reshape(M, _NUM_NODES).to(cdt))
    return p.view(B, H, W, nh, _NUM_NODES)


def sampled_attention_portable(
        qkv: torch.Tensor,
        offset: torch.Tensor,
        rel: torch.Tensor,
        scale: float,
        attn_drop: float = 0.,
        training: bool = False,
) -> torch.Tensor:
    """ ``grid_sample`` composition: scriptable, ONNX-exportable, autograd-native. """
    B, H, W, _, nh, hd = qkv.shape
    N = H * W
    K = 9  # literal: TorchScript cannot close over module globals
    q = qkv[:, :, :, 0].reshape(B, N, nh, hd).permute(0, 2, 3, 1).reshape(B * nh, hd, 1, N)
    kv = qkv[:, :, :, 1:].permute(0, 4, 3, 5, 1, 2).reshape(B * nh, 2 * hd, H, W)
    off = offset.reshape(B, N, nh, 2 * K).transpose(1, 2).reshape(B * nh, N, 2 * K)
    nodes = sample_nodes(kv, off, 1, True)  # (B * nh, 2 * hd, 9, N), keys and values in one call
    logits = (q * nodes[:, :hd]).sum(1) * scale  # (B * nh, 9, N)
    logits = logits + rel.reshape(B, N, nh, K).permute(0, 2, 3, 1).reshape(B * nh, K, N)
    p = logits.softmax(dim=1)
    p = F.dropout(p, attn_drop, training)
    out = (p.unsqueeze(1) * nodes[:, hd:]).sum(2)  # (B * nh, hd, N)
    return out.reshape(B, nh, hd, H, W).permute(0, 3, 4, 1, 2)


@register_notrace_function
def sampled_attention(
        qkv: torch.Tensor,
        offset: torch.Tensor,
        rel: torch.Tensor,
        scale: float,
        attn_drop: float = 0.,
        training: bool = False,
        fused: bool = True,
) -> torch.Tensor:
    """ DGMN2 sampled attention, dispatched to the fastest exact implementation.

    Args:
        qkv: (B, H, W, 3, nh, hd).
        offset: (B, H, W, nh, 18) walks, (dy, dx) per node.
        rel: (B, H, W, nh, 9) logits added before the softmax.
        scale: logit scale (hd ** -0.5).
        attn_drop: dropout on the attention weights (used when ``training``).
        fused: False selects the portable path everywhere (autograd-native, so it also supports
            double backward, which the fused paths' hand-written backwards do not).

    Returns:
        (B, H, W, nh, hd).

    CUDA tensors (float32 / bfloat16 / float16) go to the fused Triton kernel when Triton is
    installed; ONNX export, attention dropout and ``fused=False`` use the portable
    ``grid_sample`` path; everything else the gather path (``sampled_attention_cpu``).
    """
    if _needs_portable(attn_drop, training, fused):
        return sampled_attention_portable(qkv, offset, rel, scale, attn_drop, training)
    if _uses_triton(qkv):
        from .triton_sampled_attention import sampled_attention_triton
        return sampled_attention_triton(qkv, offset, rel, scale)
    return sampled_attention_cpu(qkv, offset, rel, scale)
