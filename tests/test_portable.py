""" The portable sampled attention (``dgmn_timm.ops.sampled_attention_portable``: corner gathers and
batched products in plain ops) against the float64 reference: random fractional and out-of-range
offsets, non-square and 1-pixel maps, half precision, gradients, double backward, TorchScript, FX
and the ONNX graph it exports to. """
import pytest
import torch

from dgmn_timm.ops import sampled_attention_portable, sampled_attention_reference
from dgmn_timm.ops.portable import corner_rows


def _inputs(B, H, W, nh, hd, K, spread, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, H, W, 3, nh, hd, generator=g, dtype=dtype)
    # fractional offsets, some of them far outside the map
    offset = (torch.rand(B, H, W, nh, 2 * K, generator=g, dtype=dtype) * 2 - 1) * spread
    b = torch.randn(B, H, W, nh, K, generator=g, dtype=dtype) if bias else None
    return qkv, offset, b


SHAPES = [
    (2, 5, 7, 1, 8, 9, 3.),  # non-square
    (1, 7, 4, 3, 4, 9, 2.5),  # non-square, heads
    (1, 1, 1, 1, 4, 9, 2.),  # 1-pixel map
    (2, 1, 6, 2, 4, 9, 2.),  # 1-pixel-high map
    (1, 5, 1, 2, 4, 5, 2.),  # 1-pixel-wide map, another K
    (1, 4, 3, 2, 4, 9, 50.),  # mostly far outside the map
]


@pytest.mark.parametrize('B,H,W,nh,hd,K,spread', SHAPES)
@pytest.mark.parametrize('with_bias', [True, False])
def test_matches_the_float64_reference(B, H, W, nh, hd, K, spread, with_bias):
    qkv, offset, bias = _inputs(B, H, W, nh, hd, K, spread, bias=with_bias)
    scale = hd ** -0.5
    ref = sampled_attention_reference(qkv, offset, bias, scale)
    out64 = sampled_attention_portable(qkv, offset, bias, scale)
    assert out64.dtype == torch.float64 and out64.shape == (B, H, W, nh, hd)
    torch.testing.assert_close(out64, ref, rtol=1e-10, atol=1e-10)
    out32 = sampled_attention_portable(qkv.float(), offset.float(), None if bias is None else bias.float(), scale)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-4)


def test_integer_offsets_read_whole_pixels():
    """ Offsets on the pixel grid: every node is one pixel (weights 1 and 0), the edge corner of a
    node on the last row / column included. """
    qkv, _, bias = _inputs(1, 4, 5, 1, 4, 9, 0.)
    offset = torch.randint(-5, 6, (1, 4, 5, 1, 18)).double()
    ref = sampled_attention_reference(qkv, offset, bias, 0.5)
    torch.testing.assert_close(sampled_attention_portable(qkv, offset, bias, 0.5), ref, rtol=1e-10, atol=1e-10)


def test_corner_rows():
    """ The 4 corners of a node: rows of qkv's (batch, y, x, head) order, bilinear weights that sum to 1
    inside the map, zero weight (and a valid row) outside. """
    B, H, W, nh = 2, 3, 4, 2
    offset = torch.zeros(B, H, W, nh, 2)
    offset[1, 2, 1, 1] = torch.tensor([-0.25, 0.5])  # batch 1, pixel (2, 1), head 1 -> reads (1.75, 1.5)
    offset[0, 0, 0, 0] = torch.tensor([-3., 0.])  # outside the map
    index, weight = corner_rows(offset, B, H, W, nh)
    assert index.shape == weight.shape == (B, H, W, nh, 1, 4) and index.dtype == torch.int64
    rows = [((1 * H + y) * W + x) * nh + 1 for y, x in ((1, 1), (1, 2), (2, 1), (2, 2))]
    assert index[1, 2, 1, 1, 0].tolist() == rows
    torch.testing.assert_close(weight[1, 2, 1, 1, 0], torch.tensor([0.125, 0.125, 0.375, 0.375]))
    assert weight[0, 0, 0, 0, 0].abs().sum() == 0
    assert 0 <= index.min() and index.max() < B * H * W * nh


def test_half_precision_follows_float32():
    qkv, offset, bias = _inputs(1, 5, 6, 2, 8, 9, 2., dtype=torch.float32)
    ref = sampled_attention_portable(qkv, offset, bias, 0.35)
    for dtype in (torch.bfloat16, torch.float16):
        out = sampled_attention_portable(qkv.to(dtype), offset, bias, 0.35)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_gradients_match_the_reference():
    qkv, offset, bias = _inputs(1, 4, 5, 2, 3, 9, 2.5, seed=3)
    offset = offset + 1e-3  # off the pixel grid, where bilinear sampling has no derivative
    grad = torch.randn(1, 4, 5, 2, 3, dtype=torch.float64)
    a = [t.clone().requires_grad_() for t in (qkv, offset, bias)]
    b = [t.clone().requires_grad_() for t in (qkv, offset, bias)]
    ga = torch.autograd.grad((sampled_attention_portable(*a, 0.4) * grad).sum(), a)
    gb = torch.autograd.grad((sampled_attention_reference(*b, 0.4) * grad).sum(), b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-8)


def test_double_backward():
    """ Second derivatives, checked numerically (float64), on a non-square map with nodes outside it. """
    qkv, offset, bias = _inputs(1, 3, 4, 2, 3, 9, 2.5, seed=5)
    offset = offset + 1e-3
    args = [t.requires_grad_() for t in (qkv, offset, bias)]
    assert torch.autograd.gradgradcheck(lambda a, b, c: sampled_attention_portable(a, b, c, 0.5), args)


def test_dropout_in_training_only():
    qkv, offset, bias = _inputs(1, 4, 4, 1, 4, 9, 2., dtype=torch.float32)
    ref = sampled_attention_portable(qkv, offset, bias, 0.5)
    torch.testing.assert_close(sampled_attention_portable(qkv, offset, bias, 0.5, 0.5, False), ref)
    torch.manual_seed(0)
    assert not torch.allclose(sampled_attention_portable(qkv, offset, bias, 0.5, 0.5, True), ref)


def test_scriptable_and_fx_traceable():
    qkv, offset, bias = _inputs(2, 3, 5, 2, 4, 9, 2., dtype=torch.float32)
    ref = sampled_attention_portable(qkv, offset, bias, 0.5)
    scripted = torch.jit.script(sampled_attention_portable)
    torch.testing.assert_close(scripted(qkv, offset, bias, 0.5, 0., False), ref)

    class Attend(torch.nn.Module):
        def forward(self, qkv, offset, bias):
            return sampled_attention_portable(qkv, offset, bias, 0.5)

    traced = torch.fx.symbolic_trace(Attend())
    torch.testing.assert_close(traced(qkv, offset, bias), ref)
    qkv2, offset2, bias2 = _inputs(1, 4, 3, 2, 4, 9, 2., dtype=torch.float32, seed=1)  # another size
    torch.testing.assert_close(traced(qkv2, offset2, bias2), sampled_attention_portable(qkv2, offset2, bias2, 0.5))


def test_onnx_export_uses_standard_operators(tmp_path):
    """ The exported graph holds only default-domain operators (Gather and MatMul, no GridSample) and
    ONNX Runtime matches eager on another input size. """
    ort = pytest.importorskip('onnxruntime')
    import onnx

    class Attend(torch.nn.Module):
        def forward(self, qkv, offset, bias):
            return sampled_attention_portable(qkv, offset, bias, 0.5)

    qkv, offset, bias = _inputs(1, 5, 6, 2, 4, 9, 3., dtype=torch.float32)
    path = str(tmp_path / 'attend.onnx')
    H, W = torch.export.Dim('H', min=1, max=64), torch.export.Dim('W', min=1, max=64)
    torch.onnx.export(Attend().eval(), (qkv, offset, bias), path, dynamo=True,
                      dynamic_shapes={'qkv': {1: H, 2: W}, 'offset': {1: H, 2: W}, 'bias': {1: H, 2: W}})
    graph = onnx.load(path).graph
    ops = {n.op_type for n in graph.node}
    assert {'Gather', 'MatMul'} <= ops and 'GridSample' not in ops
    assert all(n.domain in ('', 'ai.onnx') for n in graph.node)
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    for seed, (h, w) in enumerate([(5, 6), (7, 3), (1, 1)]):
        q, o, b = _inputs(1, h, w, 2, 4, 9, 3., dtype=torch.float32, seed=seed)
        feed = dict(zip([i.name for i in sess.get_inputs()], (q.numpy(), o.numpy(), b.numpy())))
        out = torch.from_numpy(sess.run(None, feed)[0])
        torch.testing.assert_close(out, sampled_attention_portable(q, o, b, 0.5), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_benchmark_onnx_route(tmp_path):
    """ `python -m dgmn_timm.benchmark --onnx`: both models exported with exportable=True and timed in
    ONNX Runtime, with a ratio against the peer and the operator profile. """
    pytest.importorskip('onnxruntime')
    from utils import load_script
    out = tmp_path / 'onnx.json'
    result = load_script('benchmark').main([
        '--models', 'dgmn2_tiny,pvt_v2_b1', '--img-size', '64', '--batch-size', '1', '--modes', 'infer',
        '--iters', '1', '--warmup', '0', '--onnx-profile', '3', '--no-memory', '--no-progress', '--device', 'cpu',
        '--output', str(out)])
    rows = {(r['model'], r['mode']): r for r in result['rows']}
    assert rows[('pvt_v2_b1', 'onnx')]['ratio_vs_reference'] == 1.0
    assert rows[('dgmn2_tiny', 'onnx')]['ratio_vs_reference'] > 0
    assert 'Gather' in result['onnx_profile']['dgmn2_tiny'] and out.stat().st_size > 0
