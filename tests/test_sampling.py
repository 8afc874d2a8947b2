""" Bilinear sampling (``axis_corners``, ``sample_nodes``) and the node grid against the float64 oracle. """
import pytest
import torch
import torch.nn.functional as F

from dgmn_timm.ops.reference import bilinear_reference, sample_nodes_reference
from dgmn_timm.ops.sampling import NUM_NODES, axis_corners, node_displacements, sample_nodes

SIZES = [(1, 1), (1, 5), (4, 1), (5, 7), (8, 3), (6, 6)]


def _inputs(B, C, H, W, scale=2.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    offset = (torch.rand(B, 2 * NUM_NODES, H, W, generator=g, dtype=dtype) * 2 - 1) * scale
    return x, offset


def test_node_displacements():
    for d in (1, 2, 3):
        expected = [[(i - 1) * d, (j - 1) * d] for i in range(3) for j in range(3)]
        assert node_displacements(d).tolist() == expected
    assert node_displacements(dtype=torch.float64).dtype == torch.float64 and NUM_NODES == 9


def test_axis_corners_by_hand():
    """ Pixel centres at integers; a pixel outside the 4-pixel axis reads zero; clamped indices. """
    p = torch.tensor([-1.5, -1., -0.25, 0., 1.25, 2.5, 3., 3.5, 4., 9.], dtype=torch.float64)
    i0, i1, w0, w1, in0, in1 = axis_corners(p, 4)
    assert i0.tolist() == [0, 0, 0, 0, 1, 2, 3, 3, 3, 3]
    assert i1.tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 3, 3]
    assert w0.tolist() == [0., 0., 0., 1., 0.75, 0.5, 1., 0.5, 0., 0.]
    assert w1.tolist() == [0., 0., 0.75, 0., 0.25, 0.5, 0., 0., 0., 0.]
    # the derivatives of w0 / w1 by p are -in0 / in1 (zero where both pixels are outside)
    assert in0.tolist() == [False, False, False, True, True, True, True, True, False, False]
    assert in1.tolist() == [False, True, True, True, True, True, False, False, False, False]
    # the oracle reads the same values
    img = torch.arange(4, dtype=torch.float64).view(1, 4, 1) + 1
    ref = bilinear_reference(img, torch.zeros_like(p), p)[:, 0]
    torch.testing.assert_close(ref, w0 * (i0 + 1) + w1 * (i1 + 1))


def test_reference_by_hand():
    # one 2x3 map, one node shifted by a known fraction: check bilinear weights explicitly
    x = torch.arange(6, dtype=torch.float64).view(1, 1, 2, 3)
    offset = torch.zeros(1, 18, 2, 3, dtype=torch.float64)
    offset[0, 2 * 4, 0, 0] = 0.25  # centre node (k = 4) of pixel (0, 0): dy
    offset[0, 2 * 4 + 1, 0, 0] = 0.5  # dx
    out = sample_nodes_reference(x, offset).view(9, 2, 3)
    # reads at (0.25, 0.5): 0.75*0.5*x00 + 0.75*0.5*x01 + 0.25*0.5*x10 + 0.25*0.5*x11
    expected = 0.375 * 0 + 0.375 * 1 + 0.125 * 3 + 0.125 * 4
    assert out[4, 0, 0].item() == pytest.approx(expected)
    # node 0 of pixel (0, 0) reads at (-1, -1): outside, zero
    assert out[0, 0, 0].item() == 0.
    # node 8 of pixel (0, 0) reads at (1, 1) exactly
    assert out[8, 0, 0].item() == 4.


@pytest.mark.parametrize('H,W', SIZES)
@pytest.mark.parametrize('dilation', [1, 2, 3])
def test_fast_matches_reference_float64(H, W, dilation):
    x, offset = _inputs(2, 3, H, W, seed=H * 10 + W)
    ref = sample_nodes_reference(x, offset, dilation)
    out = sample_nodes(x, offset, dilation)
    assert out.shape == (2, 3, NUM_NODES, H * W)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize('H,W', SIZES)
def test_fast_matches_reference_float32(H, W):
    x, offset = _inputs(2, 4, H, W, seed=1)
    ref = sample_nodes_reference(x, offset)
    out = sample_nodes(x.float(), offset.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_out_of_range_offsets():
    H, W = 5, 4
    x, _ = _inputs(1, 2, H, W)
    # walks far outside, exactly on the border (-1 and H/W read zero), and just inside it
    values = torch.tensor([-100., -7.5, -1.0, -0.999, 0., 0.5, 3.999, 4.0, 5.0, 1e4], dtype=torch.float64)
    offset = values[torch.randint(len(values), (1, 18, H, W), generator=torch.Generator().manual_seed(3))]
    ref = sample_nodes_reference(x, offset)
    out = sample_nodes(x, offset)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # everything pushed 1e4 px away reads zero
    far = sample_nodes(x, torch.full((1, 18, H, W), 1e4, dtype=torch.float64))
    assert far.abs().max().item() == 0.


@pytest.mark.parametrize('dilation', [1, 2, 4])
def test_zero_offsets_equal_unfold(dilation):
    x, _ = _inputs(2, 3, 7, 5)
    zero = torch.zeros(2, 18, 7, 5, dtype=torch.float64)
    out = sample_nodes(x, zero, dilation)
    unfold = F.unfold(x, 3, dilation=dilation, padding=dilation).view(2, 3, 9, 35)
    torch.testing.assert_close(out, unfold, atol=1e-12, rtol=0)


@pytest.mark.parametrize('H,W,dilation', [(5, 7, 1), (1, 1, 1), (4, 3, 2)])
def test_matches_torchvision_deform_conv(H, W, dilation):
    """ Second oracle: deform_conv2d with one-hot weights returns the sampled nodes. """
    tv_ops = pytest.importorskip('torchvision.ops')
    C = 3
    x, offset = _inputs(2, C, H, W, seed=7)
    weight = torch.zeros(C * 9, C, 3, 3, dtype=torch.float64)
    for c in range(C):
        for k in range(9):
            weight[c * 9 + k, c, k // 3, k % 3] = 1.
    ref = tv_ops.deform_conv2d(x, offset, weight, padding=dilation, dilation=dilation).view(2, C, 9, H * W)
    out = sample_nodes(x, offset, dilation)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_gradcheck():
    x, offset = _inputs(1, 2, 3, 4, scale=1.3, seed=11)
    x.requires_grad_(True)
    offset.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: sample_nodes(a, b, 1), (x, offset))
    assert torch.autograd.gradcheck(lambda a, b: sample_nodes(a, b, 2), (x, offset))


def test_gradients_match_reference():
    x, offset = _inputs(2, 3, 4, 5, seed=5)
    w = torch.randn(2, 3, 9, 20, dtype=torch.float64)
    grads = []
    for fn in (sample_nodes, sample_nodes_reference):
        a = x.clone().requires_grad_(True)
        b = offset.clone().requires_grad_(True)
        (fn(a, b) * w).sum().backward()
        grads.append((a.grad, b.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=0)


def test_reduced_precision_keeps_float32_coordinates():
    x, offset = _inputs(1, 4, 56, 56, seed=2)
    ref = sample_nodes_reference(x, offset)
    out = sample_nodes(x.bfloat16(), offset.bfloat16())
    assert out.dtype == torch.bfloat16
    # the grid is built in float32: error is bf16 rounding of values/offsets, not of coordinates
    ref_rounded = sample_nodes_reference(x.bfloat16().double(), offset.bfloat16().double())
    torch.testing.assert_close(out.double(), ref_rounded, atol=5e-2, rtol=2e-2)
    assert ref.shape == out.shape


def test_torchscript():
    scripted = torch.jit.script(sample_nodes)
    x, offset = _inputs(1, 2, 4, 6)
    torch.testing.assert_close(scripted(x, offset, 2), sample_nodes(x, offset, 2), atol=0, rtol=0)


def test_fx_symbolic_trace_without_dtype_branch():
    """ torch.fx (torchvision's create_feature_extractor) traces through sample_nodes: no branch on a
    dtype; the traced graph keeps float64 sampling float64 and float32 / bfloat16 sampling float32. """
    class Sampler(torch.nn.Module):
        def forward(self, x, offset):
            return sample_nodes(x, offset, 2)

    traced = torch.fx.symbolic_trace(Sampler())
    x, offset = _inputs(1, 3, 5, 4)
    torch.testing.assert_close(traced(x, offset), sample_nodes_reference(x, offset, 2), atol=1e-12, rtol=0)
    out = traced(x.bfloat16(), offset.bfloat16())
    assert out.dtype == torch.bfloat16
