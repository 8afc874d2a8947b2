""" Sampled attention: every query attends to K bilinearly sampled key/value nodes.

Layout (token-major, the layout a ``Linear`` over channels-last tokens produces):

- ``qkv``: (B, H, W, 3, nh, hd) queries, keys and values of ``nh`` heads (any strides).
- ``offset``: (B, H, W, nh, 2K). Node k of the query at pixel (y, x) is read at
  (y + offset[..., 2k], x + offset[..., 2k + 1]): the full displacement from the query, in
  pixels. A layer with a base neighbourhood (DGMN2: a 3x3 grid) adds it to its walks first.
  Any strides: e.g. a permuted conv output, expanded (stride 0) over heads.
- ``bias``: (B, H, W, nh, K) logits added before the softmax, or None.
- ``scale``: multiplies <q, k>.
- ``pos_h``, ``pos_w`` (optional): a position term from per-row and per-column tables,
  (H, K, hd) and (W, K, hd): logit k of the query at (y, x) gets <q, pos_h[y, k]> +
  <q, pos_w[x, k]> (unscaled q). With ``rel_pos_released`` the (H, W) array of height terms is
  transposed and that (W, H) image resized bilinearly to (H, W) (``align_corners=False``; on a
  square map: only transposed), the convention DGMN2's released checkpoints were trained with
  (DGMN2's ``rel_pos_released``).
  :func:`position_logits` computes this term with plain ops.
- result: (B, H, W, nh, hd) = sum_k softmax_k(scale * <q, k_k> + bias_k + pos_k) v_k.

Sampling is bilinear and a corner outside the map reads zero (the deformable-convolution
convention; ``grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``); the
gather kernel takes its corner indices and weights from ``sampling.axis_corners``.

Cost: both custom ops register a formula with ``torch.utils.flop_counter``, so a plain
``FlopCounterMode`` counts the op: per (query, head) and node, hd multiply-adds for <q, k>, hd
for p v, 8 hd for the bilinear reads of key and value and hd per position table; the backward
twice that (once without d qkv: the output gradient against the value corners and the tables).

Entry points:

- :func:`sampled_attention`: the op ``torch.ops.dgmn_timm.sampled_attention``, callable from
  Python, TorchScript, torch.compile (one opaque call, no graph break), FX and torch.export.
  It decomposes into ``dgmn_timm::sampled_attention_fwd`` (a ``torch.library.custom_op`` with
  fake and autograd registrations), which also returns what the backward reuses; the
  backward is ``dgmn_timm::sampled_attention_backward``, which refuses double backward. The
  dispatcher runs the gather kernel below on CPU (and any other device) and the Triton kernel
  (``triton_sampled_attention``) on CUDA when Triton is installed.
- :func:`sampled_attention_portable`: corner gathers and batched products in plain tensor ops; autograd-native
  (double backward), TorchScript-scriptable, ONNX-exportable, supports attention dropout.
  Layers choose it at construction.
- ``reference.sampled_attention_reference``: the float64 oracle (explicit corner reads, no
  ``grid_sample``); the tests compare every path with it.

Gather kernel (CPU)
-------------------
Bilinear sampling is linear in the map, so a sampled key is a weighted sum of 4 rows of qkv
and the attention can be written with two fused gathers of PyTorch's embedding-bag kernels,
without materialising the K-fold sampled keys and values:

- logits_k = scale * <q, sum_c w_kc K[i_kc]> + b_k = sum_c w_kc <scale q, K[i_kc]> + b_k: the
  4K dot products per query are one ``_embedding_bag_per_sample_weights_backward`` call
  (a gather-dot, no copies).
- out = sum_k p_k sum_c w_kc V[i_kc]: one ``embedding_bag(mode='sum')`` with 4K rows per query
  and weights p_k * w_kc.

The gathers read qkv itself (viewed as rows of hd; a value row is its key row + nh); a corner
outside the map gets weight zero and a clamped, valid row. The position term is two batched
products of the (contiguous, scaled) queries with the tables, and its query gradient is added
into the op's own dq. The forward returns the softmax
weights and the corner dots with the output; the backward recomputes the corners (cheap,
elementwise) and gets: the corner weights' gradients from one more gather-dot (with the
output gradient against the values), dq from one embedding bag, and the scatter into the key
and value rows as gathers too: the corner rows are sorted once and the transposed bags are
embedding bags over the queries (``include_last_offset``).
"""
import contextlib
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .sampling import axis_corners


__all__ = [
    'sampled_attention', 'attention_weights',
    'position_logits', 'triton_available', 'DOUBLE_BACKWARD_MESSAGE',
]

DOUBLE_BACKWARD_MESSAGE = (
    "Double backward (create_graph=True, e.g. a gradient penalty) through DGMN's fused sampled "
    "attention (torch.ops.dgmn_timm.sampled_attention) is not supported: its backward is hand-written. "
    "Use the autograd-native portable path: create the model after timm.layers.set_fused_attn(False) "
    "(or with the environment variable TIMM_FUSED_ATTN=0).")

_CORNERS = 4
# small shape-dependent index tensors, see _cached
_CACHE: Dict[tuple, object] = {}
_TRITON_OK: Dict[str, bool] = {}


def triton_available() -> bool:
    """ True if Triton imports (checked once). """
    if 'ok' not in _TRITON_OK:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_OK['ok'] = True
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_OK['ok'] = False
    return _TRITON_OK['ok']


def _check_inputs(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor],
        pos_h: Optional[torch.Tensor] = None, pos_w: Optional[torch.Tensor] = None) -> int:
    """ Raise one clear error for a malformed call; returns K. """
    if qkv.dim() != 6 or qkv.shape[3] != 3:
        raise ValueError(f'sampled_attention: qkv must be (B, H, W, 3, heads, head_dim), got {tuple(qkv.shape)}')
    B, H, W, _, nh, hd = qkv.shape
    if offset.dim() != 5 or tuple(offset.shape[:4]) != (B, H, W, nh) or offset.shape[4] < 2 or offset.shape[4] % 2:
        raise ValueError(
            f'sampled_attention: offset must be (B, H, W, heads, 2K) = ({B}, {H}, {W}, {nh}, 2K) with K >= 1, '
            f'got {tuple(offset.shape)}')
    K = offset.shape[4] // 2
    if bias is not None and tuple(bias.shape) != (B, H, W, nh, K):
        raise ValueError(
            f'sampled_attention: bias must be (B, H, W, heads, K) = {(B, H, W, nh, K)}, got {tuple(bias.shape)}')
    for name, table, length in (('pos_h', pos_h, H), ('pos_w', pos_w, W)):
        if table is not None and (tuple(table.shape) != (length, K, hd) or not table.is_floating_point()):
            raise ValueError(
                f'sampled_attention: {name} must be a floating-point (L, K, head_dim) = {(length, K, hd)} table, '
                f'got {tuple(table.shape)}')
    if not (qkv.is_floating_point() and offset.is_floating_point() and (bias is None or bias.is_floating_point())):
        raise ValueError('sampled_attention: qkv, offset and bias must be floating point')
    return K


def _transpose_resize(t: torch.Tensor, branch_free: bool = True) -> torch.Tensor:
    """ (H, W, C) -> the (W, H) grid t^T read as a C-channel image and resized to (H, W), (H, W, C).

    A bilinear resize to the same size is exactly the identity: ``branch_free`` resizes square
    maps too, so that a traced or exported graph holds for every size.
    """
    H, W, C = t.shape
    t = t.transpose(0, 1)
    if not branch_free and H == W:
        return t
    t = F.interpolate(t.permute(2, 0, 1).unsqueeze(0), size=(H, W), mode='bilinear', align_corners=False)
    return t[0].permute(1, 2, 0)


def _transpose_resize_backward(g: torch.Tensor) -> torch.Tensor:
    """ The adjoint of :func:`_transpose_resize`: (H, W, C) -> (H, W, C). """
    H, W, C = g.shape
    if H != W:
        g = g.permute(2, 0, 1).unsqueeze(0).contiguous()
        g = torch.ops.aten.upsample_bilinear2d_backward(g, [H, W], [1, C, W, H], False, None, None)
        g = g[0].permute(1, 2, 0)
    return g.transpose(0, 1)


def position_logits(
        q: torch.Tensor, pos_h: Optional[torch.Tensor], pos_w: Optional[torch.Tensor],
        rel_pos_released: bool = False, branch_free: bool = True) -> torch.Tensor:
    """ The op's position term (module doc) with plain ops: (B, H, W, nh, K) logits.

    q: (B, H, W, nh, hd) unscaled queries (any strides); pos_h (H, K, hd), pos_w (W, K, hd)
    per-row / per-column tables (either may be None, not both). The queries are laid out
    pixel-major, (H, W, B * nh, hd), and each pixel's queries multiply its row's and its
    column's table (batched products, the tables broadcast over the other axis): 2 K hd
    multiply-adds per query. In this layout every reshape splits a product of the map's sizes
    or of constants, never a constant times one size, so ``torch.export`` proves them for named
    size ranges. ``branch_free``: see :func:`_transpose_resize` (the op, whose graph is the op
    itself, skips the identity resize).
    """
    B, H, W, nh, c = q.shape
    t = q.permute(1, 2, 0, 3, 4).reshape(H, W, B * nh, c)
    out = torch.zeros(0, device=q.device, dtype=q.dtype)
    K = 0
    if pos_h is not None:
        K = pos_h.shape[1]
        out = torch.matmul(t, pos_h.to(q.dtype).transpose(1, 2).unsqueeze(1))
        if rel_pos_released:
            out = _transpose_resize(out.reshape(H, W, B * nh * K), branch_free).reshape(H, W, B * nh, K)
    if pos_w is not None:
        K = pos_w.shape[1]
        width = torch.matmul(t, pos_w.to(q.dtype).transpose(1, 2))
        out = width if pos_h is None else width + out
    return out.reshape(H, W, B, nh, K).permute(2, 0, 1, 3, 4)


def _position_backward(
        dl: torch.Tensor, q: torch.Tensor, pos_h: Optional[torch.Tensor], pos_w: Optional[torch.Tensor],
        rel_pos_released: bool, need_q: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """ Gradients (d q, d pos_h, d pos_w) of :func:`position_logits` for its output gradient ``dl``. """
    B, H, W, nh, c = q.shape
    K = dl.shape[-1]
    dq = dh = dw = None
    if pos_h is not None:
        dlh = dl
        if rel_pos_released:
            dlh = _transpose_resize_backward(dl.permute(1, 2, 0, 3, 4).reshape(H, W, B * nh * K))
            dlh = dlh.reshape(H, W, B, nh, K).permute(2, 0, 1, 3, 4)
        dlh = dlh.reshape(B, H, W * nh, K)
        dh = torch.matmul(dlh.transpose(2, 3), q.reshape(B, H, W * nh, c)).sum(0)
        if need_q:
            dq = torch.matmul(dlh, pos_h).view(B, H, W, nh, c)
    if pos_w is not None:
        dw = torch.einsum('byxhk,byxhc->xkc', dl, q)
        if need_q:
            width = torch.einsum('byxhk,xkc->byxhc', dl, pos_w)
            dq = width if dq is None else dq.add_(width)
    return dq, dh, dw


def _no_autocast(device_type: str):
    """ Autocast disabled (the internal products keep float32 / float64), where autocast exists. """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # half / bfloat16 are computed in float32: coordinates need sub-pixel accuracy, and the
    # gathers accumulate 4K products per output
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _cached(key, build):
    """ ``build()``, memoised per key (small index tensors that depend only on shapes). """
    out = _CACHE.get(key)
    if out is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        out = build()
        _CACHE[key] = out
    return out


def _axis_coords(H: int, W: int, device: torch.device, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """ (H, 1, 1, 1) row and (W, 1, 1) column pixel coordinates. """
    return _cached(('coords', H, W, str(device), dtype), lambda: (
        torch.arange(H, device=device, dtype=dtype).view(H, 1, 1, 1),
        torch.arange(W, device=device, dtype=dtype).view(W, 1, 1)))


def _row_base(B: int, H: int, W: int, nh: int, device: torch.device, itype: torch.dtype) -> torch.Tensor:
    """ (B, 1, 1, nh, 1) table row of the key of head h at pixel (0, 0) of image b. """
    def build():
        b = torch.arange(B, device=device, dtype=itype).view(B, 1, 1, 1, 1) * (H * W * 3 * nh)
        return b + torch.arange(nh, device=device, dtype=itype).view(1, 1, 1, nh, 1) + nh
    return _cached(('rows', B, H, W, nh, str(device), itype), build)


def _bag_index(n: int, bag_size: int, device: torch.device, itype: torch.dtype):
    """ offsets and offset2bag of ``n`` bags of ``bag_size`` consecutive entries. """
    def build():
        bags = torch.arange(n, device=device, dtype=itype)
        # contiguous: for n == 1 the flattened expand would keep stride 0, which embedding_bag refuses
        return bags * bag_size, bags.view(n, 1).expand(n, bag_size).contiguous().view(-1)
    return _cached(('bags', n, bag_size, str(device), itype), build)


def _corners(offset: torch.Tensor, height: int, width: int, nh: int, cdt: torch.dtype, need_grad: bool):
    """ Table rows and bilinear weights of the 4 corners of the K nodes of every (query, head).

    The table is qkv itself viewed as (B * H * W * 3 * nh, hd): the key of head h at pixel P is
    row (3P + 1) * nh + h, its value that row + nh. A corner outside the map gets weight zero
    and a clamped (valid) row. Works per axis on (B, H, W, nh, K) tensors.

    Returns:
        idx: (M * K * 4,) key rows (M = B * H * W * nh), corners ordered (y0, x0), (y0, x0 + 1),
            (y0 + 1, x0), (y0 + 1, x0 + 1); int32 when the table has fewer than 2**31 rows.
        w: (M, K, 4) bilinear weights, zero for corners outside the map.
        axes: with need_grad, (gy0, gy1, gx0, gx1, dgy0, dgy1, dgx0, dgx1), each (M, K): the
            per-axis weight factors (w of corner (a, b) = gy_a * gx_b) and their derivatives by
            the coordinate (zero where the coordinate lies outside [-1, L], where it is clamped).
    """
    B, _, _, _, K2 = offset.shape
    K = K2 // 2
    M = B * height * width * nh
    device = offset.device
    itype = torch.int32 if B * height * width * 3 * nh < 2 ** 31 - 1 else torch.int64
    off = offset.view(B, height, width, nh, K, 2) if offset.stride(-1) == 1 else offset.reshape(
        B, height, width, nh, K, 2)
    ys, xs = _axis_coords(height, width, device, cdt)
    # written into contiguous buffers: a result of ``off + ys`` would follow the layout of a
    # permuted ``offset``, and the per-axis tensors derived from these are viewed as (M, K) below
    py = torch.empty((B, height, width, nh, K), device=device, dtype=cdt)
    px = torch.empty_like(py)
    torch.add(off[..., 0], ys, out=py)
    torch.add(off[..., 1], xs, out=px)
    if need_grad:
        my = (py >= -1.) & (py <= height)
        mx = (px >= -1.) & (px <= width)
    y0, y1, gy0, gy1, iy0, iy1 = axis_corners(py, height, itype)
    x0, x1, gx0, gx1, ix0, ix1 = axis_corners(px, width, itype)
    w = torch.empty((B, height, width, nh, K, 4), device=device, dtype=cdt)
    torch.mul(gy0, gx0, out=w[..., 0])
    torch.mul(gy0, gx1, out=w[..., 1])
    torch.mul(gy1, gx0, out=w[..., 2])
    torch.mul(gy1, gx1, out=w[..., 3])
    # rows ((b * H + y) * W + x) * 3 * nh + nh + h of the corners (clamped into the map)
    base = _row_base(B, height, width, nh, device, itype)
    ry0 = y0.mul_(width * 3 * nh).add_(base)
    ry1 = y1.mul_(width * 3 * nh).add_(base)
    cx0 = x0.mul_(3 * nh)
    cx1 = x1.mul_(3 * nh)
    idx = torch.empty((B, height, width, nh, K, 4), device=device, dtype=itype)
    torch.add(ry0, cx0, out=idx[..., 0])
    torch.add(ry0, cx1, out=idx[..., 1])
    torch.add(ry1, cx0, out=idx[..., 2])
    torch.add(ry1, cx1, out=idx[..., 3])
    axes = None
    if need_grad:
        dgy1 = (iy1 & my).to(cdt)
        dgx1 = (ix1 & mx).to(cdt)
        dgy0 = (iy0 & my).to(cdt).neg_()
        dgx0 = (ix0 & mx).to(cdt).neg_()
        axes = tuple(t.view(M, K) for t in (gy0, gy1, gx0, gx1, dgy0, dgy1, dgx0, dgx1))
    return idx.view(-1), w.view(M, K, 4), axes


def _gather_dot(rows_of: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, bag_size: int) -> torch.Tensor:
    """ out[j] = <rows_of[j // bag_size], table[idx[j]]>, fused (no gathered copy). """
    offsets, offset2bag = _bag_index(rows_of.shape[0], bag_size, idx.device, idx.dtype)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows_of, table, idx, offsets, offset2bag, 0, -1)


def _gather_sum(idx: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ out[m] = sum_j weights[m, j] * table[idx[m, j]], fused. idx, weights: (M, J). """
    return F.embedding_bag(idx, table, per_sample_weights=weights, mode='sum')


def _scaled_tables(pos_h, pos_w, scale: float, cdt: torch.dtype):
    """ The position tables divided by ``scale``: their products with the scaled queries are the
    products with the unscaled ones. """
    return tuple(None if t is None else t.to(cdt) * (1. / scale) for t in (pos_h, pos_w))


def _corner_logits(qkv, offset, bias, scale: float, pos_h=None, pos_w=None, rel_pos_released: bool = False,
                   need_grad: bool = False):
    """ Corners, scaled queries, the table, the corner dots <scale q, K[i_kc]> (M, K, 4) and the
    softmax weights p (M, K). """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    M = B * H * W * nh
    cdt = _compute_dtype(qkv.dtype, offset.dtype)
    idx, w, axes = _corners(offset, H, W, nh, cdt, need_grad)
    table = qkv.to(cdt).contiguous()  # no copy for a contiguous float32 / float64 qkv
    qs = (table[:, :, :, 0] * scale).view(M, hd)
    table = table.view(-1, hd)
    dots = _gather_dot(qs, table, idx, K * _CORNERS).view(M, K, _CORNERS)
    logits = torch.einsum('mkc,mkc->mk', dots, w)
    if bias is not None:
        logits += bias.reshape(M, K)
    if pos_h is not None or pos_w is not None:
        th, tw = _scaled_tables(pos_h, pos_w, scale, cdt)
        logits.view(B, H, W, nh, K).add_(position_logits(qs.view(B, H, W, nh, hd), th, tw, rel_pos_released, False))
    # softmax over the K nodes, in place (faster than torch.softmax over a short last dim)
    p = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return idx, w, axes, qs, table, dots, p.div_(p.sum(dim=-1, keepdim=True))


def _attend(qkv, offset, bias, scale: float, pos_h=None, pos_w=None, rel_pos_released: bool = False
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ The gather kernel's forward: out (B, H, W, nh, hd), p (B, H, W, nh, K), dots (B, H, W, nh, K, 4). """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    M = B * H * W * nh
    with _no_autocast(qkv.device.type):
        idx, w, _, _, table, dots, p = _corner_logits(qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released)
        # value rows are key rows + nh: a view of the same table starting nh rows later
        out = _gather_sum(idx.view(M, -1), table[nh:], w.mul_(p.unsqueeze(-1)).view(M, -1))
    return out.view(B, H, W, nh, hd).to(qkv.dtype), p.view(B, H, W, nh, K), dots.view(B, H, W, nh, K, 4)


def _uses_triton(qkv: torch.Tensor) -> bool:
    return qkv.device.type == 'cuda' and qkv.dtype != torch.float64 and triton_available()


@torch.library.custom_op('dgmn_timm::sampled_attention_fwd', mutates_args=())
def sampled_attention_fwd(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        pos_h: Optional[torch.Tensor] = None, pos_w: Optional[torch.Tensor] = None, rel_pos_released: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ :func:`sampled_attention` plus two tensors its backward reuses: for the gather kernel the
    softmax weights (B, H, W, nh, K) and the corner dots (B, H, W, nh, K, 4); for the Triton
    kernel the log-sum-exp of the logits (B, H, W, nh) and an empty tensor. """
    _check_inputs(qkv, offset, bias, pos_h, pos_w)
    return _attend(qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released)


@sampled_attention_fwd.register_fake
def _(qkv, offset, bias, scale, pos_h=None, pos_w=None, rel_pos_released=False):
    K = _check_inputs(qkv, offset, bias, pos_h, pos_w)
    B, H, W, _, nh, hd = qkv.shape
    out = qkv.new_empty((B, H, W, nh, hd))
    if _uses_triton(qkv):
        return out, qkv.new_empty((B, H, W, nh), dtype=torch.float32), qkv.new_empty(0, dtype=torch.float32)
    cdt = _compute_dtype(qkv.dtype, offset.dtype)
    return out, qkv.new_empty((B, H, W, nh, K), dtype=cdt), qkv.new_empty((B, H, W, nh, K, 4), dtype=cdt)


def _triton_bias(qkv, bias, pos_h, pos_w, rel_pos_released: bool):
    """ ``bias`` plus the position term (float32), the logits the Triton kernel adds. """
    if pos_h is None and pos_w is None:
        return bias
    pos = position_logits(qkv[:, :, :, 0].float(), pos_h, pos_w, rel_pos_released, False)
    return pos if bias is None else pos + bias.float()


def _triton_attend(qkv, offset, bias, scale: float, pos_h, pos_w, rel_pos_released: bool):
    """ The forward with the Triton kernel: out, the log-sum-exp of the logits and an empty tensor. """
    from .triton_sampled_attention import triton_forward
    out, lse = triton_forward(qkv, offset, _triton_bias(qkv, bias, pos_h, pos_w, rel_pos_released), scale)
    return out, lse, lse.new_empty(0)


@sampled_attention_fwd.register_kernel('cuda')
def _(qkv, offset, bias, scale, pos_h=None, pos_w=None, rel_pos_released=False):
    _check_inputs(qkv, offset, bias, pos_h, pos_w)
    if _uses_triton(qkv):
        with _no_autocast('cuda'):
            return _triton_attend(qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released)
    return _attend(qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released)


torch.library.define(
    'dgmn_timm::sampled_attention',
    '(Tensor qkv, Tensor offset, Tensor? bias, float scale, Tensor? pos_h=None, Tensor? pos_w=None, '
    'bool rel_pos_released=False) -> Tensor')


@torch.library.impl('dgmn_timm::sampled_attention', 'CompositeImplicitAutograd')
def _sampled_attention(qkv, offset, bias, scale, pos_h=None, pos_w=None, rel_pos_released=False):
    return torch.ops.dgmn_timm.sampled_attention_fwd(qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released)[0]


# the registered op: callable from Python, TorchScript, torch.compile, FX and torch.export
sampled_attention = torch.ops.dgmn_timm.sampled_attention
sampled_attention.__doc__ = """ Sampled attention (see the module doc): (B, H, W, nh, hd) output.

    sampled_attention(qkv, offset, bias, scale, pos_h=None, pos_w=None, rel_pos_released=False)

    qkv: (B, H, W, 3, nh, hd); offset: (B, H, W, nh, 2K) displacements (dy, dx) of the K nodes
    from their query, in pixels; bias: (B, H, W, nh, K) logits added before the softmax, or None;
    scale: multiplies <q, k>; pos_h (H, K, hd), pos_w (W, K, hd), rel_pos_released: the position
    term of the module doc (:func:`position_logits`), or None.

    CPU (and any device without a kernel of its own): the gather kernel; CUDA: the Triton
    kernel when Triton is installed (float64 takes the gather kernel there too). Half-precision
    inputs are computed in float32 and the result is cast back to ``qkv``'s dtype. Decomposes
    into ``dgmn_timm::sampled_attention_fwd`` (which also returns what the backward reuses).
    """


@torch.library.custom_op('dgmn_timm::sampled_attention_backward', mutates_args=())
def sampled_attention_backward(
        grad_out: torch.Tensor, qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor],
        pos_h: Optional[torch.Tensor], pos_w: Optional[torch.Tensor], out: torch.Tensor, saved1: torch.Tensor,
        saved2: torch.Tensor, scale: float, rel_pos_released: bool, need_qkv: bool, need_offset: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ Gradients (d qkv, d offset, d bias, d pos_h, d pos_w) of ``sampled_attention_fwd``'s output,
    given its outputs; d qkv / d offset are empty tensors where ``need_qkv`` / ``need_offset`` is
    False, d pos_h / d pos_w where the table is None. """
    with _no_autocast(qkv.device.type):
        return _attend_backward(
            grad_out, qkv, offset, bias, pos_h, pos_w, saved1, saved2, scale, rel_pos_released, need_qkv, need_offset)


def _table_grads(qkv, grad_pos_h, grad_pos_w, pos_h, pos_w):
    """ The tables' gradients in their dtypes, empty tensors for absent tables. """
    return tuple(qkv.new_empty(0) if t is None else g.to(t.dtype)
                 for g, t in ((grad_pos_h, pos_h), (grad_pos_w, pos_w)))


def _attend_backward(grad_out, qkv, offset, bias, pos_h, pos_w, p, dots, scale: float, rel_pos_released: bool,
                     need_qkv: bool, need_offset: bool):
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    M = B * H * W * nh
    cdt = _compute_dtype(qkv.dtype, offset.dtype)
    idx, w, axes = _corners(offset, H, W, nh, cdt, need_offset)
    table = qkv.to(cdt).contiguous()
    qs = (table[:, :, :, 0] * scale).view(M, hd)
    table = table.view(-1, hd)
    p = p.view(M, K)
    dots = dots.view(M, K, _CORNERS)
    go = grad_out.to(cdt).reshape(M, hd)

    # d out / d (p_k w_kc) = <go, V[i_kc]>
    vdots = _gather_dot(go, table[nh:], idx, K * _CORNERS).view(M, K, _CORNERS)
    dp = torch.bmm(vdots.view(M * K, 1, _CORNERS), w.view(M * K, _CORNERS, 1)).view(M, K)
    dlogits = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward, (M, K)
    grad_qkv, grad_offset = qkv.new_empty(0), qkv.new_empty(0)  # distinct: outputs may not alias
    grad_pos_q = grad_pos_h = grad_pos_w = None
    if pos_h is not None or pos_w is not None:
        # the position term of the scaled queries with the scaled tables: d qs, and d table = d scaled table / scale
        th, tw = _scaled_tables(pos_h, pos_w, scale, cdt)
        grad_pos_q, grad_pos_h, grad_pos_w = _position_backward(
            dlogits.view(B, H, W, nh, K), qs.view(B, H, W, nh, hd), th, tw, rel_pos_released, need_qkv)
        grad_pos_h, grad_pos_w = (None if g is None else g.mul_(1. / scale) for g in (grad_pos_h, grad_pos_w))
    if need_qkv:
        wk = w * dlogits.unsqueeze(-1)  # d logits / d <scaled q, K[i_kc]>
        wp = w * p.unsqueeze(-1)
        # the scatter into the key / value rows, written as gathers: sort the corner entries by
        # key row, then one bag per key (and its value) over the queries that read it; key rows in
        # table order are the (pixel, head) order of the keys, so the bags come out as (B, H, W, nh, hd)
        flat = idx.view(-1)
        order = torch.sort(flat)[1]
        bag_offsets = flat.new_zeros(M + 1, dtype=torch.int64)
        counts = torch.bincount(flat, minlength=table.shape[0]).view(B * H * W, 3, nh)[:, 1]
        torch.cumsum(counts.reshape(-1), 0, out=bag_offsets[1:])
        src = order // (K * _CORNERS)
        grad_k = F.embedding_bag(
            src, qs, bag_offsets, mode='sum', per_sample_weights=wk.view(-1).index_select(0, order),
            include_last_offset=True)
        grad_v = F.embedding_bag(
            src, go, bag_offsets, mode='sum', per_sample_weights=wp.view(-1).index_select(0, order),
            include_last_offset=True)
        # query rows: no corner reads them
        grad_q = _gather_sum(idx.view(M, -1), table, wk.view(M, -1))
        if grad_pos_q is not None:
            grad_q += grad_pos_q.view(M, hd)
        grad_q.mul_(scale)
        grad_qkv = torch.stack([g.view(B, H, W, nh, hd) for g in (grad_q, grad_k, grad_v)], dim=3)
        grad_qkv = grad_qkv.to(qkv.dtype)
    if need_offset:
        # d / d w_kc, then through w of corner (a, b) = gy_a * gx_b
        gy0, gy1, gx0, gx1, dgy0, dgy1, dgx0, dgx1 = axes
        dw00, dw01, dw10, dw11 = torch.addcmul(vdots * p.unsqueeze(-1), dots, dlogits.unsqueeze(-1)).unbind(-1)
        grad_offset = torch.empty((B, H, W, nh, K, 2), device=qkv.device, dtype=cdt)
        dfy = (dw00 * gx0).addcmul_(dw01, gx1).mul_(dgy0)
        dfy.addcmul_((dw10 * gx0).addcmul_(dw11, gx1), dgy1)
        dfx = (dw00 * gy0).addcmul_(dw10, gy1).mul_(dgx0)
        dfx.addcmul_((dw01 * gy0).addcmul_(dw11, gy1), dgx1)
        grad_offset[..., 0] = dfy.view(B, H, W, nh, K)
        grad_offset[..., 1] = dfx.view(B, H, W, nh, K)
        grad_offset = grad_offset.view(B, H, W, nh, 2 * K).to(offset.dtype)
    grad_bias = dlogits.view(B, H, W, nh, K).to(qkv.dtype if bias is None else bias.dtype)
    return (grad_qkv, grad_offset, grad_bias) + _table_grads(qkv, grad_pos_h, grad_pos_w, pos_h, pos_w)


@sampled_attention_backward.register_fake
def _(grad_out, qkv, offset, bias, pos_h, pos_w, out, saved1, saved2, scale, rel_pos_released, need_qkv, need_offset):
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    grad_qkv = qkv.new_empty(qkv.shape) if need_qkv else qkv.new_empty(0)
    grad_offset = offset.new_empty(offset.shape) if need_offset else qkv.new_empty(0)
    grad_bias = qkv.new_empty((B, H, W, nh, K), dtype=qkv.dtype if bias is None else bias.dtype)
    return (grad_qkv, grad_offset, grad_bias) + tuple(
        qkv.new_empty(0) if t is None else t.new_empty(t.shape) for t in (pos_h, pos_w))


def _triton_attend_backward(grad_out, qkv, offset, bias, pos_h, pos_w, out, lse, scale: float,
                            rel_pos_released: bool, need_qkv: bool, need_offset: bool):
    """ The backward with the Triton kernel; the position term's gradients from the logits' gradient. """
    from .triton_sampled_attention import triton_backward
    logits_bias = _triton_bias(qkv, bias, pos_h, pos_w, rel_pos_released)
    grad_qkv, grad_offset, grad_logits = triton_backward(grad_out, qkv, offset, logits_bias, out, lse, scale)
    grad_bias = grad_logits.to(qkv.dtype if bias is None else bias.dtype)
    grad_pos_h = grad_pos_w = None
    if pos_h is not None or pos_w is not None:
        th, tw = (None if t is None else t.float() for t in (pos_h, pos_w))
        grad_pos_q, grad_pos_h, grad_pos_w = _position_backward(
            grad_logits.float(), qkv[:, :, :, 0].float(), th, tw, rel_pos_released, need_qkv)
        if need_qkv:
            grad_qkv[:, :, :, 0] += grad_pos_q.to(grad_qkv.dtype)  # a tensor triton_backward allocated
    return ((grad_qkv if need_qkv else qkv.new_empty(0), grad_offset if need_offset else qkv.new_empty(0), grad_bias)
            + _table_grads(qkv, grad_pos_h, grad_pos_w, pos_h, pos_w))


@sampled_attention_backward.register_kernel('cuda')
def _(grad_out, qkv, offset, bias, pos_h, pos_w, out, saved1, saved2, scale, rel_pos_released, need_qkv, need_offset):
    with _no_autocast('cuda'):
        if _uses_triton(qkv):
            return _triton_attend_backward(grad_out, qkv, offset, bias, pos_h, pos_w, out, saved1, scale,
                                           rel_pos_released, need_qkv, need_offset)
        return _attend_backward(grad_out, qkv, offset, bias, pos_h, pos_w, saved1, saved2, scale,
                                rel_pos_released, need_qkv, need_offset)


def _setup_context(ctx, inputs, output):
    qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released = inputs
    ctx.save_for_backward(qkv, offset, bias, pos_h, pos_w, *output)
    ctx.scale = scale
    ctx.rel_pos_released = rel_pos_released


def _backward(ctx, grad_out, _grad_saved1, _grad_saved2):
    qkv, offset, bias, pos_h, pos_w, out, saved1, saved2 = ctx.saved_tensors
    # one flag per argument passed (the trailing defaults may be left out)
    needs = tuple(ctx.needs_input_grad) + (False,) * (7 - len(ctx.needs_input_grad))
    need_qkv, need_offset, need_bias, _, need_pos_h, need_pos_w, _ = needs
    grads = torch.ops.dgmn_timm.sampled_attention_backward(
        grad_out, qkv, offset, bias, pos_h, pos_w, out, saved1, saved2, ctx.scale, ctx.rel_pos_released, need_qkv,
        need_offset)
    grads = (grads[0], grads[1], grads[2], None, grads[3], grads[4], None)
    return tuple(g if need else None for g, need in zip(grads, needs))[:len(ctx.needs_input_grad)]


sampled_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


sampled_attention_backward.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)


# The op's cost, for torch.utils.flop_counter.FlopCounterMode (which counts 2 FLOPs per multiply-add).
# Registered on the two ops the dispatcher sees (the public op is a composite over them).
def _forward_macs(qkv_shape, offset_shape, pos_h, pos_w) -> int:
    """ Multiply-adds of the forward: per (query, head) and node, hd for <q, k>, hd for p v, 8 hd
    for the bilinear reads of key and value (4 corners each), hd per position table. """
    B, H, W, _, nh, hd = qkv_shape
    K = offset_shape[-1] // 2
    return B * H * W * nh * K * hd * (10 + (pos_h is not None) + (pos_w is not None))


@register_flop_formula(torch.ops.dgmn_timm.sampled_attention_fwd)
def _fwd_flops(qkv, offset, bias=None, scale=1., pos_h=None, pos_w=None, rel_pos_released=False, *,
               out_shape=None, **kwargs) -> int:
    return 2 * _forward_macs(qkv, offset, pos_h, pos_w)


@register_flop_formula(torch.ops.dgmn_timm.sampled_attention_backward)
def _backward_flops(grad_out, qkv, offset, bias, pos_h, pos_w, out, saved1, saved2, scale, rel_pos_released,
                    need_qkv, need_offset, *, out_shape=None, **kwargs) -> int:
    """ With d qkv: twice the forward (each product gives a gradient to both factors). Without it: the
    output gradient against the 4K value corners (for the weights and the offsets) and the tables' gradients. """
    if need_qkv:
        return 4 * _forward_macs(qkv, offset, pos_h, pos_w)
    B, H, W, _, nh, hd = qkv
    K = offset[-1] // 2
    return 2 * B * H * W * nh * K * hd * (4 + (pos_h is not None) + (pos_w is not None))


def attention_weights(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float,
        pos_h: Optional[torch.Tensor] = None, pos_w: Optional[torch.Tensor] = None,
        rel_pos_released: bool = False) -> torch.Tensor:
    """ (B, H, W, nh, K) softmax weights of the nodes, as the op's forward computes them (no autograd). """
    K = _check_inputs(qkv, offset, bias, pos_h, pos_w)
    B, H, W, _, nh, _ = qkv.shape
    with torch.no_grad(), _no_autocast(qkv.device.type):
        p = _corner_logits(qkv, offset, bias, scale, pos_h, pos_w, rel_pos_released)[-1]
    return p.view(B, H, W, nh, K)
