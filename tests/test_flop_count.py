""" The op's cost as PyTorch's FlopCounterMode sees it: the op, its backward, RepGraph's layers and the
four DGMN2 variants against the paper's GMACs. """
import pytest
import torch
import timm
from torch.utils.flop_counter import FlopCounterMode

import dgmn_timm  # noqa: F401  (registers the models and the op)
from dgmn_timm.layers import RepGraph
from dgmn_timm.ops import sampled_attention
from dgmn_timm.tools.profiling import count_macs, count_model_macs
from utils import load_script

PAPER_GMACS = {'dgmn2_tiny': 2.3, 'dgmn2_small': 4.3, 'dgmn2_medium': 7.1, 'dgmn2_large': 10.4}
OP = 'dgmn_timm.sampled_attention_fwd'
BACKWARD = 'dgmn_timm.sampled_attention_backward'


def _flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op): n for op, n in counter.get_flop_counts()['Global'].items()}


def _inputs(B, H, W, nh, hd, K, tables=False, grad=False):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H, W, 3, nh, hd, generator=g).requires_grad_(grad)
    off = (torch.randn(B, H, W, nh, 2 * K, generator=g) * 1.5).requires_grad_(grad)
    pos = [torch.randn(L, K, hd, generator=g) for L in (H, W)] if tables else [None, None]
    return qkv, off, pos


@pytest.mark.parametrize('K,tables', [(9, False), (9, True), (4, True)])
def test_op_forward_flops(K, tables):
    B, H, W, nh, hd = 2, 5, 3, 2, 8
    qkv, off, (ph, pw) = _inputs(B, H, W, nh, hd, K, tables)
    counts = _flops(lambda: sampled_attention(qkv, off, None, 0.5, ph, pw, True))
    # per (query, head, node): hd for <q, k>, hd for p v, 8 hd for the 4-corner reads of k and v,
    # hd per position table; 2 FLOPs per multiply-add
    macs = B * H * W * nh * K * hd * (10 + 2 * tables)
    assert counts == {OP: 2 * macs}


@pytest.mark.parametrize('need_qkv', [True, False])
def test_op_backward_flops(need_qkv):
    B, H, W, nh, hd, K = 1, 4, 6, 2, 4, 9
    qkv, off, (ph, pw) = _inputs(B, H, W, nh, hd, K, tables=True)
    qkv.requires_grad_(need_qkv)
    off.requires_grad_()
    ph.requires_grad_()

    def step():
        sampled_attention(qkv, off, None, 0.5, ph, pw, True).sum().backward()

    counts = _flops(step)
    unit = 2 * B * H * W * nh * K * hd
    assert counts[OP] == 12 * unit
    # with d qkv: twice the forward; else the output gradient against the 4K value corners and the tables
    assert counts[BACKWARD] == (24 * unit if need_qkv else 6 * unit)


@pytest.mark.parametrize('grid,groups', [(1, 1), (2, 2)])
def test_repgraph_layer_counts_the_op(grid, groups):
    layer = RepGraph(32, 16, num_nodes=5, grid=grid, groups=groups).eval()
    H, W = 9, 7
    counts = _flops(lambda: layer(torch.randn(2, 32, H, W)))
    # the op's share: 10 S C' per position (contractions and bilinear reads); the 1x1 convs separately
    assert counts[OP] == 2 * 2 * H * W * 5 * 16 * 10
    assert counts['aten.convolution'] > 0


def test_repgraph_model_counts_the_op():
    with torch.device('meta'):
        model = timm.create_model('resnet50_repgraph').eval()
    macs = count_macs(model)
    assert macs[OP] > 0 and macs['total'] == sum(v for k, v in macs.items() if k != 'total')


def test_count_macs_is_plain_flop_counter():
    model = timm.create_model('dgmn2_tiny', img_size=64).eval()
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert count_macs(model, (1, 3, 64, 64))['total'] == counter.get_total_flops() // 2


@pytest.mark.parametrize('name', [
    'dgmn2_tiny', 'dgmn2_small',
    pytest.param('dgmn2_medium', marks=pytest.mark.slow), pytest.param('dgmn2_large', marks=pytest.mark.slow)])
def test_variants_within_3_percent_of_paper(name):
    with torch.device('meta'):
        model = timm.create_model(name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, 224, 224, device='meta'))
    gmacs = counter.get_total_flops() / 2 / 1e9
    assert abs(gmacs / PAPER_GMACS[name] - 1) < 0.03, gmacs


def test_model_backward_counted():
    model = timm.create_model('dgmn2_tiny', num_classes=5)
    counts = _flops(lambda: model(torch.randn(2, 3, 64, 48)).sum().backward())
    assert counts[BACKWARD] == 2 * counts[OP] > 0
    assert counts['aten.convolution_backward'] > 0


def test_count_macs_command(capsys):
    load_script('count_macs').main(['--models', 'dgmn2_tiny'])
    out = capsys.readouterr().out
    assert '| dgmn2_tiny | 12,101,464 | 2.303 | 2.3 | +0.1% |' in out, out


def test_portable_build_counts_about_the_same():
    """ The portable path's products are plain ops the counter sees (the position term's matmuls), its
    bilinear reads and elementwise node contractions (grid_sample, mul / sum) have no formula in
    PyTorch: the two builds differ by those, about 3 %. """
    fused = count_model_macs('dgmn2_tiny')
    portable = count_model_macs('dgmn2_tiny', exportable=True)
    assert OP in fused and OP not in portable
    assert 0.95 < portable['total'] / fused['total'] <= 1.0
