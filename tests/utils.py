""" Helpers shared by the test modules (importable as ``utils``: pytest puts tests/ on sys.path). """
import importlib
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
TOOL_MODULES = {'convert_official': 'dgmn_timm.weights.convert', 'push_to_hub': 'dgmn_timm.weights.hub'}


def load_script(name: str) -> ModuleType:
    """ The module behind the command ``python -m dgmn_timm.<name>`` (``scripts/<name>.py`` in a checkout). """
    return importlib.import_module(TOOL_MODULES.get(name, f'dgmn_timm.tools.{name}'))


def randomise(model: nn.Module, seed: int = 2, walk_std: float = 0.3) -> nn.Module:
    """ Non-trivial walks and BatchNorm statistics, so that tests exercise sampling and normalisation. """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if 'attn.offset' in name:
                p.copy_(torch.randn(p.shape, generator=g) * walk_std)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
