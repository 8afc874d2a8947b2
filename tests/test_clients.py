""" Real clients on every model this package registers, as users call them (no tracer kwargs, no flags).

torchvision's FX feature extraction, ``torch.jit.trace`` (with its check; saved and reloaded),
``torch.jit.script`` (every model and the DGMN layers), ``torch.compile(fullgraph=True)`` at
224 x 224 and an odd size, ``torch.export``. ONNX export is in ``tests/test_export.py``.
New registered models are covered automatically; models above ``BIG_PARAMS`` parameters run
in the slow run only.
"""
import io
import pkgutil
from typing import List

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dgmn_timm.models
from dgmn_timm.layers import DGMN, DGMNHead
from utils import randomise

BIG_PARAMS = 34_000_000
MODULES = sorted(m.name for m in pkgutil.iter_modules(dgmn_timm.models.__path__))


def _num_params(name: str) -> int:
    with torch.device('meta'):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def _all_models() -> List:
    return [pytest.param(n, marks=pytest.mark.slow) if _num_params(n) > BIG_PARAMS else n
            for n in sorted(timm.list_models(module=MODULES))]


MODELS = _all_models()


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise(timm.create_model(name, num_classes=7)).eval()


def _x(h: int = 64, w: int = 48, b: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


def test_models_found():
    names = [p if isinstance(p, str) else p.values[0] for p in MODELS]
    assert {'dgmn2_tiny', 'dgmn2_large', 'resnet50_dgmn_c5', 'resnext101_32x8d_dgmn_c5'} <= set(names)


@pytest.mark.parametrize('name', MODELS)
def test_torchvision_feature_extraction(name):
    model = _model(name)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert train_nodes and eval_nodes
    last = eval_nodes[-1]
    extractor = create_feature_extractor(model, return_nodes=[last]).eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)[last], model(x))


@pytest.mark.parametrize('name', MODELS)
def test_jit_trace_checked_saved_and_reloaded(name):
    model = _model(name)
    x = _x()
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=True)  # re-runs the trace and compares
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        loaded = torch.jit.load(buf)
        torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize('name', MODELS)
def test_jit_script(name):
    model = _model(name)
    scripted = torch.jit.script(model)
    x = _x(70, 45)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize('mode,fusion', [('full', 'sum'), ('DA', 'concat'), ('DA+DW', 'sum')])
def test_jit_script_dgmn_layers(mode, fusion):
    torch.manual_seed(0)
    layer = DGMN(16, rates=(1, 3), groups=4, mode=mode, fusion=fusion).eval()
    if layer.walk is not None:
        for conv in layer.walk:
            torch.nn.init.normal_(conv.weight, std=0.1)
    head = DGMNHead(16, 5, channels=8, rates=(1, 2), mode=mode, fusion=fusion).eval()
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))
        torch.testing.assert_close(torch.jit.script(head)(x), head(x))


def _compiled_matches_eager(name: str, sizes, backend: str = 'inductor'):
    model = _model(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for hw in sizes:
            x = _x(*hw, b=2)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def test_compile_fullgraph_capture_dgmn2_tiny():
    """ Dynamo captures the whole model in one graph (fullgraph=True raises on any graph break) at
    224 x 224 and at an odd size. The 'eager' backend runs the captured graph as is, which keeps
    this fast; the inductor runs are in the slow run. """
    _compiled_matches_eager('dgmn2_tiny', [(224, 224), (200, 136)], backend='eager')


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dgmn2_tiny', 'dgmn2_small', 'resnet50_dgmn_c5'])
def test_compile_fullgraph_inductor(name):
    _compiled_matches_eager(name, [(224, 224), (200, 136)])


def test_torch_export_dynamic_size():
    """ torch.export of the default model (the fused op, through its fake kernel), height and width symbolic. """
    model = _model('dgmn2_tiny')
    dynamic = torch.export.Dim.DYNAMIC
    exported = torch.export.export(model, (_x(64, 64),), dynamic_shapes={'x': {2: dynamic, 3: dynamic}})
    assert any('dgmn_timm.sampled_attention' in str(n.target) for n in exported.graph.nodes)
    with torch.no_grad():
        for hw in [(64, 64), (96, 64), (45, 70)]:
            x = _x(*hw)
            torch.testing.assert_close(exported.module()(x), model(x))
