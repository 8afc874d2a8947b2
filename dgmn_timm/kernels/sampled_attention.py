""" Sampled attention: every query attends to K bilinearly sampled key/value nodes.

Layout (token-major, the layout a ``Linear`` over channels-last tokens produces):

- ``qkv``: (B, H, W, 3, nh, hd) queries, keys and values of ``nh`` heads (any strides).
- ``offset``: (B, H, W, nh, 2K). Node k of the query at pixel (y, x) is read at
  (y + offset[..., 2k], x + offset[..., 2k + 1]): the full displacement from the query, in
  pixels. A layer with a base neighbourhood (DGMN2: a 3x3 grid) adds it to its walks first.
  May be an expanded (stride-0) tensor, e.g. over heads.
- ``bias``: (B, H, W, nh, K) logits added before the softmax (e.g. a position term), or None.
- ``scale``: multiplies <q, k>.
- result: (B, H, W, nh, hd) = sum_k softmax_k(scale * <q, k_k> + bias_k) v_k.

Sampling is bilinear and a corner outside the map reads zero (the deformable-convolution
convention; ``grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``).

Entry points:

- :func:`sampled_attention`: the op ``torch.ops.dgmn_timm.sampled_attention``
  (``torch.library.custom_op`` with fake and autograd registrations). The dispatcher runs the
  gather kernel below on CPU (and any other device) and the Triton kernel
  (``triton_sampled_attention``) on CUDA when Triton is installed. torch.compile, torch.export
  and FX see one opaque call. Its backward is a second op,
  ``torch.ops.dgmn_timm.sampled_attention_backward``, which refuses double backward.
- :func:`sampled_attention_portable`: ``grid_sample`` plus plain tensor ops; autograd-native
  (double backward), TorchScript-scriptable, ONNX-exportable, supports attention dropout.
  Layers choose it at construction.
- :func:`sampled_attention_reference`: float64 oracle, explicit corner reads, no
  ``grid_sample``; the tests compare every path with it.

Gather kernel (CPU)
-------------------
Bilinear sampling is linear in the map, so a sampled key is a weighted sum of 4 table rows
and the attention can be written with two fused gathers of PyTorch's embedding-bag kernels,
without materialising the K-fold sampled keys and values:

- logits_k = scale * <q, sum_c w_kc K[i_kc]> + b_k = sum_c w_kc <scale q, K[i_kc]> + b_k: the
  4K dot products per query are one ``_embedding_bag_per_sample_weights_backward`` call
  (a gather-dot, no copies).
- out = sum_k p_k sum_c w_kc V[i_kc]: one ``embedding_bag(mode='sum')`` with 4K rows per query
  and weights p_k * w_kc.

Keys and values are copied once into a table zero-padded by one row/column on top/left and
two on bottom/right, so every corner index is valid, a corner outside the map reads a zero
row, and positions can be clamped to the padded range without changing any value (beyond
it all 4 corners are zero, and so is the gradient). The backward recomputes the corners and
the softmax from the inputs (the op saves only its inputs), then: the corner weights'
gradients are two more gather-dots, dq is one embedding bag, and the scatter into the
key/value table is written as gathers too: the corner indices are sorted once and the
transposed bags are embedding bags over the queries (``include_last_offset``).
"""
import contextlib
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..sampling import pixel_grid

__all__ = [
    'sampled_attention', 'sampled_attention_portable', 'sampled_attention_reference', 'attention_weights',
    'triton_available', 'DOUBLE_BACKWARD_MESSAGE',
]

DOUBLE_BACKWARD_MESSAGE = (
    "Double backward (create_graph=True, e.g. a gradient penalty) through DGMN's fused sampled "
    "attention (torch.ops.dgmn_timm.sampled_attention) is not supported: its backward is hand-written. "
    "Use the autograd-native grid_sample path: create the model after timm.layers.set_fused_attn(False) "
    "(or with the environment variable TIMM_FUSED_ATTN=0).")

_CORNERS = 4
# base grids (pixel coordinates + 1, the table's padding) per (H, W, device, dtype)
_BASE_GRIDS: Dict[Tuple[int, int, str, torch.dtype], torch.Tensor] = {}
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


def _check_inputs(qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
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
    if not (qkv.is_floating_point() and offset.is_floating_point() and (bias is None or bias.is_floating_point())):
        raise ValueError('sampled_attention: qkv, offset and bias must be floating point')
    return K


def _no_autocast(device_type: str):
    """ Autocast disabled (the internal products keep float32 / float64), where autocast exists. """
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    # half / bfloat16 are computed in float32: coordinates need sub-pixel accuracy, and the
    # gathers accumulate 4K products per output
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _base_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ (H, W, 1, 1, 2) padded pixel coordinates (y + 1, x + 1), cached. """
    key = (height, width, str(device), dtype)
    grid = _BASE_GRIDS.get(key)
    if grid is None:
        if len(_BASE_GRIDS) > 64:
            _BASE_GRIDS.clear()
        ys = torch.arange(1, height + 1, device=device, dtype=dtype)
        xs = torch.arange(1, width + 1, device=device, dtype=dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), dim=-1).view(height, width, 1, 1, 2)
        _BASE_GRIDS[key] = grid
    return grid


def _corner_const(which: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """ Per-corner constants: 0 / 1 = base / sign of the row factor, 2 / 3 = of the column factor. """
    table = ((1., 1., 0., 0.), (-1., -1., 1., 1.), (1., 0., 1., 0.), (-1., 1., -1., 1.))
    return torch.tensor(table[which], device=device, dtype=dtype)


def _corners(offset: torch.Tensor, height: int, width: int, cdt: torch.dtype, need_mask: bool):
    """ Corner rows and bilinear weights of the K nodes of every (query, head).

    The table the rows index is the zero-padded key/value map (B, H + 3, W + 3, 2, nh, hd)
    viewed as (rows, hd): the key of head h at padded pixel P is row 2 * nh * P + h, its value
    row 2 * nh * P + nh + h.

    Returns:
        idx: (M * K * 4,) key rows (M = B * H * W * nh), corners ordered (y0, x0), (y0, x0 + 1),
            (y0 + 1, x0), (y0 + 1, x0 + 1); int32 when the table has fewer than 2**31 rows.
        w, gy, gx: (M, K, 4) bilinear weights and their row / column factors (w = gy * gx).
        mask: (M, K, 2) bool, where the unclamped coordinate lies in the padded range (where it
            has a gradient), or None.
    """
    B, _, _, nh, K2 = offset.shape
    K = K2 // 2
    device = offset.device
    Hp, Wp = height + 3, width + 3
    itype = torch.int32 if B * Hp * Wp * 2 * nh < 2 ** 31 - 1 else torch.int64
    M = B * height * width * nh

    pos = offset.reshape(B, height, width, nh, K, 2).to(cdt) + _base_grid(height, width, device, cdt)
    lim = torch.tensor([height + 1., width + 1.], device=device, dtype=cdt)
    mask = ((pos >= 0.) & (pos <= lim)).view(M, K, 2) if need_mask else None
    # beyond the padded range all 4 corners read zeros: clamping changes no value
    pos = torch.clamp(pos, min=torch.zeros_like(lim), max=lim)
    frac = torch.frac(pos)  # pos >= 0: truncation is floor
    fl = pos.to(itype)
    stride = torch.tensor([Wp * 2 * nh, 2 * nh], device=device, dtype=itype)
    corner = torch.tensor([0, 2 * nh, Wp * 2 * nh, (Wp + 1) * 2 * nh], device=device, dtype=itype)
    corner = (corner + (torch.arange(B, device=device, dtype=itype) * (Hp * Wp * 2 * nh)).view(B, 1, 1, 1, 1, 1)
              + torch.arange(nh, device=device, dtype=itype).view(1, 1, 1, nh, 1, 1))
    idx = ((fl * stride).sum(-1, dtype=itype).unsqueeze(-1) + corner).view(-1)
    # factors of the 4 corner weights, (1 - f) or f per axis: base + f * sign
    gy = torch.addcmul(_corner_const(0, device, cdt), frac[..., 0:1], _corner_const(1, device, cdt)).view(M, K, 4)
    gx = torch.addcmul(_corner_const(2, device, cdt), frac[..., 1:2], _corner_const(3, device, cdt)).view(M, K, 4)
    return idx, gy * gx, gy, gx, mask


def _gather_dot(rows_of: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, bag_size: int) -> torch.Tensor:
    """ out[j] = <rows_of[j // bag_size], table[idx[j]]>, fused (no gathered copy). """
    n = rows_of.shape[0]
    bags = torch.arange(n, device=idx.device, dtype=idx.dtype)
    offsets = bags * bag_size
    offset2bag = bags.view(n, 1).expand(n, bag_size).reshape(-1)
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows_of, table, idx, offsets, offset2bag, 0, -1)


def _gather_sum(idx: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ out[m] = sum_j weights[m, j] * table[idx[m, j]], fused. idx, weights: (M, J). """
    return F.embedding_bag(idx, table, per_sample_weights=weights, mode='sum')


def _tables(qkv: torch.Tensor, scale: float, cdt: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """ Scaled queries (M, hd) and the padded key/value table (rows, hd), see ``_corners``. """
    B, H, W, _, nh, hd = qkv.shape
    qs = (qkv[:, :, :, 0].to(cdt) * scale).reshape(-1, hd)
    # (B, H + 3, W + 3, 2, nh, hd): zero only the border, copy the interior
    kv = qkv.new_empty((B, H + 3, W + 3, 2, nh, hd), dtype=cdt)
    kv[:, :1].zero_()
    kv[:, H + 1:].zero_()
    kv[:, 1:H + 1, :1].zero_()
    kv[:, 1:H + 1, W + 1:].zero_()
    kv[:, 1:H + 1, 1:W + 1].copy_(qkv[:, :, :, 1:])
    return qs, kv.view(-1, hd)


def _attend(qkv, offset, bias, scale, need_mask: bool = False):
    """ The gather kernel's forward; returns out (M, hd) and what the backward needs. """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    M = B * H * W * nh
    cdt = _compute_dtype(qkv.dtype, offset.dtype)
    idx, w, gy, gx, mask = _corners(offset, H, W, cdt, need_mask)
    qs, table = _tables(qkv, scale, cdt)
    dots = _gather_dot(qs, table, idx, K * _CORNERS).view(M, K, _CORNERS)
    logits = (dots * w).sum(-1)
    if bias is not None:
        logits += bias.reshape(M, K)
    p = logits.softmax(dim=-1)
    wp = w * p.unsqueeze(-1)
    # value rows are key rows + nh: a view of the same table starting nh rows later
    out = _gather_sum(idx.view(M, -1), table[nh:], wp.view(M, -1))
    return out, (qs, table, idx, w, gy, gx, mask, p, dots, wp)


@torch.library.custom_op('dgmn_timm::sampled_attention', mutates_args=())
def sampled_attention(qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """ Sampled attention (see the module doc): (B, H, W, nh, hd) output.

    Args:
        qkv: (B, H, W, 3, nh, hd).
        offset: (B, H, W, nh, 2K) displacements (dy, dx) of the K nodes from their query, in pixels.
        bias: (B, H, W, nh, K) logits added before the softmax, or None.
        scale: multiplies <q, k>.

    CPU (and any device without a kernel of its own): the gather kernel; CUDA: the Triton kernel
    when Triton is installed (float64 takes the gather kernel there too). Half-precision inputs
    are computed in float32 and the result is cast back to ``qkv``'s dtype.
    """
    _check_inputs(qkv, offset, bias)
    B, H, W, _, nh, hd = qkv.shape
    with _no_autocast(qkv.device.type):
        out, _ = _attend(qkv, offset, bias, scale)
    return out.view(B, H, W, nh, hd).to(qkv.dtype)


@sampled_attention.register_fake
def _(qkv, offset, bias, scale):
    _check_inputs(qkv, offset, bias)
    B, H, W, _, nh, hd = qkv.shape
    return qkv.new_empty((B, H, W, nh, hd))


@torch.library.custom_op('dgmn_timm::sampled_attention_backward', mutates_args=())
def sampled_attention_backward(
        grad_out: torch.Tensor, qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor],
        out: torch.Tensor, scale: float, need_qkv: bool, need_offset: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ Gradients (d qkv, d offset, d bias) of :func:`sampled_attention`; d qkv / d offset are empty
    tensors where ``need_qkv`` / ``need_offset`` is False. ``out`` is the forward's result (the
    Triton kernel uses it). """
    with _no_autocast(qkv.device.type):
        return _attend_backward(grad_out, qkv, offset, bias, scale, need_qkv, need_offset)


def _attend_backward(grad_out, qkv, offset, bias, scale: float, need_qkv: bool, need_offset: bool):
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    Hp, Wp = H + 3, W + 3
    _, (qs, table, idx, w, gy, gx, mask, p, dots, wp) = _attend(qkv, offset, bias, scale, need_mask=need_offset)
    M = qs.shape[0]
    cdt = qs.dtype
    go = grad_out.to(cdt).reshape(M, hd)

    # d out / d (p_k w_kc) = <go, V[i_kc]>
    vdots = _gather_dot(go, table[nh:], idx, K * _CORNERS).view(M, K, _CORNERS)
    dp = (vdots * w).sum(-1)
    dlogits = p * (dp - (p * dp).sum(-1, keepdim=True))  # softmax backward, (M, K)
    grad_qkv = grad_offset = qkv.new_empty(0)
    if need_qkv:
        wk = w * dlogits.unsqueeze(-1)  # d logits / d <scaled q, K[i_kc]>
        dq = _gather_sum(idx.view(M, -1), table, wk.view(M, -1)) * scale
        # the scatter into the table, written as gathers: sort the corner entries by row, then
        # one bag per table row over the queries that read it
        flat = idx.view(-1)
        sorted_rows, order = torch.sort(flat)
        bag_offsets = flat.new_zeros(table.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(flat, minlength=table.shape[0]), 0, out=bag_offsets[1:])
        src = order // (K * _CORNERS)
        grad_table = F.embedding_bag(
            src, qs, bag_offsets, mode='sum', per_sample_weights=wk.view(-1).index_select(0, order),
            include_last_offset=True)
        grad_v = F.embedding_bag(
            src, go, bag_offsets, mode='sum', per_sample_weights=wp.view(-1).index_select(0, order),
            include_last_offset=True)
        grad_table[nh:] += grad_v[:-nh]  # value rows are key rows + nh
        grad_kv = grad_table.view(B, Hp, Wp, 2, nh, hd)[:, 1:H + 1, 1:W + 1]
        grad_qkv = torch.cat((dq.view(B, H, W, 1, nh, hd), grad_kv), dim=3).to(qkv.dtype)
    if need_offset:
        # d/dw_kc, then through w_kc = gy * gx with d gy / d fy = +-1 (fy = position - floor)
        dw = torch.addcmul(vdots * p.unsqueeze(-1), dots, dlogits.unsqueeze(-1))
        dfy = torch.matmul(dw * gx, _corner_const(1, dw.device, dw.dtype))
        dfx = torch.matmul(dw * gy, _corner_const(3, dw.device, dw.dtype))
        grad_offset = (torch.stack((dfy, dfx), dim=-1) * mask).view(B, H, W, nh, 2 * K).to(offset.dtype)
    grad_bias = dlogits.view(B, H, W, nh, K).to(qkv.dtype if bias is None else bias.dtype)
    return grad_qkv, grad_offset, grad_bias


@sampled_attention_backward.register_fake
def _(grad_out, qkv, offset, bias, out, scale, need_qkv, need_offset):
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    grad_qkv = qkv.new_empty(qkv.shape) if need_qkv else qkv.new_empty(0)
    grad_offset = offset.new_empty(offset.shape) if need_offset else qkv.new_empty(0)
    grad_bias = qkv.new_empty((B, H, W, nh, K), dtype=qkv.dtype if bias is None else bias.dtype)
    return grad_qkv, grad_offset, grad_bias


def _setup_context(ctx, inputs, output):
    qkv, offset, bias, scale = inputs
    ctx.save_for_backward(qkv, offset, bias, output)
    ctx.scale = scale


def _backward(ctx, grad_out):
    qkv, offset, bias, out = ctx.saved_tensors
    need_qkv, need_offset, need_bias = ctx.needs_input_grad[:3]
    grad_qkv, grad_offset, grad_bias = torch.ops.dgmn_timm.sampled_attention_backward(
        grad_out, qkv, offset, bias, out, ctx.scale, need_qkv, need_offset)
    return (grad_qkv if need_qkv else None, grad_offset if need_offset else None,
            grad_bias if need_bias else None, None)


sampled_attention.register_autograd(_backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)


sampled_attention_backward.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)


@sampled_attention.register_kernel('cuda')
def _(qkv, offset, bias, scale):
    _check_inputs(qkv, offset, bias)
    if qkv.dtype != torch.float64 and triton_available():
        from .triton_sampled_attention import triton_forward
        return triton_forward(qkv, offset, bias, scale)
    B, H, W, _, nh, hd = qkv.shape
    with _no_autocast('cuda'):
        out, _ = _attend(qkv, offset, bias, scale)
    return out.view(B, H, W, nh, hd).to(qkv.dtype)


@sampled_attention_backward.register_kernel('cuda')
def _(grad_out, qkv, offset, bias, out, scale, need_qkv, need_offset):
    if qkv.dtype != torch.float64 and triton_available():
        from .triton_sampled_attention import triton_backward
        grad_qkv, grad_offset, grad_bias = triton_backward(grad_out, qkv, offset, bias, out, scale)
        return (grad_qkv if need_qkv else qkv.new_empty(0), grad_offset if need_offset else qkv.new_empty(0),
                grad_bias)
    with _no_autocast('cuda'):
        return _attend_backward(grad_out, qkv, offset, bias, scale, need_qkv, need_offset)


def attention_weights(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """ (B, H, W, nh, K) softmax weights of the nodes, as the op's forward computes them (no autograd). """
    K = _check_inputs(qkv, offset, bias)
    B, H, W, _, nh, _ = qkv.shape
    with torch.no_grad(), _no_autocast(qkv.device.type):
        _, saved = _attend(qkv, offset, bias, scale)
    return saved[7].view(B, H, W, nh, K)


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


def sampled_attention_reference(
        qkv: torch.Tensor, offset: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """ Slow float64 oracle of :func:`sampled_attention`: explicit loops over heads, nodes and the
    4 bilinear corners, reading the map by integer indexing (no ``grid_sample``). Differentiable.
    Returns float64. """
    K = _check_inputs(qkv, offset, bias)
    qkv = qkv.double()
    offset = offset.double()
    B, H, W, _, nh, hd = qkv.shape
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
