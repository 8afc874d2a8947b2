""" torch.ops.dgmn_timm.sampled_attention and its portable path against the float64 reference. """
import pytest
import torch

import dgmn_timm  # noqa: F401  (registers the op)
from dgmn_timm.ops import (
    attention_weights, position_logits, sampled_attention, sampled_attention_portable, sampled_attention_reference)
from dgmn_timm.ops.sampling import node_displacements

OP = torch.ops.dgmn_timm.sampled_attention
FWD = torch.ops.dgmn_timm.sampled_attention_fwd


def _inputs(B, H, W, nh, hd, K=9, bias=True, walk=1.5, dtype=torch.float64, seed=0):
    """ qkv, offset (full displacements: a 3x3 grid for K = 9, plus fractional walks), bias. """
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3, nh, hd, generator=g, dtype=torch.float64)
    off = torch.randn(B, H, W, nh, 2 * K, generator=g, dtype=torch.float64) * walk
    if K == 9:
        off = off + node_displacements(dtype=torch.float64).reshape(18)
    b = torch.randn(B, H, W, nh, K, generator=g, dtype=torch.float64) if bias else None
    return [None if t is None else t.to(dtype).requires_grad_() for t in (qkv, off, b)]


def _grads(out, inputs, seed=1):
    inputs = [t for t in inputs if t is not None]
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, go.to(out.dtype))


def _close(a, b, atol, rtol=0.):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


CASES = [  # B, H, W, nh, hd, K, bias
    (2, 5, 5, 1, 8, 9, True),
    (1, 4, 7, 2, 4, 9, False),   # non-square, two heads, no bias
    (2, 6, 3, 3, 5, 9, True),    # taller than wide
    (1, 1, 1, 2, 6, 9, True),    # 1x1 map: every read but the centre's is outside
    (1, 3, 4, 1, 3, 1, True),    # one node
    (1, 2, 5, 2, 4, 27, False),  # many free nodes
]


@pytest.mark.parametrize('B,H,W,nh,hd,K,bias', CASES)
@pytest.mark.parametrize('fn', [sampled_attention, sampled_attention_portable], ids=['op', 'portable'])
def test_matches_reference_float64(B, H, W, nh, hd, K, bias, fn):
    inputs = _inputs(B, H, W, nh, hd, K, bias)
    scale = hd ** -0.5
    out = fn(*inputs, scale)
    ref = sampled_attention_reference(*inputs, scale)
    assert out.shape == (B, H, W, nh, hd) and out.dtype == torch.float64
    _close(out, ref, 1e-12)
    for g, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        _close(g, r, 1e-10)


def test_reference_by_hand():
    """ The oracle itself: one head, one node read at a known fractional position. """
    qkv = torch.zeros(1, 2, 3, 3, 1, 1, dtype=torch.float64)
    qkv[0, :, :, 2, 0, 0] = torch.arange(6.).view(2, 3)  # values
    off = torch.tensor([0.25, 0.5], dtype=torch.float64).expand(1, 2, 3, 1, 2)
    out = sampled_attention_reference(qkv, off, None, 1.)
    # (0, 0) reads at (0.25, 0.5): 0.375 * 0 + 0.375 * 1 + 0.125 * 3 + 0.125 * 4
    assert out[0, 0, 0, 0, 0].item() == pytest.approx(0.375 + 0.375 + 0.5)
    # (1, 2) reads at (1.25, 2.5): only the corner (1, 2) is inside, weight 0.75 * 0.5
    assert out[0, 1, 2, 0, 0].item() == pytest.approx(0.375 * 5)


def test_far_outside_reads_zero_without_gradient():
    qkv, off, b = _inputs(1, 4, 5, 1, 4)
    with torch.no_grad():
        off[..., :4] += 1e4  # nodes 0 and 1 far below / right of the map
        off[..., 4:6] -= 1e4
    out = sampled_attention(qkv, off, b, 0.5)
    ref = sampled_attention_reference(qkv, off, b, 0.5)
    _close(out, ref, 1e-12)
    g_off = _grads(out, [off])[0]
    assert (g_off[..., :6] == 0).all() and g_off[..., 6:].abs().sum() > 0
    _close(g_off, _grads(ref, [off])[0], 1e-10)
    # everything far away: nothing is read
    far = sampled_attention(qkv, torch.full_like(off, -1e4), None, 0.5)
    assert far.abs().max().item() == 0.


def test_partly_outside_matches_reference():
    qkv, off, b = _inputs(1, 3, 4, 2, 4, walk=0.)
    with torch.no_grad():
        off.uniform_(-4.6, 4.6)  # within one pixel outside: one of a pair of corners reads zero
    out = sampled_attention(qkv, off, b, 0.5)
    _close(out, sampled_attention_reference(qkv, off, b, 0.5), 1e-12)
    for g, r in zip(_grads(out, [qkv, off, b]), _grads(sampled_attention_reference(qkv, off, b, 0.5), [qkv, off, b])):
        _close(g, r, 1e-10)


@pytest.mark.parametrize('H,W', [(5, 6), (1, 4), (1, 1)])
def test_integer_positions_gradient_is_right_derivative(H, W):
    """ At integer positions the displacement gradient is the one-sided derivative in the +offset
    direction (grid_sample's convention: position - floor(position) is the fraction). """
    qkv, off, b = _inputs(2, H, W, 2, 4)
    with torch.no_grad():
        off.copy_(torch.randint(-W - 1, W + 2, off.shape, generator=torch.Generator().manual_seed(3)).double())
    go = torch.randn(2, H, W, 2, 4, dtype=torch.float64)
    loss = lambda o: (sampled_attention(qkv, o, b, 0.5) * go).sum()  # noqa: E731
    grad = torch.autograd.grad(loss(off), off)[0]
    direction = torch.rand(off.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    eps = 1e-7
    with torch.no_grad():
        fd = (loss(off + eps * direction) - loss(off)) / eps
    assert abs(fd.item() - (grad * direction).sum().item()) < 1e-5 * max(1., abs(fd.item()))
    assert grad.abs().sum() > 0


def test_expanded_offsets_and_strided_qkv():
    """ Displacements shared by the heads as a stride-0 view; qkv a permuted (non-contiguous) view. """
    B, H, W, nh, hd, S = 2, 4, 5, 3, 4, 27
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 3, nh, hd, H, W, generator=g, dtype=torch.float64).permute(0, 4, 5, 1, 2, 3)
    qkv.requires_grad_()
    disp = (torch.randn(B, H, W, 2 * S, generator=g, dtype=torch.float64) * 2).requires_grad_()
    off = disp.unsqueeze(3).expand(B, H, W, nh, 2 * S)
    out = sampled_attention(qkv, off, None, 0.5)
    ref = sampled_attention_reference(qkv, off.contiguous(), None, 0.5)
    _close(out, ref, 1e-12)
    for a, r in zip(_grads(out, [qkv, disp]), _grads(ref, [qkv, disp])):
        _close(a, r, 1e-10)


@pytest.mark.parametrize('bias', [True, False])
def test_single_query(bias):
    """ B * H * W * heads == 1: one query, forward and gradients (float64 and float32). """
    inputs = _inputs(1, 1, 1, 1, 5, 9, bias, walk=0.7)
    out = sampled_attention(*inputs, 0.5)
    ref = sampled_attention_reference(*inputs, 0.5)
    ref_grads = _grads(ref, inputs)
    _close(out, ref, 1e-12)
    for g, r in zip(_grads(out, inputs), ref_grads):
        _close(g, r, 1e-10)
    inputs32 = [None if t is None else t.detach().float().requires_grad_() for t in inputs]
    out32 = sampled_attention(*inputs32, 0.5)
    _close(out32, ref, 1e-5)
    for g, r in zip(_grads(out32, inputs32), ref_grads):
        _close(g, r, 1e-4)


@pytest.mark.parametrize('expand', [True, False], ids=['expanded', 'per-head'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_permuted_offsets_with_gradients(expand, dtype):
    """ Offsets straight from a channels-first (conv) output, permuted to (B, H, W, nh, 2K) and,
    with ``expand``, shared by the heads as a stride-0 view: forward and all gradients. """
    B, H, W, nh, hd, K = 2, 4, 5, 3, 4, 9
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, H, W, 3, nh, hd, generator=g, dtype=torch.float64)
    bias = torch.randn(B, H, W, nh, K, generator=g, dtype=torch.float64)
    shape = (B, 2 * K, H, W) if expand else (B, nh, 2 * K, H, W)
    conv_out = (torch.rand(shape, generator=g, dtype=torch.float64) * 5 - 2.5 + 1e-3)
    inputs = [t.to(dtype).requires_grad_() for t in (qkv, conv_out, bias)]
    if expand:
        off = inputs[1].permute(0, 2, 3, 1).unsqueeze(3).expand(B, H, W, nh, 2 * K)
    else:
        off = inputs[1].permute(0, 3, 4, 1, 2)
    assert not off.is_contiguous()
    out = sampled_attention(inputs[0], off, inputs[2], 0.5)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_off = (ref_in[1].permute(0, 2, 3, 1).unsqueeze(3).expand(B, H, W, nh, 2 * K) if expand
               else ref_in[1].permute(0, 3, 4, 1, 2))
    ref = sampled_attention_reference(ref_in[0], ref_off, ref_in[2], 0.5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    _close(out, ref, tol)
    for a, r in zip(_grads(out, inputs), _grads(ref, ref_in)):
        _close(a, r, tol * 100)


def test_float32_within_1e5():
    inputs = _inputs(2, 5, 4, 2, 8)
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    out = sampled_attention(*f32, 8 ** -0.5)
    assert out.dtype == torch.float32
    ref = sampled_attention_reference(*inputs, 8 ** -0.5)
    _close(out, ref, 1e-5)
    for g, r in zip(_grads(out, f32), _grads(ref, inputs)):
        _close(g, r, 1e-5, 1e-5)


def test_bfloat16_computed_in_float32():
    inputs = _inputs(2, 6, 5, 2, 8)
    with torch.no_grad():
        # keep positions a quarter pixel off the grid (exact in bf16): no kink of the bilinear gradient
        inputs[1].copy_(inputs[1].round() + 0.25)
    bf = [t.detach().bfloat16().requires_grad_() for t in inputs]
    rounded = [t.detach().double().requires_grad_() for t in bf]
    out = sampled_attention(*bf, 8 ** -0.5)
    assert out.dtype == torch.bfloat16
    ref = sampled_attention_reference(*rounded, 8 ** -0.5)
    _close(out, ref, 2e-2, 2e-2)
    for g, r in zip(_grads(out, bf), _grads(ref, rounded)):
        assert g.dtype == torch.bfloat16
        _close(g, r, 5e-2, 5e-2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert sampled_attention(*bf, 8 ** -0.5).dtype == torch.bfloat16


@pytest.mark.parametrize('K,bias', [(9, True), (2, False)])
def test_gradcheck(K, bias):
    inputs = _inputs(1, 3, 4, 2, 3, K, bias, walk=1.2, seed=3)
    assert torch.autograd.gradcheck(lambda *a: sampled_attention(*a, 0.7) if bias else sampled_attention(*a, None, 0.7),
                                    [t for t in inputs if t is not None])


def test_opcheck():
    for K, bias in ((9, True), (3, False)):
        qkv, off, b = _inputs(1, 3, 4, 2, 4, K, bias, dtype=torch.float32)
        for op in (OP, FWD):  # the public op and the forward it decomposes into
            torch.library.opcheck(op, (qkv, off, b, 0.5))
            torch.library.opcheck(op, (qkv.detach(), off.detach(), None if b is None else b.detach(), 0.5))


def test_fake_shapes_and_errors():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        qkv = torch.empty(2, 7, 5, 3, 4, 8)
        out = OP(qkv, torch.empty(2, 7, 5, 4, 54), None, 0.3)
        assert out.shape == (2, 7, 5, 4, 8)
        with pytest.raises(ValueError, match='bias must be'):
            OP(qkv, torch.empty(2, 7, 5, 4, 18), torch.empty(2, 7, 5, 4, 8), 0.3)
    qkv = torch.zeros(1, 2, 2, 3, 1, 4)
    with pytest.raises(ValueError, match='offset must be'):
        sampled_attention(qkv, torch.zeros(1, 2, 2, 1, 17), None, 1.)
    with pytest.raises(ValueError, match='qkv must be'):
        sampled_attention(qkv[:, :, :, :2], torch.zeros(1, 2, 2, 1, 18), None, 1.)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def fn(qkv, off, b):
        return sampled_attention(qkv * 2, off + 0.5, b, 0.5).sum(-1)

    inputs = _inputs(1, 3, 5, 2, 4, dtype=torch.float32)
    compiled = torch.compile(fn, fullgraph=True, backend='aot_eager')
    out = compiled(*inputs)
    ref = fn(*inputs)
    torch.testing.assert_close(out, ref)
    for a, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, r)


def test_torchscript():
    def fn(qkv: torch.Tensor, off: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.dgmn_timm.sampled_attention(qkv, off, b, 0.5)

    inputs = [t.detach() for t in _inputs(1, 3, 4, 2, 4)]
    torch.testing.assert_close(torch.jit.script(fn)(*inputs), sampled_attention(*inputs, 0.5), atol=0, rtol=0)
    portable = torch.jit.script(sampled_attention_portable)
    torch.testing.assert_close(portable(*inputs, 0.5), sampled_attention_portable(*inputs, 0.5), atol=0, rtol=0)


def test_attention_weights():
    qkv, off, b = [t.detach() for t in _inputs(1, 4, 3, 2, 4)]
    p = attention_weights(qkv, off, b, 0.5)
    assert p.shape == (1, 4, 3, 2, 9)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 4, 3, 2, dtype=torch.float64))
    # the op's output is the p-weighted sum of values sampled at the displacements (K = 1 each)
    v_nodes = torch.stack([sampled_attention_reference(
        qkv, off[..., 2 * k:2 * k + 2], None, 0.5) for k in range(9)], -1)  # (B, H, W, nh, hd, K)
    torch.testing.assert_close((v_nodes * p.unsqueeze(-2)).sum(-1), sampled_attention(qkv, off, b, 0.5))


def test_portable_dropout():
    inputs = [t.detach() for t in _inputs(1, 4, 4, 2, 4, dtype=torch.float32)]
    ref = sampled_attention(*inputs, 0.5)
    torch.testing.assert_close(sampled_attention_portable(*inputs, 0.5, attn_drop=0.5, training=False), ref)
    torch.manual_seed(0)
    d = sampled_attention_portable(*inputs, 0.5, attn_drop=0.5, training=True)
    assert d.shape == ref.shape and not torch.allclose(d, ref)


def test_export_and_trace_keep_one_op():
    """ torch.export and torch.jit.trace (saved and reloaded) record the public op itself. """
    import io

    class Layer(torch.nn.Module):
        def forward(self, qkv, off, b):
            return sampled_attention(qkv, off, b, 0.5)

    inputs = tuple(t.detach().float() for t in _inputs(1, 3, 4, 2, 4))
    ref = Layer()(*inputs)
    ep = torch.export.export(Layer(), inputs)
    assert [n.target for n in ep.graph.nodes if n.op == 'call_function'] == [OP.default]
    torch.testing.assert_close(ep.module()(*inputs), ref, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(Layer(), inputs), buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(*inputs), ref, atol=0, rtol=0)


@pytest.mark.parametrize('which', [0, 1, 2])
def test_gradient_of_one_input_only(which):
    """ Only one of qkv / offset / bias requires a gradient: the backward skips the others. """
    inputs = [t.detach() for t in _inputs(1, 3, 4, 2, 4)]
    inputs[which].requires_grad_()
    out = sampled_attention(*inputs, 0.5)
    ref = sampled_attention_reference(*inputs, 0.5)
    _close(_grads(out, [inputs[which]])[0], _grads(ref, [inputs[which]])[0], 1e-10)


# ---------------------------------------------------------------- the position term (pos_h, pos_w)

def _tables(H, W, nh, hd, K=9, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(L, K, hd, generator=g, dtype=torch.float64).requires_grad_() for L in (H, W)]


POS_CASES = [  # B, H, W, nh, hd, K, bias
    (2, 5, 5, 1, 8, 9, False),   # square: the transposed height term is the mirrored query's
    (1, 4, 7, 2, 4, 9, True),    # wider than tall: the transposed term is resized
    (2, 6, 3, 3, 5, 9, False),   # taller than wide
    (1, 1, 1, 2, 6, 9, True),    # 1x1 map
    (1, 3, 4, 1, 3, 2, False),   # two free nodes
]


@pytest.mark.parametrize('B,H,W,nh,hd,K,bias', POS_CASES)
@pytest.mark.parametrize('transposed', [False, True])
def test_position_tables_match_reference(B, H, W, nh, hd, K, bias, transposed):
    qkv, off, b = _inputs(B, H, W, nh, hd, K, bias)
    pos_h, pos_w = _tables(H, W, nh, hd, K)
    scale = hd ** -0.5
    out = sampled_attention(qkv, off, b, scale, pos_h, pos_w, transposed)
    ref = sampled_attention_reference(qkv, off, b, scale, pos_h, pos_w, transposed)
    _close(out, ref, 1e-12)
    inputs = [qkv, off, b, pos_h, pos_w]
    for g, r in zip(_grads(out, inputs), _grads(ref, inputs)):
        _close(g, r, 1e-10)
    # the plain-ops term, passed as a bias, is the same function
    bias_total = position_logits(qkv[:, :, :, 0], pos_h, pos_w, transposed) + (0 if b is None else b)
    _close(sampled_attention_portable(qkv, off, bias_total, scale), ref, 1e-12)


def test_position_tables_change_the_output():
    """ The term is used: tables of zeros give the op without them, other tables do not. """
    qkv, off, _ = [t.detach() for t in _inputs(1, 4, 6, 2, 4)]
    pos_h, pos_w = [t.detach() for t in _tables(4, 6, 2, 4)]
    plain = sampled_attention(qkv, off, None, 0.5)
    zeros = sampled_attention(qkv, off, None, 0.5, torch.zeros_like(pos_h), torch.zeros_like(pos_w), True)
    torch.testing.assert_close(zeros, plain, atol=0, rtol=0)
    assert not torch.allclose(sampled_attention(qkv, off, None, 0.5, pos_h, pos_w, True), plain)
    assert not torch.allclose(sampled_attention(qkv, off, None, 0.5, pos_h, pos_w, True),
                              sampled_attention(qkv, off, None, 0.5, pos_h, pos_w, False))


@pytest.mark.parametrize('which', ['pos_h', 'pos_w'])
def test_position_table_alone_and_only_its_gradient(which):
    qkv, off, _ = [t.detach() for t in _inputs(1, 3, 5, 2, 4)]
    pos_h, pos_w = _tables(3, 5, 2, 4)
    kw = {which: pos_h if which == 'pos_h' else pos_w}
    out = sampled_attention(qkv, off, None, 0.5, **kw, rel_pos_released=True)
    ref = sampled_attention_reference(qkv, off, None, 0.5, **kw, rel_pos_released=True)
    _close(out, ref, 1e-12)
    _close(_grads(out, list(kw.values()))[0], _grads(ref, list(kw.values()))[0], 1e-10)


def test_position_tables_opcheck_gradcheck_and_errors():
    qkv, off, b = _inputs(1, 3, 4, 2, 3, 9, True, walk=1.2, seed=3)
    pos_h, pos_w = _tables(3, 4, 2, 3)
    assert torch.autograd.gradcheck(lambda *a: sampled_attention(*a[:3], 0.7, *a[3:], True), [qkv, off, b, pos_h, pos_w])
    f32 = [t.detach().float().requires_grad_() for t in (qkv, off, b, pos_h, pos_w)]
    torch.library.opcheck(OP, (*f32[:3], 0.5, *f32[3:], True))
    torch.library.opcheck(FWD, (*f32[:3], 0.5, *f32[3:], False))
    with pytest.raises(ValueError, match='pos_h must be'):
        sampled_attention(qkv, off, b, 0.5, pos_w, pos_w)
    with pytest.raises(ValueError, match='pos_w must be'):
        sampled_attention(qkv, off, b, 0.5, pos_h, pos_w[:, :2])
