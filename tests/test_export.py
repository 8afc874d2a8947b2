""" torch.export with named size ranges, torch.compile and ONNX export.

torch.export: every model family exports on its default path with named height / width ranges
(``Dim('H', min=64, max=1024)``, as AOTInductor, ExecuTorch and TensorRT exporters ask), and the
exported program matches eager at sizes inside the range, odd ones included; so does the portable
path (``exportable=True``), which the ONNX and ahead-of-time routes record. torch.compile: no
graph breaks in the attention; compiled models give the eager features. ONNX export uses models
built for it (``create_model(..., exportable=True)`` / ``set_layer_config(exportable=True)``), whose
attention takes the portable path, as timm's own models do. """
import pytest
import torch
from torch.export import Dim

import timm
from timm.layers import set_layer_config

import dgmn_timm  # noqa: F401
from dgmn_timm.models.dgmn2 import Block, DynamicGraphAttention
from utils import randomise, walk_parameters


def _walking(model: torch.nn.Module, std: float = 0.3):
    """ Non-zero walks, so that sampling is really fractional. """
    torch.manual_seed(0)
    params = walk_parameters(model)
    assert params
    for p in params:
        torch.nn.init.normal_(p, std=std)
    return model


def _onnx_runtime():
    return pytest.importorskip('onnxruntime')


# ---------------------------------------------------------------- torch.export, named size ranges

SIZE_RANGE = ({2: Dim('H', min=64, max=1024), 3: Dim('W', min=64, max=1024)},)
SIZES = [(64, 64), (97, 131), (224, 224)]


def _check_export(model: torch.nn.Module):
    """ Export with named H / W ranges from a (2, 3, 96, 80) example; the program matches eager at SIZES. """
    exported = torch.export.export(model, (torch.randn(2, 3, 96, 80),), dynamic_shapes=SIZE_RANGE).module()
    g = torch.Generator().manual_seed(3)
    for h, w in SIZES:
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('name', [
    'dgmn2_tiny',
    pytest.param('resnet50_dgmn_c5', marks=pytest.mark.slow),
    pytest.param('resnet50_repgraph', marks=pytest.mark.slow),
])
def test_export_named_size_ranges(name):
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, num_classes=5)).eval()
    _check_export(model)


@pytest.mark.parametrize('name', ['dgmn2_tiny', pytest.param('resnet50_repgraph', marks=pytest.mark.slow)])
def test_export_named_size_ranges_exportable(name):
    """ The portable path (what ONNX and ahead-of-time routes record) exports with named ranges too. """
    torch.manual_seed(0)
    model = randomise(timm.create_model(name, num_classes=5, exportable=True)).eval()
    switches = [m.fused_attn for m in model.modules() if hasattr(m, 'fused_attn')]
    assert switches and not any(switches)
    _check_export(model)


# ---------------------------------------------------------------- torch.compile

def test_attention_compiles_without_graph_breaks():
    m = _walking(DynamicGraphAttention(32, 2, (6, 6)))
    x = torch.randn(2, 6, 5, 32, requires_grad=True)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x)
    ref = m(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_out = torch.autograd.grad(out.sum(), [x] + list(m.parameters()))
    g_ref = torch.autograd.grad(ref.sum(), [x] + list(m.parameters()))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_compiled_model_features_match_eager():
    model = _walking(timm.create_model('dgmn2_tiny', features_only=True)).eval()
    compiled = torch.compile(model)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        for a, b in zip(compiled(x), model(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- ONNX

class _Features(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return tuple(self.model(x))


def _check_onnx(path, model, sizes, n_out):
    ort = _onnx_runtime()
    import onnx
    graph = onnx.load(path)
    assert {'Gather', 'MatMul'} <= {n.op_type for n in graph.graph.node}  # the portable attention
    assert max(o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')) >= 16
    sess = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    for (b, h, w) in sizes:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model(x)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        outs = sess.run(None, {name: x.numpy()})
        assert len(outs) == n_out
        for o, r in zip(outs, ref):
            torch.testing.assert_close(torch.from_numpy(o), r, atol=1e-4, rtol=1e-4)


def _dynamo_export(model, path, size, min_side, max_side):
    """ The dynamo exporter (opset 18) on a (1, 3, size, size) example, height and width symbolic. """
    h = torch.export.Dim('h', min=min_side, max=max_side)
    w = torch.export.Dim('w', min=min_side, max=max_side)
    torch.onnx.export(model, (torch.randn(1, 3, size, size),), path, dynamo=True, opset_version=18,
                      dynamic_shapes={'x': {2: h, 3: w}})


def test_onnx_legacy_export_dynamic_size(tmp_path):
    _onnx_runtime()
    model = _Features(_walking(timm.create_model('dgmn2_tiny', features_only=True, exportable=True))).eval()
    path = str(tmp_path / 'dgmn2_tiny.onnx')
    torch.onnx.export(
        model, (torch.randn(1, 3, 64, 64),), path, dynamo=False, opset_version=17,
        input_names=['x'], dynamic_axes={'x': {0: 'batch', 2: 'height', 3: 'width'}})
    _check_onnx(path, model, [(1, 64, 64), (2, 96, 64), (1, 64, 160), (1, 70, 45)], 4)


def test_onnx_dynamo_export_block_dynamic_size(tmp_path):
    """ The dynamo exporter on one DGMN2 block with symbolic height and width. """
    _onnx_runtime()

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
            with set_layer_config(exportable=True):
                self.block = Block(32, 2, mlp_ratio=2., table_size=(8, 8))
            assert not self.block.attn.fused_attn

        def forward(self, x):
            return self.block(self.stem(x).permute(0, 2, 3, 1))

    model = _walking(Wrap()).eval()
    path = str(tmp_path / 'block.onnx')
    _dynamo_export(model, path, 8, 2, 512)
    _check_onnx(path, model, [(1, 8, 8), (1, 12, 8), (1, 5, 9)], 1)


@pytest.mark.slow
def test_onnx_dynamo_export_model_dynamic_size(tmp_path):
    _onnx_runtime()
    model = _walking(timm.create_model('dgmn2_tiny', num_classes=10, exportable=True)).eval()
    path = str(tmp_path / 'dgmn2_tiny.onnx')
    _dynamo_export(model, path, 64, 32, 2048)
    _check_onnx(path, model, [(1, 64, 64), (1, 96, 64), (1, 64, 128)], 1)
