""" The package's layout: folders are floors, imports only go down, no import cycle, and what was
removed stays removed (docs/ARCHITECTURE.md, "The package by floors"). Read from the source with ``ast``,
every import counted, those inside functions too. """
import ast
from pathlib import Path

import pytest

from utils import ROOT

PACKAGE = ROOT / 'dgmn_timm'
# the floor of each folder; a module imports from its own floor or lower ones
FLOORS = {'errors': 0, 'ops': 1, 'layers': 2, 'models': 3, 'weights': 4, 'tasks': 5, 'tools': 6}
ENTRY_FLOOR = 7  # dgmn_timm/<tool>.py, __main__.py, __init__.py


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path):
    """ The dgmn_timm modules ``path`` imports (absolute names), wherever the import statement stands. """
    name = _module_name(path)
    package = name if path.stem == '__init__' else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - (node.level - 1)]
                module = '.'.join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ''
            if module.split('.')[0] == 'dgmn_timm':
                # `from .ops import sampling` imports the submodule
                found.update(f'{module}.{a.name}' if _exists(f'{module}.{a.name}') else module for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split('.')[0] == 'dgmn_timm')
    return found


def _exists(module: str) -> bool:
    path = ROOT.joinpath(*module.split('.'))
    return path.with_suffix('.py').is_file() or (path / '__init__.py').is_file()


def _floor(module: str) -> int:
    parts = module.split('.')
    if len(parts) == 1:
        return ENTRY_FLOOR
    return FLOORS.get(parts[1], ENTRY_FLOOR)


def _graph():
    return {_module_name(p): {m for m in _imports(p) if m != _module_name(p)} for p in PACKAGE.rglob('*.py')}


def test_imports_only_go_down():
    upward = [(m, i) for m, deps in _graph().items() for i in deps
              if _floor(i) > _floor(m) and not (i == 'dgmn_timm' and _floor(m) == ENTRY_FLOOR)]
    assert not upward, upward


def test_no_import_cycle():
    graph = _graph()
    # a package imports its submodules through its __init__; a module importing its own package's
    # __init__ (e.g. `from . import x`) is the same edge, so count module -> module edges only
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + '.') and d != 'dgmn_timm'}
             for m, deps in graph.items()}
    state = {}
    cycle = []

    def visit(m, path):
        state[m] = 'open'
        for d in sorted(graph[m]):
            if state.get(d) == 'open':
                cycle.append(path[path.index(d):] + [d] if d in path else path + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycle, cycle


def test_the_floor_checks_can_fail():
    """ The scan sees an upward import: models/dgmn2.py imports from the weights floor in this fake. """
    src = ast.parse('from ..weights.checkpoints import read_state_dict\n')
    assert isinstance(src.body[0], ast.ImportFrom) and src.body[0].level == 2
    assert _floor('dgmn_timm.weights.checkpoints') > _floor('dgmn_timm.models.dgmn2')


@pytest.mark.parametrize('name', [
    'install_timm_loaders', 'RowBlockedMlp', 'chunked_mlp', 'PretrainedWeightsError', 'PretrainedWeightsNotFoundError',
    'train_utils', '_MODE_ALIASES', 'variant_name', 'offset_channels_last', 'add_alias', '_DeprecatedAlias',
    'to_released_layout', 'pos_transposed',
])
def test_removed_names_stay_removed(name):
    hits = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob('*.py') if name in p.read_text()]
    assert not hits, (name, hits)
