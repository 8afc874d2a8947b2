""" DGMN (CVPR 2020) module, its ResNet backbones and the Cityscapes-style head (issue 7).

Numbers are the paper's (docs/ARCHITECTURE.md lists them). Inputs are tiny; MACs are counted on the meta device.
"""
import logging

import pytest
import torch
import torch.nn.functional as F
import timm
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.layers import DGMN, DGMNHead
from dgmn_timm.models.resnet_dgmn import ResNetDGMN, checkpoint_filter_fn as resnet_dgmn_checkpoint_filter_fn
from dgmn_timm.ops.reference import sample_nodes_reference

K = 9
CITY_RATES = (1, 6, 12, 24, 36)


def _count(module, walks=True):
    return sum(p.numel() for n, p in module.named_parameters() if walks or not n.startswith('walk.'))


def _randomise_walks(m: DGMN, std=0.05):
    with torch.no_grad():
        for conv in m.walk:
            conv.weight.normal_(0, std)


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize('kwargs, walks, expected', [
    (dict(rates=(1,), mode='DA', fusion='concat'), True, 565_760),
    (dict(rates=(1,), mode='DA+DW', fusion='concat'), True, 731_648),
    (dict(rates=CITY_RATES, mode='full', fusion='concat'), False, 2_609_664),
    (dict(rates=CITY_RATES, mode='full', fusion='concat'), True, 3_024_384),
    (dict(rates=(1, 4, 8, 12), groups=4, mode='full', fusion='sum'), True, 1_161_220),
])
def test_module_param_counts(kwargs, walks, expected):
    m = DGMN(512, device='meta', **kwargs)
    assert _count(m, walks) == expected


def test_default_module_is_coco_block():
    m = DGMN(512, device='meta')
    assert m.rates == (1, 4, 8, 12) and m.groups == 4 and m.fusion == 'sum' and m.mode == 'full'
    assert _count(m) == 1_161_220


@pytest.mark.parametrize('name, expected', [
    ('resnet50', 25_557_032),
    ('resnet50_dgmn_c5', 29_040_692),
    ('resnet50_dgmn_c4c5', 32_524_364),
])
def test_model_param_counts(name, expected):
    m = timm.create_model(name, device='meta')
    assert sum(p.numel() for p in m.parameters()) == expected


def test_dgmn_placement():
    m = timm.create_model('resnet50_dgmn_c4c5', device='meta')
    with_dgmn = sorted({k.split('.dgmn.')[0] for k, _ in m.named_parameters() if '.dgmn.' in k})
    assert with_dgmn == [f'layer3.{i}' for i in range(6)] + [f'layer4.{i}' for i in range(3)]
    for s, width in ((3, 256), (4, 512)):
        for blk in getattr(m, f'layer{s}'):
            assert isinstance(blk.dgmn, DGMN) and blk.dgmn.dim == width == blk.conv3.in_channels


# ---------------------------------------------------------------- MACs


@pytest.mark.parametrize('kwargs, spec_gmacs, walks', [
    (dict(rates=(1,), mode='DA'), 5.32, True),
    (dict(rates=(1,), mode='DA+DW'), 6.88, True),
    (dict(rates=CITY_RATES, mode='full'), 24.55, False),
    (dict(rates=CITY_RATES, mode='full'), 28.46, True),
])
def test_head_setting_macs(kwargs, spec_gmacs, walks):
    m = DGMN(512, fusion='concat', device='meta', **kwargs)
    x = torch.empty(1, 512, 97, 97, device='meta')
    with FlopCounterMode(display=False) as fc:
        m(x)
    counted = fc.get_total_flops() / 2  # convs and matmuls; sampling and softmax are not counted
    if not walks:
        counted -= sum(c.weight.numel() for c in m.walk) * 97 * 97
    assert abs(counted / 1e9 - spec_gmacs) / spec_gmacs < 0.01
    # the analytic count adds the message products (~1 %)
    analytic = m.macs(97, 97, walks=walks)
    assert abs(analytic / 1e9 - spec_gmacs) / spec_gmacs < 0.03
    assert analytic >= counted


# ---------------------------------------------------------------- sampling and graph


def test_zero_walks_sample_the_dilated_grid():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 11, 13)
    m = DGMN(8, rates=(1, 2, 5), groups=2)
    for idx, d in enumerate(m.rates):
        offset = m.walk[idx](x)
        nodes = m._sampled(x, offset, d)
        assert torch.count_nonzero(offset) == 0
        torch.testing.assert_close(nodes, F.unfold(x, 3, dilation=d, padding=d), rtol=1e-5, atol=1e-6)
    # hence the full module starts equal to the walk-free ablation with the same predictors
    m2 = DGMN(8, rates=(1, 2, 5), groups=2, mode='DA+DW')
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith('walk.')})
    torch.testing.assert_close(m(x), m2(x), rtol=1e-5, atol=1e-5)


def test_walks_move_the_nodes():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 10, dtype=torch.float64)
    m = DGMN(4, rates=(1, 3), groups=2).double()
    _randomise_walks(m, 0.5)
    for idx, d in enumerate(m.rates):
        offset = m.walk[idx](x)
        nodes = m._sampled(x, offset, d)
        assert offset.abs().max() > 0.1
        ref = sample_nodes_reference(x, offset, d).reshape(1, 4 * K, -1)
        torch.testing.assert_close(nodes, ref, rtol=1e-9, atol=1e-9)


def test_affinities_and_filters_of_every_rate():
    """ Affinities are the softmax of each rate's own last K predictor channels (the spec's
    released-code defect read the 4th rate's affinities from filter channels). """
    torch.manual_seed(0)
    G = 4
    x = torch.randn(2, 16, 7, 9)
    m = DGMN(16, rates=(1, 2, 3, 4), groups=G)
    graph = m.graph_info(x)
    assert len(graph) == 4
    for idx, (g, d) in enumerate(zip(graph, m.rates)):
        assert g['rate'] == d
        aff = g['affinity']
        assert aff.shape == (2, K, 7, 9)
        torch.testing.assert_close(aff.sum(1), torch.ones(2, 7, 9))
        assert (aff > 0).all()
        w = m.pred[idx].weight
        logits = F.conv2d(x, w, dilation=d, padding=d)  # zero walks: a plain dilated conv
        torch.testing.assert_close(aff, logits[:, G * K:].softmax(1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g['filters'], logits[:, :G * K].reshape(2, G, K, 7, 9), rtol=1e-4, atol=1e-5)
        # base node positions: (y - d + i d, x - d + j d)
        pos = g['positions'][0]
        assert pos[0, 3, 4].tolist() == [3 - d, 4 - d] and pos[8, 3, 4].tolist() == [3 + d, 4 + d]
    # the affinities differ between rates (each has its own predictor)
    assert not torch.allclose(graph[2]['affinity'], graph[3]['affinity'])


def _reference_forward(m: DGMN, x: torch.Tensor) -> torch.Tensor:
    """ Slow float64 oracle: explicit corner sampling and loops over groups and nodes. """
    B, C, H, W = x.shape
    x = x.double()
    msgs = []
    for idx, d in enumerate(m.rates):
        if m.walk is not None:
            offset = F.conv2d(x, m.walk[idx].weight.double(), dilation=d, padding=d)
        else:
            offset = x.new_zeros(B, 2 * K, H, W)
        nodes = sample_nodes_reference(x, offset, d)  # (B, C, K, N)
        w = m.pred[idx].weight.double().reshape(-1, C, K)
        pred = torch.einsum('ock,bckn->bon', w, nodes)
        aff = pred[:, -K:].softmax(1)
        msg = torch.zeros(B, C, H * W, dtype=torch.float64)
        for c in range(C):
            g = c // (C // m.groups)
            for k in range(K):
                f = pred[:, g * K + k] if m.use_filters else 1.
                msg[:, c] += f * aff[:, k] * nodes[:, c, k]
        msgs.append(msg.reshape(B, C, H, W))
    if m.fusion == 'sum':
        return x + sum(b * mm for b, mm in zip(m.beta.double(), msgs))
    return F.conv2d(torch.cat([x] + msgs, 1), m.fuse.weight.double())


@pytest.mark.parametrize('mode', ['DA', 'DA+DW', 'full'])
@pytest.mark.parametrize('fusion', ['sum', 'concat'])
def test_forward_matches_reference(mode, fusion):
    torch.manual_seed(0)
    m = DGMN(8, rates=(1, 2, 4), groups=2, mode=mode, fusion=fusion)
    with torch.no_grad():
        for p in m.pred:
            p.weight.normal_(0, 0.3)
        if m.walk is not None:
            _randomise_walks(m, 0.3)
        if m.beta is not None:
            m.beta.copy_(torch.tensor([0.5, -1.0, 2.0]))
        else:
            m.fuse.weight.normal_(0, 0.2)
    x = torch.randn(2, 8, 6, 7)
    torch.testing.assert_close(m(x).double(), _reference_forward(m, x), rtol=1e-4, atol=1e-4)


def test_zero_scales_give_identity():
    torch.manual_seed(0)
    m = DGMN(8, rates=(1, 2, 3, 5, 7), groups=4)
    _randomise_walks(m)
    x = torch.randn(2, 8, 9, 9)
    assert not torch.allclose(m(x), x)
    with torch.no_grad():
        m.beta.zero_()
    torch.testing.assert_close(m(x), x, rtol=0, atol=0)
    # the 'concat' module starts as the identity on x
    mc = DGMN(8, rates=(1, 2), groups=4, fusion='concat')
    torch.testing.assert_close(mc(x), x, rtol=1e-6, atol=1e-6)


def test_gradcheck_tiny():
    torch.manual_seed(0)
    m = DGMN(4, rates=(1, 2), groups=2).double()
    _randomise_walks(m, 0.3)
    with torch.no_grad():
        m.beta.copy_(torch.tensor([0.7, 1.3]))
        for p in m.pred:
            p.weight.normal_(0, 0.5)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-5, fast_mode=True)


def test_bad_arguments():
    with pytest.raises(ValueError):
        DGMN(10, groups=4)
    with pytest.raises(ValueError):
        DGMN(8, mode='walks')
    with pytest.raises(ValueError):
        DGMN(8, fusion='mean')
    with pytest.raises(ValueError):
        DGMN(8, rates=())
    with pytest.raises(ValueError):
        DGMN(8, mode='da+dw+ds')  # one name per setting: 'full'
    assert DGMN(10, groups=4, mode='DA').walk is None  # no filters: groups unused


# ---------------------------------------------------------------- ResNet models


def _zero_scales(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DGMN):
                m.beta.zero_()


def test_zero_scales_model_equals_plain_resnet():
    torch.manual_seed(0)
    # zero_init_last=False: with timm's zero last-BN init the residual branches (and so the
    # DGMN modules) would not change the output at all
    model = timm.create_model('resnet50_dgmn_c4c5', zero_init_last=False).eval()
    for m in model.modules():  # timm's init must not have touched the zero walks
        if isinstance(m, DGMN):
            assert all(torch.count_nonzero(c.weight) == 0 for c in m.walk)
            assert torch.equal(m.beta, torch.ones(4))
    plain = timm.create_model('resnet50').eval()
    res = plain.load_state_dict(model.state_dict(), strict=False)
    assert not res.missing_keys and res.unexpected_keys and all('.dgmn.' in k for k in res.unexpected_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = plain(x)
        out = model(x)
        assert not torch.allclose(out, ref, atol=1e-4)
        _zero_scales(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_features_only_and_api():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    fm = timm.create_model('resnet50_dgmn_c4c5', features_only=True).eval()
    assert fm.feature_info.channels() == [64, 256, 512, 1024, 2048]
    assert fm.feature_info.reduction() == [2, 4, 8, 16, 32]
    assert any('.dgmn.' in n for n, _ in fm.named_parameters())
    fm.set_grad_checkpointing(True)
    feats = fm(x)
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 16), (1, 256, 8, 8), (1, 512, 4, 4), (1, 1024, 2, 2), (1, 2048, 1, 1)]
    fm8 = timm.create_model('resnet50_dgmn_c5', features_only=True, output_stride=8, out_indices=(3, 4)).eval()
    assert fm8.feature_info.reduction() == [8, 8]
    assert [tuple(f.shape) for f in fm8(x)] == [(1, 1024, 4, 4), (1, 2048, 4, 4)]


def test_model_api_and_grad_checkpointing():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model('resnet50_dgmn_c5', num_classes=7, zero_init_last=False)
    assert isinstance(model, ResNetDGMN)
    # gradient checkpointing goes through the DGMN blocks and gives the same result
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    grad = model.layer4[0].dgmn.pred[0].weight.grad.clone()
    assert grad.abs().sum() > 0
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(model.layer4[0].dgmn.pred[0].weight.grad, grad, rtol=1e-4, atol=1e-6)
    model.set_grad_checkpointing(False)
    model.eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 5 and tuple(final.shape) == (2, 2048, 1, 1)
        torch.testing.assert_close(model.forward_head(final), model(x))
    model.reset_classifier(3)
    assert model.fc.out_features == 3
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher())
    grouped = {n for g in groups.values() for n in g}
    assert grouped == {n for n, _ in model.named_parameters()}


# ---------------------------------------------------------------- head


def test_head_output_size():
    torch.manual_seed(0)
    backbone = timm.create_model('resnet18', features_only=True, output_stride=8, out_indices=(4,))
    head = DGMNHead(backbone.feature_info.channels()[-1], num_classes=19, channels=32)
    img = torch.randn(2, 3, 64, 72)
    feats = backbone(img)
    assert feats[-1].shape[-2:] == (8, 9)
    assert head(feats).shape == (2, 19, 8, 9)
    assert head(feats, output_size=img.shape[-2:]).shape == (2, 19, 64, 72)
    assert head.dgmn.rates == CITY_RATES and head.dgmn.fusion == 'concat' and head.dgmn.groups == 4


def test_head_default_is_cityscapes_setting():
    head = DGMNHead(2048, 19, device='meta')
    assert head.conv.in_channels == 2048 and head.conv.out_channels == 512
    assert _count(head.dgmn) == 3_024_384


# ---------------------------------------------------------------- pretrained loading


@pytest.fixture(scope='module')
def plain_resnet50_file(tmp_path_factory):
    """ A random plain timm resnet50 (BN statistics randomised too), saved as a state dict. """
    torch.manual_seed(0)
    plain = timm.create_model('resnet50')
    with torch.no_grad():
        for b in plain.buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp('ckpt') / 'resnet50.pth'
    torch.save(plain.state_dict(), path)
    return path, plain.state_dict()


def test_pretrained_from_plain_resnet_file(plain_resnet50_file, caplog):
    path, sd = plain_resnet50_file
    with caplog.at_level(logging.INFO, logger='dgmn_timm.models.resnet_dgmn'):
        model = timm.create_model('resnet50_dgmn_c5', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(own[k], v), k
    dgmn_keys = [k for k in own if '.dgmn.' in k]
    assert len(dgmn_keys) == 3 * (4 + 4 + 1)
    assert sorted(model.pretrained_dgmn_missing_keys) == sorted(dgmn_keys)
    assert sorted(dgmn_keys) == sorted(set(own) - set(sd))
    text = caplog.text
    assert 'NOT pretrained' in text and all(k in text for k in dgmn_keys)
    # DGMN keeps its initialisation
    assert torch.count_nonzero(model.layer4[1].dgmn.walk[2].weight) == 0
    assert torch.equal(model.layer4[2].dgmn.beta, torch.ones(4))
    # ...and the cfg says so
    assert any('NOT pretrained' in n for n in model.pretrained_cfg['notes'])
    # a state dict of the DGMN model itself passes with nothing missing
    meta = timm.create_model('resnet50_dgmn_c5', device='meta')
    out = resnet_dgmn_checkpoint_filter_fn(own, meta)
    assert meta.pretrained_dgmn_missing_keys == [] and out.keys() == own.keys()


def test_pretrained_other_num_classes(plain_resnet50_file):
    path, sd = plain_resnet50_file
    model = timm.create_model(
        'resnet50_dgmn_c4c5', pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.layer3[2].conv2.weight, sd['layer3.2.conv2.weight'])
    assert model.fc.out_features == 5
    assert len(model.pretrained_dgmn_missing_keys) == 9 * 9
    # timm's input-conv adaptation still applies
    model = timm.create_model(
        'resnet50_dgmn_c5', pretrained=True, in_chans=1, features_only=True, output_stride=16,
        pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(model.conv1.weight, sd['conv1.weight'].sum(1, keepdim=True))
    assert model.layer4[0].dgmn.rates == (1, 4, 8, 12)


def test_pretrained_rejects_a_broken_file(plain_resnet50_file, tmp_path):
    _, sd = plain_resnet50_file
    sd = dict(sd)
    del sd['layer2.1.bn2.weight']
    path = tmp_path / 'bad.pth'
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match='only DGMN keys may be missing'):
        timm.create_model('resnet50_dgmn_c5', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize('corrupt', ['missing', 'unexpected', 'shape', 'depth'])
def test_checkpoint_filter_rejects_mismatches(corrupt):
    model = timm.create_model('resnet50_dgmn_c5', device='meta')
    src = 'resnet101' if corrupt == 'depth' else 'resnet50'
    sd = timm.create_model(src, device='meta').state_dict()
    if corrupt == 'missing':
        del sd['layer2.1.bn2.weight']
    elif corrupt == 'unexpected':
        sd['layer4.0.extra.weight'] = torch.zeros(3)
    elif corrupt == 'shape':
        sd['layer1.0.conv1.weight'] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(RuntimeError, match='only DGMN keys may be missing'):
        resnet_dgmn_checkpoint_filter_fn(sd, model)
    resnet_dgmn_checkpoint_filter_fn(timm.create_model('resnet50', device='meta').state_dict(), model)
