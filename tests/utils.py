""" Helpers shared by the test modules (importable as ``utils``: pytest puts tests/ on sys.path). """
import importlib
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn

from dgmn_timm.layers import DGMN
from dgmn_timm.models.dgmn2 import DynamicGraphAttention

ROOT = Path(__file__).resolve().parents[1]
TOOL_MODULES = {'convert': 'dgmn_timm.weights.convert', 'push_to_hub': 'dgmn_timm.weights.hub'}


def load_script(name: str) -> ModuleType:
    """ The module behind the command ``python -m dgmn_timm.<name>`` (``scripts/<name>.py`` in a checkout). """
    return importlib.import_module(TOOL_MODULES.get(name, f'dgmn_timm.tools.{name}'))


def walk_parameters(model: nn.Module) -> List[nn.Parameter]:
    """ The parameters that predict walks: DGMN2's ``attn.walk`` Linear and DGMN's ``walk`` convs. """
    params = []
    for m in model.modules():
        if isinstance(m, DynamicGraphAttention):
            params += [m.walk.weight, m.walk.bias]
        elif isinstance(m, DGMN) and m.walk is not None:
            params += [conv.weight for conv in m.walk]
    return params


def randomise(model: nn.Module, seed: int = 2, walk_std: float = 0.3) -> nn.Module:
    """ Non-trivial walks and BatchNorm statistics, so that tests exercise sampling and normalisation.

    Walks start at zero in a fresh model (every node on a whole pixel); here they become random
    fractional displacements of about ``walk_std`` x the input's scale, and every parameter named
    ``walk`` is checked to be non-zero afterwards, so no test runs with zero walks unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in walk_parameters(model):
            # a conv's walks (fan-in C x 9) about as large as those of DGMN2's Linear (fan-in 64)
            std = walk_std * (64 / p[0].numel()) ** 0.5 if p.dim() == 4 else walk_std
            p.copy_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    zero = [n for n, p in model.named_parameters() if re.search(r'(^|\.)walk\.', n) and not p.abs().sum() > 0]
    assert not zero, f'walks left at zero: {zero}'
    return model


# the authors' attention parameter names and ours
_RELEASED_ATTN = (('.attn.conv_offset.', '.attn.walk.'), ('.attn.pos_emb.rel_height', '.attn.rel_height'),
                  ('.attn.pos_emb.rel_width', '.attn.rel_width'))


def to_released_layout(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """ A DGMN2 state dict in the authors' released key layout (docs/ARCHITECTURE.md), the inverse of
    ``dgmn_timm.models.dgmn2.checkpoint_filter_fn``: fixtures for the loaders and the converter. """
    out = {}
    for k, v in state_dict.items():
        if k.startswith('stem.'):
            k = 'patch_embed1.' + k[len('stem.'):]
        k = re.sub(r'^stages\.(\d+)\.downsample\.', lambda m: f'patch_embed{int(m.group(1)) + 1}.', k)
        k = re.sub(r'^stages\.(\d+)\.blocks\.(\d+)\.', lambda m: f'block{int(m.group(1)) + 1}.{m.group(2)}.', k)
        for released, ours in _RELEASED_ATTN:
            k = k.replace(ours, released)
        out[k] = v
    return out
