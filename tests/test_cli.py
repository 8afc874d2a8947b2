""" One flag vocabulary for every tool, checked on the parsers themselves.

The convention the tests read: every tool is an entry module ``dgmn_timm/<tool>.py`` (``python -m
dgmn_timm.<tool>``, console script ``dgmn-<tool>``) whose ``CODE`` names the module that holds
``build_parser()`` and ``main()``; the quick start ``dgmn_timm/__main__.py`` holds both itself.
``ROLES`` says what each tool does; a role requires options (``REQUIRED``), and every option of the
shared vocabulary (``VOCABULARY``) means the same wherever it appears. A new tool needs a row in ``ROLES``.
"""
import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from utils import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

# what each tool does: 'writes' (an output flag and --overwrite), 'trains' (--resume, --seed),
# 'runs' (runs a model: --device, --threads), 'loads' (reads a data set in batches: --batch-size, --workers)
ROLES = {
    '__main__': {'runs'},
    'finetune': {'writes', 'trains', 'runs', 'loads'},
    'extract_features': {'writes', 'runs', 'loads'},
    'train_detection': {'writes', 'trains', 'runs', 'loads'},
    'train_segmentation': {'writes', 'trains', 'runs', 'loads'},
    'visualize_sampling': {'writes', 'runs'},
    'benchmark': {'writes', 'runs'},
    'count_macs': set(),  # counts on the CPU with timm's FLOP counter
    'convert': {'writes'},
    'push_to_hub': set(),  # uploads a folder, writes nothing here
    'data': {'writes'},
    'check': {'runs'},
}

REQUIRED = {
    'writes': [('--output-dir', '--output'), '--overwrite'],
    'trains': ['--resume', '--seed'],
    'runs': ['--device', '--threads'],
    'loads': ['--batch-size', '--workers'],
}

def _default_workers():
    from dgmn_timm.tools.cli import default_workers
    return default_workers()


def _is_flag(a):
    return isinstance(a, argparse._StoreTrueAction)


# the shared vocabulary: option -> (what it means, a check of its argparse action)
VOCABULARY = {
    '--output-dir': ('a run folder', lambda a, tool: a.dest == 'output_dir' and a.nargs is None and (
        a.required or a.default == f'output/{tool}')),
    '--output': ('one file', lambda a, tool: a.dest == 'output' and a.nargs is None and a.metavar in ('FILE', None)
                 and (a.default is None or str(a.default).startswith(f'output/{tool}/'))),
    '--overwrite': ('replace what is there', lambda a, tool: _is_flag(a)),
    '--resume': ('continue the run', lambda a, tool: a.dest == 'resume' and a.default in (None, False)),
    '--device': ('cpu, cuda, cuda:N or auto', lambda a, tool: a.default == 'auto'),
    '--threads': ('intra-op threads', lambda a, tool: a.type is int and a.default is None),
    '--workers': ('loader processes', lambda a, tool: a.type is int and a.default in (None, _default_workers())),
    '--seed': ('seed', lambda a, tool: a.type is int and a.default == 0),
    '--batch-size': ('images per step', lambda a, tool: a.type is int and a.nargs is None),
    '--img-size': ('input size', lambda a, tool: a.type is int),
    '--pretrained': ('pretrained weights [TAG]', lambda a, tool: a.nargs == '?' and a.default in (None, False)),
    '--checkpoint': ('a weights file', lambda a, tool: a.nargs is None and a.metavar == 'FILE'),
    '--amp': ('mixed precision', lambda a, tool: _is_flag(a)),
    '--no-progress': ('no progress bars', lambda a, tool: _is_flag(a)),
}

# other spellings of the vocabulary (hidden aliases included)
MISSPELLED = {
    '--batch': '--batch-size', '--bs': '--batch-size', '--size': '--img-size', '--image-size': '--img-size',
    '--input-size': '--img-size', '--json': '--output', '--out': '--output', '--out-dir': '--output-dir',
    '--outdir': '--output-dir', '--output-folder': '--output-dir', '--num-threads': '--threads',
    '--nthreads': '--threads', '--num-workers': '--workers', '--force': '--overwrite', '--ckpt': '--checkpoint',
    '--weights': '--checkpoint', '--resume-from': '--resume', '--random-seed': '--seed', '--cpu': '--device',
    '--gpu': '--device', '--fp16': '--amp', '--bf16': '--amp', '--no-tqdm': '--no-progress',
}


def tool_module_name(tool: str) -> str:
    """ The module with the tool's ``build_parser()``: the entry module's ``CODE`` (the quick start: itself). """
    entry = importlib.import_module(f'dgmn_timm.{tool}')
    return getattr(entry, 'CODE', entry.__name__)


def build_parser(tool: str) -> argparse.ArgumentParser:
    module = importlib.import_module(tool_module_name(tool))
    assert hasattr(module, 'build_parser'), f'{module.__name__} has no build_parser()'
    return module.build_parser()


def _options(parser):
    """ option string -> action, hidden ones included. """
    return {o: a for a in parser._actions for o in a.option_strings}


@pytest.mark.parametrize('tool', ROLES)
def test_vocabulary(tool):
    """ Every shared option is spelled and means the same; each role has its options. """
    options = _options(build_parser(tool))
    wrong = []
    for opt, action in options.items():
        if opt.replace('_', '-') != opt:
            wrong.append(f'{opt}: options are spelled with dashes')
        if opt in MISSPELLED:
            wrong.append(f'{opt}: spell it {MISSPELLED[opt]}')
        if opt in VOCABULARY and not VOCABULARY[opt][1](action, tool):
            wrong.append(f'{opt}: means {VOCABULARY[opt][0]}; got dest={action.dest} default={action.default!r} '
                         f'nargs={action.nargs} type={getattr(action.type, "__name__", action.type)}')
    for role in ROLES[tool]:
        for need in REQUIRED[role]:
            alternatives = need if isinstance(need, tuple) else (need,)
            if not any(o in options for o in alternatives):
                wrong.append(f'a tool that {role} needs {" or ".join(alternatives)}')
    assert not wrong, f'{tool}: ' + '; '.join(wrong)


def test_no_and_positive_switches_agree():
    """ ``--no-X`` in one tool and ``--X`` in another is the same switch spelled two ways (a tool with both,
    ``argparse.BooleanOptionalAction``, spells it both ways everywhere). """
    seen = {}
    for tool in ROLES:
        for opt in _options(build_parser(tool)):
            seen.setdefault(opt, set()).add(tool)
    clashes = [(o, seen[o], seen['--' + o[5:]]) for o in seen
               if o.startswith('--no-') and '--' + o[5:] in seen and seen[o] != seen['--' + o[5:]]]
    assert not clashes, clashes


@pytest.mark.parametrize('tool', ROLES)
def test_every_option_has_help_and_one_default(tool):
    parser = build_parser(tool)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.dest == 'help':
            continue
        text = formatter._get_help_string(action).replace('%(default)s', 'X')
        assert action.help and action.help.strip(), (tool, action.option_strings)
        assert text.count('default') <= 1, (tool, action.option_strings, text)


def test_every_entry_module_is_a_tool_with_a_console_script():
    """ ``dgmn_timm/<tool>.py`` <-> a row of ROLES <-> ``dgmn-<tool> = dgmn_timm.<tool>:cli`` in pyproject. """
    entries = {p.stem for p in (ROOT / 'dgmn_timm').glob('*.py') if p.stem not in ('__init__', 'errors')}
    missing = set(ROLES) - entries
    assert entries <= set(ROLES), f'tools without a row in ROLES: {sorted(entries - set(ROLES))}'
    assert not missing, f'tools without an entry module: {sorted(missing)}'
    scripts = read_console_scripts()
    for tool in sorted(entries):
        name = 'dgmn-timm' if tool == '__main__' else 'dgmn-' + tool.replace('_', '-')
        assert scripts.get(name) == f'dgmn_timm.{tool}:cli', (name, scripts.get(name))
        module = importlib.import_module(f'dgmn_timm.{tool}')
        assert callable(getattr(module, 'cli', None)), tool
    assert set(scripts.values()) == {f'dgmn_timm.{t}:cli' for t in entries}


def read_console_scripts() -> dict:
    text = (ROOT / 'pyproject.toml').read_text(encoding='utf-8')
    if tomllib is not None:
        return tomllib.loads(text)['project']['scripts']
    section = re.search(r'^\[project\.scripts\]\n(.*?)(?=^\[|\Z)', text, re.S | re.M).group(1)
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


def test_scripts_folder_holds_one_line_aliases():
    """ ``scripts/<tool>.py`` runs ``dgmn_timm.<tool>`` and nothing else (a checkout's alias). """
    for path in sorted((ROOT / 'scripts').glob('*.py')):
        src = path.read_text(encoding='utf-8')
        (target,) = re.findall(r"runpy\.run_module\('([\w.]+)', run_name='__main__', alter_sys=True\)", src)
        assert importlib.util.find_spec(target) is not None, (path.name, target)


# ------------------------------------------------------------------------------------------
# the tools travel with the package

_RUN_EVERY_TOOL = r'''
import sys, importlib.metadata as md
import dgmn_timm
assert dgmn_timm.__file__.startswith(sys.prefix), dgmn_timm.__file__  # the installed wheel, not a checkout
scripts = [e for e in md.distribution('dgmn-timm').entry_points if e.group == 'console_scripts']
for e in scripts:
    sys.argv = [e.name, '--help']
    try:
        e.load()()
    except SystemExit as x:
        assert x.code in (0, None), (e.name, x.code)
    else:
        raise AssertionError(f'{e.name} --help did not exit')
print('ran', ' '.join(sorted(e.name for e in scripts)))
'''


@pytest.mark.slow
def test_wheel_holds_the_license_and_every_tool(tmp_path):
    """ The built wheel, installed alone in a fresh virtualenv (torch and the rest reused from this
    environment through a .pth file), runs every tool's ``--help`` outside the checkout. """
    import os
    import subprocess
    import sys
    import sysconfig
    import zipfile
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    env['OMP_NUM_THREADS'] = '1'
    build = [sys.executable, '-m', 'pip', 'wheel', str(ROOT), '--no-deps', '-q', '-w', str(tmp_path / 'dist')]
    try:
        import setuptools
        if int(setuptools.__version__.split('.')[0]) >= 77:
            build.append('--no-build-isolation')  # else pip fetches setuptools>=77 from PyPI
    except ImportError:
        pass
    r = subprocess.run(build, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / 'dist').glob('dgmn_timm-*.whl')
    names = zipfile.ZipFile(wheel).namelist()
    license_file = next(n for n in names if n.endswith('.dist-info/licenses/LICENSE'))
    assert zipfile.ZipFile(wheel).read(license_file) == (ROOT / 'LICENSE').read_bytes()
    assert all(n.startswith('dgmn_timm') for n in names), [n for n in names if not n.startswith('dgmn_timm')]

    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=300)
    python = venv / 'bin' / 'python'
    site = Path(subprocess.run([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                               capture_output=True, text=True, check=True).stdout.strip())
    host = {sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']}
    (site / 'host_packages.pth').write_text('\n'.join(sorted(host)) + '\n')
    r = subprocess.run([sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-deps', '--no-index',
                        '-q', str(wheel)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    scripts = read_console_scripts()
    assert all((venv / 'bin' / name).exists() for name in scripts), sorted(os.listdir(venv / 'bin'))
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    r = subprocess.run([str(venv / 'bin' / 'dgmn-extract-features'), '--help'], capture_output=True, text=True,
                       env=env, cwd=str(outside), timeout=600)
    assert r.returncode == 0 and '--output FILE' in r.stdout, r.stderr[-3000:]
    r = subprocess.run([str(python), '-c', _RUN_EVERY_TOOL], capture_output=True, text=True, env=env,
                       cwd=str(outside), timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.splitlines()[-1].split()[1:] == sorted(scripts), r.stdout[-3000:]


def test_every_tool_has_its_checkout_alias():
    """ ``scripts/<tool>.py`` runs ``python -m dgmn_timm.<tool>``, one per tool, nothing else. """
    entries = {p.stem for p in (ROOT / 'dgmn_timm').glob('*.py') if p.stem not in ('__init__', 'errors', '__main__')}
    scripts = {p.stem for p in (ROOT / 'scripts').glob('*.py')}
    assert scripts == entries, (sorted(scripts ^ entries))
    for tool in sorted(scripts):
        assert f"runpy.run_module('dgmn_timm.{tool}', run_name='__main__'" in (ROOT / 'scripts' / f'{tool}.py').read_text()
