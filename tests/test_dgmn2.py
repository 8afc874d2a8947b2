""" DGMN2 as a timm model: sizes, cost, and timm's model API (in the spirit of timm's tests/test_models.py). """
import pytest
import timm
import torch
import torch.nn as nn

import dgmn_timm  # noqa: F401
from dgmn_timm.tools.profiling import count_model_macs
from utils import randomise

VARIANTS = ['dgmn2_tiny', 'dgmn2_small', 'dgmn2_medium', 'dgmn2_large']
EXACT_PARAMS = {
    'dgmn2_tiny': 12_101_464,
    'dgmn2_small': 20_968_360,
    'dgmn2_medium': 35_811_712,
    'dgmn2_large': 48_286_762,
}
PAPER_GMACS = {'dgmn2_tiny': 2.3, 'dgmn2_small': 4.3, 'dgmn2_medium': 7.1, 'dgmn2_large': 10.4}
BIG = pytest.mark.slow


def _model(name='dgmn2_tiny', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def _x(h=64, w=64, b=2, c=3):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1))


def test_registered():
    assert set(VARIANTS) <= set(timm.list_models('dgmn2_*'))
    assert set(f'{v}.in1k' for v in VARIANTS) <= set(timm.list_models('dgmn2_*', pretrained=True))


@pytest.mark.parametrize('name', VARIANTS)
def test_exact_parameter_count(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == EXACT_PARAMS[name]


@pytest.mark.parametrize('name', VARIANTS)
def test_macs_within_3_percent_of_paper(name):
    macs = count_model_macs(name, (1, 3, 224, 224))
    assert abs(macs['total'] / 1e9 / PAPER_GMACS[name] - 1) < 0.03, macs


def test_macs_linear_in_pixels():
    a = count_model_macs('dgmn2_tiny', (1, 3, 224, 224))['total']
    b = count_model_macs('dgmn2_tiny', (1, 3, 448, 448))['total']
    assert 3.9 < b / a < 4.1


def test_default_cfg():
    model = _model()
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'] == 'dgmn-timm/dgmn2_tiny.in1k'
    assert cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == (0.485, 0.456, 0.406) and cfg['std'] == (0.229, 0.224, 0.225)
    assert cfg['license'] == 'apache-2.0' and cfg['paper_ids'] == 'arXiv:2209.09760'
    assert cfg['origin_url'] and cfg['fixed_input_size'] is False
    first_conv = model.get_submodule(cfg['first_conv'])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert model.get_submodule(cfg['classifier']) is model.get_classifier()
    model.eval()
    x = torch.randn(1, *cfg['input_size'])
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (1, model.num_features, *cfg['pool_size'])
        assert model.forward_head(feat).shape == (1, cfg['num_classes'])
        assert model.forward_head(feat, pre_logits=True).shape == (1, model.num_features)


@pytest.mark.parametrize('name', ['dgmn2_tiny', pytest.param('dgmn2_small', marks=BIG),
                                  pytest.param('dgmn2_medium', marks=BIG), pytest.param('dgmn2_large', marks=BIG)])
def test_forward_backward_reaches_every_parameter(name):
    model = randomise(_model(name, num_classes=7))
    model.train()
    out = model(_x(64, 48))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not no_grad, no_grad


def test_big_variants_forward_small_input():
    """ The default run still builds and runs medium/large once, cheaply (stage depth only matters). """
    for name in ('dgmn2_small', 'dgmn2_medium', 'dgmn2_large'):
        model = _model(name, num_classes=3).eval()
        with torch.no_grad():
            out = model(_x(32, 32, b=1))
        assert out.shape == (1, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize('hw', [(32, 32), (33, 47), (97, 45), (160, 224), (64, 300)])
def test_odd_input_sizes(hw):
    model = _model(num_classes=5).eval()
    with torch.no_grad():
        feats = model.forward_intermediates(_x(*hw, b=1), intermediates_only=True)
        out = model(_x(*hw, b=1))
    assert out.shape == (1, 5)
    h, w = hw
    for f, r in zip(feats, (4, 8, 16, 32)):
        assert f.shape[-2:] == (-(-h // r), -(-w // r))


def test_bad_input_errors():
    model = _model().eval()
    with pytest.raises(AssertionError, match='at least 32x32'):
        model(_x(64, 31))
    with pytest.raises(AssertionError, match='built for 3 input channels'):
        model(_x(64, 64, c=4))
    with pytest.raises(AssertionError, match=r'\(B, C, H, W\)'):
        model(torch.randn(3, 64, 64))


def test_features_only():
    model = _model(features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 320, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(_x(64, 96))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 320, 4, 6), (2, 512, 2, 3)]
    sub = _model(features_only=True, out_indices=(1, 3))
    assert sub.feature_info.channels() == [128, 512]


@pytest.mark.parametrize('output_stride,reductions', [(16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_output_stride(output_stride, reductions):
    assert _model(features_only=True, output_stride=output_stride).feature_info.reduction() == reductions
    full = randomise(_model())
    model = _model(output_stride=output_stride).eval()
    model.load_state_dict(full.state_dict())  # same parameters: strict load
    with torch.no_grad():
        feats = model.forward_intermediates(_x(64, 64), intermediates_only=True)
        assert model(_x(64, 64)).shape == (2, 1000)
    assert [f.shape[-1] for f in feats] == [64 // r for r in reductions]


def _features_sd(model):
    """ A classification state dict in the key layout of timm's FeatureListNet wrapper. """
    return {k.replace('stages.', 'stages_', 1): v for k, v in model.state_dict().items() if not k.startswith('head')}


def test_forward_intermediates_match_forward_features():
    model = randomise(_model()).eval()
    x = _x(64, 80)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ff = model.forward_features(x)
        torch.testing.assert_close(final, ff)
        torch.testing.assert_close(inter[-1], ff)
        assert len(inter) == 4
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[0], inter[2])
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(picked[0], inter[0])
        torch.testing.assert_close(picked[1], inter[3])
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])
    fo = _model(features_only=True)
    fo.load_state_dict(_features_sd(model))
    with torch.no_grad():
        for a, b in zip(fo.eval()(x), inter):
            torch.testing.assert_close(a, b)
    with pytest.raises(AssertionError, match='out of range'):
        model.forward_intermediates(x, indices=[4])


def test_prune_intermediate_layers():
    model = randomise(_model()).eval()
    x = _x(64, 64)
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
    taken = model.prune_intermediate_layers(indices=[0, 2])
    assert taken == [0, 2] and len(model.stages) == 3
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_features == 320
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        torch.testing.assert_close(pruned[1], inter[2])
        assert model(x).shape == (2, 320, 4, 4)  # no pooling left after pruning the head


def test_reset_classifier():
    model = _model().eval()
    x = _x()
    model.reset_classifier(10)
    assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    model.reset_classifier(0, global_pool='')
    assert model(x).shape == (2, 512, 2, 2)
    model.reset_classifier(3, global_pool='avg')
    assert model(x).shape == (2, 3)
    assert _model(num_classes=0, global_pool='').eval()(x).shape == (2, 512, 2, 2)


def test_grad_checkpointing_leaves_outputs_unchanged():
    model = randomise(_model(num_classes=4))
    model.train()
    x = _x(64, 64)
    torch.manual_seed(0)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(s.grad_checkpointing for s in model.stages)
    torch.manual_seed(0)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_drop_rates():
    model = _model(drop_rate=0.5, drop_path_rate=0.3, num_classes=4)
    rates = [getattr(b.drop_path1, 'drop_prob', 0.) for s in model.stages for b in s.blocks]
    assert rates[0] == 0. and rates[-1] == pytest.approx(0.3)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert isinstance(model.stages[0].blocks[0].drop_path1, nn.Identity)
    x = _x()
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


def test_in_chans():
    model = _model(in_chans=1, num_classes=2).eval()
    assert model.stem.conv1.in_channels == 1
    assert model(_x(c=1)).shape == (2, 2)


def test_group_matcher_and_layer_decay():
    from timm.optim import create_optimizer_v2
    model = _model()
    groups = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.7).param_groups
    scales = sorted({g['lr_scale'] for g in groups})
    assert len(scales) > 5 and scales[-1] == pytest.approx(1.0)
    n_params = sum(len(g['params']) for g in groups)
    assert n_params == len(list(model.parameters()))
    assert set(model.group_matcher(coarse=True)) == {'stem', 'blocks'}


def test_no_weight_decay():
    model = _model()
    nwd = model.no_weight_decay()
    assert 'stages.0.blocks.0.attn.rel_height' in nwd and len(nwd) == 2 * sum(model.depths)
    from timm.optim import create_optimizer_v2
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g['weight_decay'] > 0 for p in g['params']}
    table = model.stages[0].blocks[0].attn.rel_height
    assert id(table) not in decayed and id(model.stages[0].blocks[0].attn.qkv.weight) in decayed


def test_torchscript():
    model = randomise(_model()).eval()
    scripted = torch.jit.script(model)
    x = _x(64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_fx_feature_extraction():
    model = randomise(_model())
    hooks = _model(features_only=True).eval()
    fx = _model(features_only=True, feature_cls='fx').eval()
    hooks.load_state_dict(_features_sd(model))
    fx.load_state_dict({'graph_module.' + k: v for k, v in model.state_dict().items() if not k.startswith('head')})
    x = _x(64, 80)
    with torch.no_grad():
        for a, b in zip(hooks(x), fx(x)):
            torch.testing.assert_close(a, b)


def test_rel_pos_clean_option_changes_output():
    a = randomise(_model()).eval()
    b = _model(rel_pos_released=False).eval()
    b.load_state_dict(a.state_dict())
    x = _x(64, 64)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def _attentions(model):
    from dgmn_timm.models.dgmn2 import DynamicGraphAttention
    return [m for m in model.modules() if isinstance(m, DynamicGraphAttention)]


def test_attention_path_chosen_at_construction(monkeypatch):
    """ The fused op by default; timm's switches (or attention dropout) select the portable path
    when the model is built, and both paths compute the same model. """
    import timm.layers.config as timm_config
    assert all(a.fused_attn for a in _attentions(_model()))
    for kwargs in (dict(exportable=True), dict(scriptable=True), dict(attn_drop_rate=0.1)):
        assert not any(a.fused_attn for a in _attentions(_model(**kwargs))), kwargs
    monkeypatch.setattr(timm_config, '_USE_FUSED_ATTN', 0)  # what timm.layers.set_fused_attn(False) sets
    assert not any(a.fused_attn for a in _attentions(_model()))
    monkeypatch.undo()
    fused = randomise(_model()).eval()
    portable = _model(exportable=True).eval()
    portable.load_state_dict(fused.state_dict())
    x = _x(70, 45)
    with torch.no_grad():
        torch.testing.assert_close(portable(x), fused(x), atol=1e-5, rtol=1e-5)
