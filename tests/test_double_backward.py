""" Double backward (create_graph=True, e.g. gradient penalties).

The fused op ``torch.ops.dgmn_timm.sampled_attention`` (CPU gathers, Triton) has a hand-written
backward, so it refuses double backward with a clear error instead of silently dropping
second-order terms; timm's ``fused_attn`` switch selects the autograd-native portable
path, which supports it.
"""
import pytest
import torch
import timm
from timm.layers import set_fused_attn, use_fused_attn

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.ops import sampled_attention, sampled_attention_portable


def _attn_layers(model):
    return [m for m in model.modules() if hasattr(m, 'fused_attn')]


def _penalty(model, x):
    x = x.clone().requires_grad_()
    gx, = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    return gx.square().sum()


# square and non-square maps (the released height term differs: a case that silently lost terms once)
@pytest.mark.parametrize('size', [(64, 64), (64, 96)])
def test_fused_attention_refuses_double_backward_clearly(size):
    torch.manual_seed(0)
    model = timm.create_model('dgmn2_tiny', num_classes=3)
    assert all(m.fused_attn for m in _attn_layers(model))
    with pytest.raises(RuntimeError, match='set_fused_attn'):
        _penalty(model, torch.randn(1, 3, *size)).backward()


def test_op_refuses_double_backward():
    B, H, W, nh, hd = 1, 4, 5, 2, 4
    qkv = torch.randn(B, H, W, 3, nh, hd, requires_grad=True)
    off = torch.randn(B, H, W, nh, 18, requires_grad=True)
    rel = torch.randn(B, H, W, nh, 9, requires_grad=True)
    g, = torch.autograd.grad(sampled_attention(qkv, off, rel, 0.5).sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match='set_fused_attn'):
        g.square().sum().backward()
    # a plain backward is unaffected
    torch.autograd.grad(sampled_attention(qkv, off, rel, 0.5).sum(), qkv)


def test_unfused_model_supports_gradient_penalty():
    """ fused_attn = False: first-order gradients as the fused path's, and a gradient penalty
    reaches every parameter the input gradient depends on. """
    torch.manual_seed(0)
    fused = timm.create_model('dgmn2_tiny', num_classes=3)
    plain = timm.create_model('dgmn2_tiny', num_classes=3)
    plain.load_state_dict(fused.state_dict())
    for m in _attn_layers(plain):
        m.fused_attn = False
    x = torch.randn(2, 3, 64, 64)
    fused(x).sum().backward()
    plain(x).sum().backward()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    plain.zero_grad()
    _penalty(plain, x).backward()
    walks = [m.walk.weight.grad for m in _attn_layers(plain)]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in walks)


def test_set_fused_attn_switch_is_honoured():
    before = use_fused_attn()
    try:
        set_fused_attn(False)
        model = timm.create_model('dgmn2_tiny', num_classes=3)
    finally:
        set_fused_attn(before)
    assert not any(m.fused_attn for m in _attn_layers(model))
    _penalty(model, torch.randn(1, 3, 48, 48)).backward()


def test_portable_path_second_derivatives():
    """ The path fused_attn = False selects: second derivatives checked numerically (float64). """
    torch.manual_seed(0)
    B, H, W, nh, hd = 1, 3, 4, 2, 3
    qkv = torch.randn(B, H, W, 3, nh, hd, dtype=torch.float64, requires_grad=True)
    off = (torch.randn(B, H, W, nh, 18, dtype=torch.float64) * 1.7).requires_grad_()
    rel = torch.randn(B, H, W, nh, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: sampled_attention_portable(a, b, c, hd ** -0.5), (qkv, off, rel))
