""" The row-blocked MLP (``dgmn_timm.kernels.chunked_mlp``, ``RowBlockedMlp``) against the plain composition in float64. """
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import timm

import dgmn_timm  # noqa: F401
from dgmn_timm.kernels import chunked_mlp, use_chunked_mlp

cm = importlib.import_module('dgmn_timm.kernels.chunked_mlp')
RowBlockedMlp = cm.RowBlockedMlp


def ref_mlp(x, w1, b1, w2, b2):
    """ fc2(gelu(fc1(x))) in float64 with autograd. """
    x, w1, w2 = x.double(), w1.double(), w2.double()
    b1 = None if b1 is None else b1.double()
    b2 = None if b2 is None else b2.double()
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


@pytest.fixture
def small_blocks(monkeypatch):
    """ Blocks of 64 rows for a hidden width of 24 in float64 (so small inputs have several, one partial). """
    monkeypatch.setattr(cm, 'CHUNKED_MLP_BLOCK_BYTES', 64 * 24 * 8)


def _params(C, hidden, dtype, bias=True):
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(hidden, C, generator=g, dtype=dtype) / C ** 0.5
    w2 = torch.randn(C, hidden, generator=g, dtype=dtype) / hidden ** 0.5
    b1 = torch.randn(hidden, generator=g, dtype=dtype) if bias else None
    b2 = torch.randn(C, generator=g, dtype=dtype) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (w1, b1, w2, b2)]


@pytest.mark.parametrize('rows', [1, 64, 150])
@pytest.mark.parametrize('bias', [True, False])
def test_forward_and_gradients_match_reference(small_blocks, rows, bias):
    C, hidden = 8, 24
    w1, b1, w2, b2 = _params(C, hidden, torch.float64, bias)
    x = torch.randn(2, rows, C, dtype=torch.float64, requires_grad=True)
    assert cm._block_rows(hidden, 8) == 64
    gy = torch.randn(2, rows, C, dtype=torch.float64)
    params = [t for t in (x, w1, b1, w2, b2) if t is not None]

    out = chunked_mlp(x, w1, b1, w2, b2)
    grads = torch.autograd.grad(out, params, gy)
    ref = ref_mlp(x, w1, b1, w2, b2)
    ref_grads = torch.autograd.grad(ref, params, gy)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_float32_matches_float64_reference(small_blocks):
    C, hidden = 8, 24
    w1, b1, w2, b2 = _params(C, hidden, torch.float32)
    x = torch.randn(150, C, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out = chunked_mlp(x, w1, b1, w2, b2)
    out.square().sum().backward()
    ref_params = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    ref = ref_mlp(*ref_params)
    ref.square().sum().backward()
    # float32 rounding of sums over 24 / 150 products: 1e-4 (1e-5 failed on ~1 in 10 random inputs)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    for t, r in zip((x, w1, b1, w2, b2), ref_params):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-4)


def test_only_requested_gradients(small_blocks):
    """ Frozen layers and an input without grad: only what is asked for is computed, and right. """
    C, hidden = 8, 24
    w1, b1, w2, b2 = _params(C, hidden, torch.float64)
    w1.requires_grad_(False)
    b2.requires_grad_(False)
    x = torch.randn(100, C, dtype=torch.float64)
    chunked_mlp(x, w1, b1, w2, b2).sum().backward()
    assert w1.grad is None and b2.grad is None
    ref_b1, ref_w2 = b1.detach().clone().requires_grad_(), w2.detach().clone().requires_grad_()
    ref_mlp(x, w1, ref_b1, ref_w2, b2).sum().backward()
    torch.testing.assert_close(b1.grad, ref_b1.grad)
    torch.testing.assert_close(w2.grad, ref_w2.grad)


def test_double_backward_matches_reference(small_blocks):
    """ A gradient penalty (create_graph=True) differentiates through the blocked backward. """
    C, hidden = 8, 24
    w1, b1, w2, b2 = _params(C, hidden, torch.float64)
    x = torch.randn(100, C, dtype=torch.float64, requires_grad=True)

    def penalty(fn):
        gx, = torch.autograd.grad(fn(x, w1, b1, w2, b2).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), (x, w1, w2))

    for g, r in zip(penalty(chunked_mlp), penalty(ref_mlp)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_no_grad_keeps_nothing_and_matches(small_blocks):
    C, hidden = 8, 24
    w1, b1, w2, b2 = _params(C, hidden, torch.float64)
    x = torch.randn(130, C, dtype=torch.float64)
    with torch.inference_mode():
        out = chunked_mlp(x, w1, b1, w2, b2)
    assert out.grad_fn is None
    torch.testing.assert_close(out, ref_mlp(x, w1, b1, w2, b2).detach(), rtol=1e-12, atol=1e-12)


def test_shape_mismatch_is_a_clear_error():
    w1, b1, w2, b2 = _params(8, 24, torch.float32)
    with pytest.raises(ValueError, match='do not chain'):
        chunked_mlp(torch.randn(4, 7), w1, b1, w2, b2)


def test_use_chunked_mlp_threshold():
    w = torch.zeros(512, 64)
    small = torch.zeros(1, 56, 56, 64)
    large = torch.zeros(8, 56, 56, 64)  # 25088 x 512 float32 hidden = 51 MB
    assert not use_chunked_mlp(small, 512, w)
    assert use_chunked_mlp(large, 512, w)
    assert not use_chunked_mlp(large.double(), 512, w)  # dtype differs from the weights
    assert use_chunked_mlp(large.double(), 512, w.double())
    assert not use_chunked_mlp(large.bfloat16(), 512, w.bfloat16())  # half types: plain path
    assert not use_chunked_mlp(large.to('meta'), 512, w.to('meta'))


def test_row_blocked_mlp_is_timm_mlp(small_blocks):
    """ Same arguments, key names and results (forward and gradients) as timm's Mlp. """
    from timm.layers import Mlp
    torch.manual_seed(0)
    plain = Mlp(8, 24).double()
    blocked = RowBlockedMlp(8, 24, dtype=torch.float64)
    assert blocked.load_state_dict(plain.state_dict()) is not None
    assert set(blocked.state_dict()) == set(plain.state_dict())
    x = torch.randn(2, 5, 11, 8, dtype=torch.float64, requires_grad=True)
    out, ref = blocked(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(out.square().sum(), [x] + list(blocked.parameters()))
    r = torch.autograd.grad(ref.square().sum(), [x] + list(plain.parameters()))
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match='drop=0'):
        RowBlockedMlp(8, 24, drop=0.1)
    with pytest.raises(ValueError, match='act_layer=nn.GELU'):
        RowBlockedMlp(8, 24, act_layer=nn.ReLU)


def test_model_with_row_blocked_mlp_matches_plain():
    """ A whole model built with mlp_layer=RowBlockedMlp loads the plain model's weights and computes the same. """
    torch.manual_seed(0)
    plain = timm.create_model('dgmn2_tiny', num_classes=5)
    blocked = timm.create_model('dgmn2_tiny', num_classes=5, mlp_layer=RowBlockedMlp)
    assert isinstance(blocked.stages[0].blocks[0].mlp, RowBlockedMlp)
    blocked.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    out_b, out_p = blocked(x), plain(x)
    torch.testing.assert_close(out_b, out_p, rtol=1e-5, atol=1e-5)
    out_b.square().sum().backward()
    out_p.square().sum().backward()
    for (n, pb), pp in zip(blocked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(pb.grad, pp.grad, rtol=1e-4, atol=1e-5, msg=n)
