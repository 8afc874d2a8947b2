""" The model never changes a tensor a user or a hook holds: gradients passed to ``backward``,
gradients tensor / module backward hooks see, and module outputs forward hooks keep.
(Its only in-place ops are ``nn.ReLU(inplace=True)`` after BatchNorm, which autograd checks.)
"""
import pytest
import torch
import timm

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.models.dgmn2 import ConvBnRelu, Mlp


def _record(store):
    """ A tensor hook that keeps the gradient it sees and a copy of its values at that moment. """
    def hook(grad):
        store.append((grad, grad.clone()))
    return hook


def _assert_unchanged(store, min_count=1):
    assert len(store) >= min_count
    for seen, copy in store:
        torch.testing.assert_close(seen, copy, atol=0, rtol=0)


@pytest.mark.parametrize('what', ['stem', 'patch_embed', 'mlp', 'block'])
def test_gradient_passed_to_backward_is_not_modified(what):
    torch.manual_seed(0)
    if what == 'stem':
        model = timm.create_model('dgmn2_tiny', num_classes=0)
        out = model.stem(torch.randn(2, 3, 64, 64))
    elif what == 'patch_embed':
        out = ConvBnRelu(8, 16)(torch.randn(2, 8, 10, 12, requires_grad=True))
    elif what == 'mlp':
        out = Mlp(8, 32)(torch.randn(2, 5, 8, requires_grad=True))
    else:
        block = timm.create_model('dgmn2_tiny').stages[0].blocks[0]
        out = block(torch.randn(2, 5, 6, 64, requires_grad=True))
    # a negative, contiguous gradient: an in-place ReLU / GELU backward would change it
    g = -torch.rand(out.shape) - 0.5
    g0 = g.clone()
    out.backward(g)
    torch.testing.assert_close(g, g0, atol=0, rtol=0)


def test_tensor_hooks_on_activations_keep_their_gradients():
    """ Grad-CAM style: forward hooks register tensor hooks on the stem's ReLU outputs and on
    the MLP's GELU output (what ``mlp.drop1`` receives); the gradients they saw stay intact. """
    torch.manual_seed(0)
    model = timm.create_model('dgmn2_tiny', num_classes=5)
    store = []

    def on_output(module, args, output):
        output.register_hook(_record(store))

    model.stem.act.register_forward_hook(on_output)
    model.stages[1].blocks[0].mlp.drop1.register_forward_hook(on_output)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    _assert_unchanged(store, min_count=4)  # 3 stem ReLUs + 1 GELU


def test_module_backward_hook_on_fc2_keeps_grad_input():
    """ A full backward hook on fc2 sees d(GELU output); the GELU backward must not overwrite it. """
    torch.manual_seed(0)
    mlp = Mlp(8, 32)
    store = []
    mlp.fc2.register_full_backward_hook(lambda m, gin, gout: store.append((gin[0], gin[0].clone())))
    x = torch.randn(3, 8, requires_grad=True)
    mlp(x).sum().backward()
    _assert_unchanged(store)


@pytest.mark.parametrize('grad', [False, True])
def test_forward_hooks_keep_module_outputs(grad):
    """ Outputs that forward hooks keep (attention, MLP, fc1, fc2, proj, drop path) are not changed
    later in the forward, with and without autograd. """
    torch.manual_seed(0)
    model = timm.create_model('dgmn2_tiny', num_classes=5).train(grad)
    store = []

    def keep(module, args, output):
        store.append((output, output.clone()))

    block = model.stages[0].blocks[0]
    for m in (block.attn, block.mlp, model.stages[1].blocks[1].mlp.fc1, model.stages[2].blocks[0].mlp.fc2,
              model.stages[3].blocks[0].attn.proj, model.stages[3].blocks[0].drop_path2):
        m.register_forward_hook(keep)
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        model(x).sum()
    _assert_unchanged(store, min_count=6)
