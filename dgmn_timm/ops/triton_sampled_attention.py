""" Triton kernels of ``torch.ops.dgmn_timm.sampled_attention`` (CUDA).

Same function and layout as ``dgmn_timm.ops.sampled_attention``: qkv (B, H, W, 3, nh, hd),
offset (B, H, W, nh, 2K) displacements from the query in pixels, bias (B, H, W, nh, K) or None
-> (B, H, W, nh, hd). K is a compile-time constant of the kernels (one build per K).

Forward: one program handles BLOCK_Q (query, head) rows x all hd channels. For each of the K
nodes it computes the bilinear position, reads the 4 corner key and value rows straight from
qkv (masked: a corner outside the map reads zero), forms the sampled key and value in
registers and folds the node into an online softmax (running max, sum and weighted value).
Sampled keys and values are never written to memory.

The forward also stores the log-sum-exp of the logits (4 bytes per row). Backward: one program
per BLOCK_Q rows recomputes the corners and p_k = exp(logit_k - lse), writes dq, d bias and
d offset directly (each row is owned by one program) and scatters the key / value gradients
into the 4 corners with float32 atomic adds.

All arithmetic is float32 (inputs may be float32, bfloat16 or float16; results are cast back).
float64 inputs take the gather kernel instead.

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (the tests use it where there is no GPU).
"""
import torch
import triton
import triton.language as tl

__all__ = ['triton_forward', 'triton_backward']


@triton.jit
def _node_position(OFF, rows, rmask, y, x, k: tl.constexpr, K: tl.constexpr):
    dy = tl.load(OFF + rows * (2 * K) + 2 * k, mask=rmask, other=0.).to(tl.float32)
    dx = tl.load(OFF + rows * (2 * K) + 2 * k + 1, mask=rmask, other=0.).to(tl.float32)
    py = y.to(tl.float32) + dy
    px = x.to(tl.float32) + dx
    y0f = tl.floor(py)
    x0f = tl.floor(px)
    return py - y0f, px - x0f, y0f, x0f


@triton.jit
def _corner(y0f, x0f, fy, fx, bimg, rmask, H, W, cy: tl.constexpr, cx: tl.constexpr):
    # clamp before the int conversion: far-away corners are outside either way
    yi = tl.minimum(tl.maximum(y0f, -2.), H + 1.).to(tl.int32) + cy
    xi = tl.minimum(tl.maximum(x0f, -2.), W + 1.).to(tl.int32) + cx
    wy = fy * cy + (1. - fy) * (1 - cy)
    wx = fx * cx + (1. - fx) * (1 - cx)
    inb = rmask & (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
    src = ((bimg * H + yi) * W + xi).to(tl.int64)
    return wy, wx, inb, src


@triton.jit
def _rows_and_query(QKV, M, H, W, NH, HD, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """ This program's (query, head) rows, their pixel coordinates and their queries (float32). """
    pid = tl.program_id(0)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rows < M
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    h = rows % NH
    pix = (rows // NH).to(tl.int64)
    x = (pix % W).to(tl.int32)
    y = ((pix // W) % H).to(tl.int32)
    bimg = (pix // (H * W)).to(tl.int32)
    C = NH * HD
    pstride = 3 * C
    m2 = rmask[:, None] & dmask[None, :]
    q = tl.load(QKV + pix[:, None] * pstride + h[:, None] * HD + d[None, :], mask=m2, other=0.).to(tl.float32)
    return rows, rmask, d, dmask, h, pix, y, x, bimg, C, pstride, m2, q


@triton.jit
def _sampled_node(
        QKV, OFF, BIAS, rows, rmask, y, x, bimg, h, d, dmask, H, W, HD, C, pstride, q, scale,
        k: tl.constexpr, K: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ Node k of every row: its position, the bilinearly sampled key and value (registers
    only) and its logit. """
    fy, fx, y0f, x0f = _node_position(OFF, rows, rmask, y, x, k, K)
    ks = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    vs = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for c in tl.static_range(4):
        wy, wx, inb, src = _corner(y0f, x0f, fy, fx, bimg, rmask, H, W, c // 2, c % 2)
        ptr = QKV + src[:, None] * pstride + C + h[:, None] * HD + d[None, :]
        lm = inb[:, None] & dmask[None, :]
        wgt = (wy * wx)[:, None]
        ks += wgt * tl.load(ptr, mask=lm, other=0.).to(tl.float32)
        vs += wgt * tl.load(ptr + C, mask=lm, other=0.).to(tl.float32)
    logit = tl.sum(q * ks, 1) * scale
    if HAS_BIAS:
        logit += tl.load(BIAS + rows * K + k, mask=rmask, other=0.).to(tl.float32)
    return fy, fx, y0f, x0f, ks, vs, logit


@triton.jit
def _fwd_kernel(
        QKV, OFF, BIAS, OUT, LSE,
        M, H, W, NH, HD, scale,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, rmask, d, dmask, h, pix, y, x, bimg, C, pstride, m2, q = _rows_and_query(
        QKV, M, H, W, NH, HD, BLOCK_Q, BLOCK_D)
    m_i = tl.full([BLOCK_Q], -float('inf'), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for k in tl.static_range(K):
        fy, fx, y0f, x0f, ks, vs, logit = _sampled_node(
            QKV, OFF, BIAS, rows, rmask, y, x, bimg, h, d, dmask, H, W, HD, C, pstride, q, scale,
            k, K, HAS_BIAS, BLOCK_Q, BLOCK_D)
        m_new = tl.maximum(m_i, logit)
        alpha = tl.exp(m_i - m_new)
        pk = tl.exp(logit - m_new)
        l_i = l_i * alpha + pk
        acc = acc * alpha[:, None] + pk[:, None] * vs
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(OUT + rows[:, None] * HD + d[None, :], out.to(OUT.dtype.element_ty), mask=m2)
    tl.store(LSE + rows, m_i + tl.log(l_i), mask=rmask)


@triton.jit
def _bwd_kernel(
        QKV, OFF, BIAS, OUT, LSE, DO, DQKV, DOFF, DBIAS,
        M, H, W, NH, HD, scale,
        K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, rmask, d, dmask, h, pix, y, x, bimg, C, pstride, m2, q = _rows_and_query(
        QKV, M, H, W, NH, HD, BLOCK_Q, BLOCK_D)
    go = tl.load(DO + rows[:, None] * HD + d[None, :], mask=m2, other=0.).to(tl.float32)
    o = tl.load(OUT + rows[:, None] * HD + d[None, :], mask=m2, other=0.).to(tl.float32)
    delta = tl.sum(go * o, 1)
    lse = tl.load(LSE + rows, mask=rmask, other=0.)
    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    for k in tl.static_range(K):
        fy, fx, y0f, x0f, ks, vs, logit = _sampled_node(
            QKV, OFF, BIAS, rows, rmask, y, x, bimg, h, d, dmask, H, W, HD, C, pstride, q, scale,
            k, K, HAS_BIAS, BLOCK_Q, BLOCK_D)
        p = tl.exp(logit - lse)
        dl = p * (tl.sum(go * vs, 1) - delta)
        tl.store(DBIAS + rows * K + k, dl, mask=rmask)
        dq += dl[:, None] * ks
        dfy = tl.zeros([BLOCK_Q], tl.float32)
        dfx = tl.zeros([BLOCK_Q], tl.float32)
        for c in tl.static_range(4):
            cy = c // 2
            cx = c % 2
            wy, wx, inb, src = _corner(y0f, x0f, fy, fx, bimg, rmask, H, W, cy, cx)
            ptr = QKV + src[:, None] * pstride + C + h[:, None] * HD + d[None, :]
            lm = inb[:, None] & dmask[None, :]
            kc = tl.load(ptr, mask=lm, other=0.).to(tl.float32)
            vc = tl.load(ptr + C, mask=lm, other=0.).to(tl.float32)
            # d loss / d w_c, then w_c = wy * wx with d wy / d fy = +-1
            dw = p * tl.sum(go * vc, 1) + dl * scale * tl.sum(q * kc, 1)
            dfy += dw * wx * (2 * cy - 1)
            dfx += dw * wy * (2 * cx - 1)
            wgt = wy * wx
            gptr = DQKV + src[:, None] * pstride + C + h[:, None] * HD + d[None, :]
            tl.atomic_add(gptr, (wgt * dl * scale)[:, None] * q, mask=lm)
            tl.atomic_add(gptr + C, (wgt * p)[:, None] * go, mask=lm)
        tl.store(DOFF + rows * (2 * K) + 2 * k, dfy, mask=rmask)
        tl.store(DOFF + rows * (2 * K) + 2 * k + 1, dfx, mask=rmask)
    tl.store(DQKV + pix[:, None] * pstride + h[:, None] * HD + d[None, :], dq * scale, mask=m2)


def _launch_cfg(hd: int):
    block_d = max(16, triton.next_power_of_2(hd))
    block_q = 32 if block_d <= 64 else 16
    return block_q, block_d


def triton_forward(qkv: torch.Tensor, offset: torch.Tensor, bias, scale: float):
    """ The op's forward (float32 / bfloat16 / float16 inputs): out (B, H, W, nh, hd) and the
    log-sum-exp of the logits (B, H, W, nh), float32. """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    qkv = qkv.contiguous()
    offset = offset.contiguous()
    bias_arg = offset if bias is None else bias.contiguous()
    M = B * H * W * nh
    out = torch.empty((B, H, W, nh, hd), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, W, nh), device=qkv.device, dtype=torch.float32)
    block_q, block_d = _launch_cfg(hd)
    _fwd_kernel[(triton.cdiv(M, block_q),)](
        qkv, offset, bias_arg, out, lse, M, H, W, nh, hd, float(scale),
        K=K, HAS_BIAS=bias is not None, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)
    return out, lse


def triton_backward(grad_out: torch.Tensor, qkv: torch.Tensor, offset: torch.Tensor, bias, out: torch.Tensor,
                    lse: torch.Tensor, scale: float):
    """ (d qkv, d offset, d bias) of :func:`triton_forward`, given its results ``out`` and ``lse``. """
    B, H, W, _, nh, hd = qkv.shape
    K = offset.shape[-1] // 2
    M = B * H * W * nh
    qkv = qkv.contiguous()
    offset = offset.contiguous()
    bias_arg = offset if bias is None else bias.contiguous()
    dqkv = torch.zeros(qkv.shape, device=qkv.device, dtype=torch.float32)
    doff = torch.empty(offset.shape, device=qkv.device, dtype=torch.float32)
    dbias = torch.empty((B, H, W, nh, K), device=qkv.device, dtype=torch.float32)
    block_q, block_d = _launch_cfg(hd)
    _bwd_kernel[(triton.cdiv(M, block_q),)](
        qkv, offset, bias_arg, out.contiguous(), lse.contiguous(), grad_out.contiguous(), dqkv, doff, dbias,
        M, H, W, nh, hd,
        float(scale), K=K, HAS_BIAS=bias is not None, BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=4)
    return (dqkv.to(qkv.dtype), doff.to(offset.dtype),
            dbias.to(qkv.dtype if bias is None else bias.dtype))
