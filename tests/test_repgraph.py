""" RepGraph (ECCV 2020): the layer against a float64 reference, identity at initialisation,
the registered ResNets, RGNet, the FLOP count. Tiny widths and maps throughout. """
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.ops import sampled_attention, sampled_attention_portable
from dgmn_timm.ops.reference import sampled_attention_reference
from dgmn_timm.layers import NonLocal2d, RepGraph


# ---------------------------------------------------------------- float64 reference


def attend_reference(qkv: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """ RepGraph attention in float64: the op's oracle with disp (B, H, W, 2S) shared by the G groups, no scaling. """
    B, H, W, _, G, _ = qkv.shape
    return sampled_attention_reference(qkv, disp.unsqueeze(3).expand(B, H, W, G, disp.shape[-1]), None, 1.0)


def layer_reference(layer: RepGraph, x: torch.Tensor) -> torch.Tensor:
    """ The whole RepGraph forward in float64; cell averages and anchors by explicit loops. """
    layer = copy.deepcopy(layer).double().eval()
    x = x.double()
    z = layer.reduce_act(layer.reduce_norm(layer.reduce(x)))
    B, _, H, W = z.shape
    G, S, g = layer.groups, layer.num_nodes, layer.grid
    qkv = layer.qkv(z).reshape(B, 3, G, -1, H, W).permute(0, 4, 5, 1, 2, 3)
    disp = torch.zeros(B, H, W, 2 * S, dtype=torch.float64)
    w_off = layer.offset.weight[:, :, 0, 0]
    for y in range(H):
        for x_ in range(W):
            r0, c0 = (y // g) * g, (x_ // g) * g
            r1, c1 = min(r0 + g, H) - 1, min(c0 + g, W) - 1
            mean = z[:, :, r0:r1 + 1, c0:c1 + 1].mean(dim=(2, 3))  # (B, C_in) cell average
            off = mean @ w_off.t() + layer.offset.bias  # (B, 2S)
            anchor = ((r0 + r1) / 2 - y, (c0 + c1) / 2 - x_)
            disp[:, y, x_] = off + torch.tensor(anchor, dtype=torch.float64).repeat(S)
    y = attend_reference(qkv, disp).permute(0, 3, 4, 1, 2).reshape(B, -1, H, W)
    y = layer.proj_norm(layer.proj(y))
    if layer.fuse is not None:
        return layer.fuse(torch.cat([x, y], 1))
    return x + y


# ---------------------------------------------------------------- the op as RepGraph uses it


def _inputs(B, H, W, G, D, S, spread, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3, G, D, generator=gen, dtype=torch.float64)
    disp = (torch.rand(B, H, W, 2 * S, generator=gen, dtype=torch.float64) * 2 - 1) * spread
    return qkv, disp


def _op(qkv, disp, portable):
    B, H, W, _, G, _ = qkv.shape
    off = disp.unsqueeze(3).expand(B, H, W, G, disp.shape[-1])  # shared by the groups: stride 0
    fn = sampled_attention_portable if portable else sampled_attention
    return fn(qkv, off, None, 1.0)


@pytest.mark.parametrize('portable', [False, True])
@pytest.mark.parametrize('B,H,W,G,D,S,spread', [
    (2, 5, 7, 1, 4, 9, 3.),  # random fractional offsets, non-square
    (1, 1, 1, 1, 3, 9, 2.),  # 1-pixel map, a single query
    (2, 1, 1, 2, 3, 9, 2.),  # 1-pixel maps, a batch, groups
    (1, 4, 1, 2, 2, 5, 2.),  # 1-pixel-wide map, groups
    (1, 3, 4, 1, 4, 1, 2.),  # S = 1
    (1, 3, 5, 3, 2, 27, 4.),  # S = 27, groups
    (1, 4, 3, 1, 4, 9, 1e3),  # far outside the map
])
def test_op_matches_reference(portable, B, H, W, G, D, S, spread):
    qkv, disp = _inputs(B, H, W, G, D, S, spread)
    ref = attend_reference(qkv, disp)
    out64 = _op(qkv, disp, portable)
    torch.testing.assert_close(out64, ref, rtol=1e-9, atol=1e-9)
    out32 = _op(qkv.float(), disp.float(), portable)
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('portable', [False, True])
def test_op_offsets_as_a_permuted_conv_output(portable):
    """ Offsets straight from a (B, 2S, H, W) conv output, permuted and expanded over the groups
    (the op's contract: any strides), forward and gradients. """
    qkv, disp = _inputs(2, 4, 5, 2, 3, 6, 2.5, seed=1)
    disp = disp + 1e-3
    conv_out = disp.permute(0, 3, 1, 2).contiguous().requires_grad_()
    q = qkv.clone().requires_grad_()
    out = _op(q, conv_out.permute(0, 2, 3, 1), portable)
    torch.testing.assert_close(out, attend_reference(qkv, disp), rtol=1e-9, atol=1e-9)
    grads = torch.autograd.grad(out.sum(), (q, conv_out))
    b = (qkv.clone().requires_grad_(), disp.clone().requires_grad_())
    ref = torch.autograd.grad(attend_reference(*b).sum(), b)
    torch.testing.assert_close(grads[0], ref[0], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(grads[1].permute(0, 2, 3, 1), ref[1], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize('portable', [False, True])
def test_op_gradients_match_reference(portable):
    qkv, disp = _inputs(1, 4, 5, 2, 3, 6, 2.5, seed=3)
    # keep samples off the exact pixel grid, where bilinear sampling has no derivative
    disp = disp + 1e-3
    grad = torch.randn(1, 4, 5, 2, 3, dtype=torch.float64)
    a = (qkv.clone().requires_grad_(), disp.clone().requires_grad_())
    b = (qkv.clone().requires_grad_(), disp.clone().requires_grad_())
    ga = torch.autograd.grad((_op(*a, portable) * grad).sum(), a)
    gb = torch.autograd.grad((attend_reference(*b) * grad).sum(), b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8)


def _randomize_norms(module: nn.Module, seed: int = 0):
    """ Pretrained-style BN: random weights, biases and running statistics. """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize('structure', ['bottleneck', 'simple'])
@pytest.mark.parametrize('fusion', ['sum', 'concat'])
@pytest.mark.parametrize('grid,groups,size', [(1, 1, (5, 6)), (2, 2, (5, 7)), (3, 1, (4, 7)), (4, 4, (1, 3))])
def test_layer_matches_reference(structure, fusion, grid, groups, size):
    torch.manual_seed(0)
    layer = RepGraph(8, 8, num_nodes=5, structure=structure, fusion=fusion, grid=grid, groups=groups)
    _randomize_norms(layer)
    with torch.no_grad():  # leave the identity start: every branch non-zero
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    layer.eval()
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), layer_reference(layer, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('structure', ['bottleneck', 'simple'])
@pytest.mark.parametrize('fusion', ['sum', 'concat'])
def test_layer_identity_at_init_and_trainable(structure, fusion):
    torch.manual_seed(0)
    layer = RepGraph(8, 4, structure=structure, fusion=fusion, grid=2)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, x)
    out.square().sum().backward()
    # the graph branch gets a gradient at the start (its output end is not dead)
    last = layer.fuse if fusion == 'concat' else (layer.proj_norm if structure == 'bottleneck' else layer.proj)
    assert last.weight.grad.abs().sum() > 0


def test_layer_errors():
    with pytest.raises(ValueError, match='structure'):
        RepGraph(8, 4, structure='basic')
    with pytest.raises(ValueError, match='fusion'):
        RepGraph(8, 4, fusion='add')
    with pytest.raises(ValueError, match='groups'):
        RepGraph(8, 6, groups=4)
    with pytest.raises(ValueError, match='grid'):
        RepGraph(8, 4, grid=0)


def test_nodes_positions_and_weights():
    torch.manual_seed(0)
    layer = RepGraph(8, 4, num_nodes=7, groups=2, grid=2).eval()
    x = torch.randn(1, 8, 5, 6)
    pos, w = layer.nodes(x)
    assert pos.shape == (1, 7, 5, 6, 2) and w.shape == (1, 2, 7, 5, 6)
    torch.testing.assert_close(w.sum(2), torch.ones(1, 2, 5, 6))
    # grid: all positions of a cell read the same nodes
    torch.testing.assert_close(pos[0, :, 0, 0], pos[0, :, 1, 1])
    assert not torch.allclose(pos[0, :, 0, 0], pos[0, :, 2, 2])


def test_nonlocal_matches_dense_reference():
    torch.manual_seed(0)
    for fused in (True, False):
        layer = NonLocal2d(8, 4, fusion='sum')
        layer.fused_attn = fused
        _randomize_norms(layer)
        layer.eval()
        x = torch.randn(2, 8, 3, 5)
        with torch.no_grad():
            out = layer(x).double()
            l64 = copy.deepcopy(layer).double()
            q, k, v = l64.qkv(x.double()).reshape(2, 3, 4, 15).unbind(1)
            a = torch.einsum('bcn,bcm->bnm', q, k).softmax(-1)
            y = torch.einsum('bnm,bcm->bcn', a, v).reshape(2, 4, 3, 5)
            ref = x.double() + l64.proj_norm(l64.proj(y))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(NonLocal2d(8, 4)(x), x)  # identity at initialisation


# ---------------------------------------------------------------- FLOPs


def test_macs_hand_count():
    h, w = 6, 5
    n = h * w
    # bottleneck, concat, grid 2: cells ceil(6/2) * ceil(5/2) = 9
    rg = RepGraph(16, 4, num_nodes=3, structure='bottleneck', fusion='concat', grid=2)
    hand = 16 * 4 * n + 4 * 12 * n + 4 * 6 * 9 + 2 * 3 * 4 * n + 4 * 16 * n + 32 * 16 * n
    assert rg.macs(h, w) == hand
    # simple, sum
    rg = RepGraph(16, 4, num_nodes=3, structure='simple', fusion='sum')
    assert rg.macs(h, w) == 16 * 12 * n + 16 * 6 * n + 2 * 3 * 4 * n + 4 * 16 * n
    nl = NonLocal2d(16, 4)
    assert nl.macs(h, w) == 16 * 12 * n + 2 * n * n * 4 + 4 * 16 * n


def test_macs_paper_setting_ratio():
    """ README table: 256 x 128 map, C = 2048, C' = 256, S = 9 (counts, not timings). """
    h, w = 256, 128
    nl = NonLocal2d(2048, 256, fusion='concat', device='meta')
    brg = RepGraph(2048, 256, structure='bottleneck', fusion='concat', device='meta')
    srg = RepGraph(2048, 256, structure='simple', fusion='concat', device='meta')
    no_fuse = lambda m: m.macs(h, w) - m.macs_parts(h, w)['fuse']  # noqa: E731
    assert round(no_fuse(nl) / 1e9, 1) == 618.5
    assert round(no_fuse(srg) / 1e9, 2) == 70.08
    assert round(no_fuse(brg) / 1e9, 2) == 41.10
    assert no_fuse(nl) / no_fuse(brg) > 15


# ---------------------------------------------------------------- ResNets


def _tiny_pair(context_type='repgraph', **kwargs):
    from timm.models.resnet import Bottleneck, ResNet
    from dgmn_timm.models.resnet_repgraph import ResNetRepGraph
    args = dict(layers=(1, 1, 3, 1), channels=(8, 16, 32, 64), stem_width=8, num_classes=5)
    plain = ResNet(Bottleneck, **args)
    model = ResNetRepGraph(context_layers=(0, 1, 2, 1), context_type=context_type, **args, **kwargs)
    return plain, model


@pytest.mark.parametrize('context_type,kwargs', [('repgraph', {}), ('repgraph', dict(grid=2, groups=2)),
                                                  ('nonlocal', {})])
def test_backbone_equals_plain_resnet_at_init(context_type, kwargs):
    """ Pretrained-style plain weights (random BN statistics, last BN non-zero) loaded through the
    checkpoint filter: the context layers start as the identity, outputs are unchanged. """
    from dgmn_timm.models.resnet_repgraph import checkpoint_filter_fn
    torch.manual_seed(0)
    plain, model = _tiny_pair(context_type, **kwargs)
    _randomize_norms(plain)
    sd = checkpoint_filter_fn(plain.state_dict(), model)
    model.load_state_dict(sd)
    assert sum('.context.' in k for k in sd) > 0
    x = torch.randn(2, 3, 45, 38)
    for train in (False, True):
        plain.train(train)
        model.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    # the context layers sit before the last block, then every other block counting back
    assert [i for i, b in enumerate(model.layer3) if isinstance(getattr(b, 'context', None), (RepGraph, NonLocal2d))] \
        == [0, 2]


def test_checkpoint_filter_refuses_foreign_keys():
    from dgmn_timm.models.resnet_repgraph import checkpoint_filter_fn
    plain, model = _tiny_pair()
    sd = plain.state_dict()
    sd['layer9.weight'] = torch.zeros(1)
    with pytest.raises(RuntimeError, match='Unexpected keys'):
        checkpoint_filter_fn(sd, model)
    sd = plain.state_dict()
    del sd['layer2.0.conv1.weight']
    with pytest.raises(RuntimeError, match='Missing ResNet keys'):
        checkpoint_filter_fn(sd, model)


def test_registered_models_timm_api():
    from torchvision.models.feature_extraction import create_feature_extractor
    x = torch.randn(1, 3, 64, 48)
    for os_, size in ((8, (8, 6)), (16, (4, 3))):
        feats = timm.create_model('resnet50_repgraph_3l', features_only=True, output_stride=os_)(x)
        assert [f.shape[-2:] for f in feats][-1] == size
    model = timm.create_model('resnet50_repgraph_5l', num_classes=7).eval()
    assert sum(isinstance(m, RepGraph) for m in model.modules()) == 5
    assert len(model.context_parameter_names()) > 0
    scripted = torch.jit.script(timm.create_model('resnet50_repgraph_5l', num_classes=7, scriptable=True).eval())
    scripted.load_state_dict(model.state_dict())
    fx = create_feature_extractor(model, return_nodes=['fc'])
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(scripted(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fx(x)['fc'], ref)
    nl = timm.create_model('resnet50_nonlocal', num_classes=7)
    assert sum(isinstance(m, NonLocal2d) for m in nl.modules()) == 1


# ---------------------------------------------------------------- RGNet


def _blob_data(n, size, seed=0):
    """ Images with a bright square on noise, labels: square = 1, rest = 0, 255 on a border. """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen) * 0.3
    y = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        r, c = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        x[i, :, r:r + size // 2, c:c + size // 2] += 1.5
        y[i, r:r + size // 2, c:c + size // 2] = 1
    y[:, 0] = 255
    return x, y


def test_rgnet_trains():
    from dgmn_timm.tasks.segmentation import HEADS, RGNet, create_segmentation_model
    torch.manual_seed(0)
    model = create_segmentation_model('resnet10t', num_classes=2, head='repgraph', channels=16, inner_dim=8,
                                      aux_channels=8, num_nodes=4, grid=2)
    assert isinstance(model, RGNet) and HEADS['repgraph'] is not None
    assert model.backbone.reductions == [8, 8]
    x, y = _blob_data(4, 32)
    assert model(x).shape == (4, 2, 32, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(12):
        loss = model.training_loss(x, y, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # the auxiliary term is in the loss
    with torch.no_grad():
        model.eval()
        main = F.cross_entropy(model(x), y, ignore_index=255)
        assert model.training_loss(x, y) > main + 1e-4


def test_rgnet_on_dgmn2_backbone():
    from dgmn_timm.tasks.segmentation import rgnet
    model = rgnet('dgmn2_tiny', num_classes=3, channels=16, inner_dim=8, aux_channels=8).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 48)).shape == (1, 3, 64, 48)


# ---------------------------------------------------------------- visualisation


def test_repgraph_nodes_and_plot(tmp_path):
    from dgmn_timm.tools.visualize import plot_repgraph_nodes, repgraph_nodes
    torch.manual_seed(0)
    model = timm.create_model('resnet50_repgraph', num_classes=3)
    image = torch.randn(3, 64, 48)
    res = repgraph_nodes(model, image, [(10., 20.), (60., 5.)])
    layer = next(m for m in model.modules() if isinstance(m, RepGraph))
    assert len(res) == 2 and res[0]['positions'].shape == (layer.num_nodes, 2)
    assert res[0]['map_size'] == (4, 3) and res[0]['stride'] == (16., 16.)
    assert res[1]['query'] == (3, 0)
    assert abs(float(res[0]['weights'].sum()) - 1) < 1e-5
    # node positions: query position + the layer's displacement, in image pixels
    captured = []
    h = layer.register_forward_pre_hook(lambda m, i: captured.append(i[0]))
    with torch.no_grad():
        model.eval()(image[None])
    h.remove()
    disp = layer.offset(layer.reduce_act(layer.reduce_norm(layer.reduce(captured[0]))))[0, :2, 0, 1]
    expect = ((0 + disp[0].item() + 0.5) * 16 - 0.5, (1 + disp[1].item() + 0.5) * 16 - 0.5)
    assert res[0]['query'] == (0, 1)
    assert abs(res[0]['positions'][0, 0] - expect[0]) < 1e-3 and abs(res[0]['positions'][0, 1] - expect[1]) < 1e-3
    path = tmp_path / 'nodes.png'
    plot_repgraph_nodes(np.zeros((64, 48, 3), np.uint8), res, str(path), title='res4 RepGraph')
    assert path.stat().st_size > 1000


def test_param_counts_in_readme():
    counts = {
        'resnet50_repgraph': 26_285_882, 'resnet50_repgraph_3l': 29_369_566, 'resnet50_repgraph_5l': 30_827_266,
        'resnet50_nonlocal': 26_608_424, 'resnet101_repgraph': 45_278_010, 'resnet101_nonlocal': 45_600_552,
    }
    for name, n in counts.items():
        model = timm.create_model(name, device='meta')
        assert sum(p.numel() for p in model.parameters()) == n, name


def test_readme_example_runs():
    """ The README's RepGraph example runs (no download: pretrained=False; 64 px images instead of 256). """
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    start = text.index('### RepGraph (ECCV 2020)')
    code = text[text.index('```python\n', start) + len('```python\n'):]
    code = code[:code.index('```')]
    assert "timm.create_model('resnet50_repgraph', pretrained=True)" in code
    code = code.replace('pretrained=True', 'pretrained=False').replace('256, 256', '64, 64')
    scope = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    assert scope['y'].shape == (2, 512, 33, 33) and torch.isfinite(scope['loss'])


# ---------------------------------------------------------------- real clients on the layer


def _perturbed(layer):
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return layer.eval()


def test_layer_compile_export_script_trace():
    torch.manual_seed(0)
    layer = _perturbed(RepGraph(16, 8, num_nodes=5, grid=2, groups=2, fusion='concat'))
    x, x2 = torch.randn(2, 16, 9, 7), torch.randn(1, 16, 6, 11)
    with torch.no_grad():
        ref = layer(x)
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), ref)
        torch.testing.assert_close(torch.export.export(layer, (x,)).module()(x), ref)
        torch.testing.assert_close(torch.jit.trace(layer, (x,))(x2), layer(x2))
        torch.testing.assert_close(torch.jit.script(layer)(x2), layer(x2), rtol=1e-5, atol=1e-6)


def test_layer_portable_path_exports_to_onnx():
    import io
    ort = pytest.importorskip('onnxruntime')
    from timm.layers import set_layer_config
    torch.manual_seed(0)
    with set_layer_config(exportable=True):
        layer = _perturbed(RepGraph(16, 8, num_nodes=5, grid=2, groups=2))
    assert not layer.fused_attn and RepGraph(16, 8).fused_attn
    f = io.BytesIO()
    torch.onnx.export(layer, (torch.randn(2, 16, 9, 7),), f, opset_version=17, dynamo=False, input_names=['x'],
                      dynamic_axes={'x': {0: 'b', 2: 'h', 3: 'w'}})
    sess = ort.InferenceSession(f.getvalue())
    x = torch.randn(1, 16, 12, 5)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {'x': x.numpy()})[0], layer(x).numpy(), rtol=1e-4, atol=1e-5)


def test_grid_displacements_keep_subpixel_accuracy_in_bfloat16():
    from dgmn_timm.layers.repgraph import grid_displacement
    off = torch.full((1, 2, 2, 1), 0.25)
    d16 = grid_displacement(off.bfloat16(), 300, 3, 150)  # distances up to 150 px: bfloat16 steps are 1 px there
    d32 = grid_displacement(off, 300, 3, 150)
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, d32)
    assert d32[0, 1, 0, 0].item() == 0.25 + 74.5 - 1  # anchor of rows 0..149 is 74.5


def test_grid_layer_fx_traces():
    """ torchvision's FX feature extraction of a backbone with a grid RepGraph (grid > 1): the grid's
    displacement depends on the map size, so it must stay a leaf of the FX graph. """
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), RepGraph(16, 8, num_nodes=5, grid=2)).eval()
    extractor = create_feature_extractor(model, return_nodes=['1']).eval()
    x = torch.randn(1, 3, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)['1'], model(x))
