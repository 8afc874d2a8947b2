""" timm's own ``tests/test_models.py`` on every model this package registers.

The test file is taken at test time from the source distribution of the installed timm
(``pip download --no-binary :all: --no-deps timm==<version>``, cached per version in the
temporary directory, or in ``$DGMN_TIMM_TIMM_TESTS`` when set) and changed in two places only:
``import dgmn_timm`` after ``import timm`` (which registers the models), and this package's
model modules added to ``FEAT_INTER_FILTERS``. Nothing is added to its exclude lists; the run
is restricted to this package's models with ``-k``. It runs as timm's own CI runs it
(``GITHUB_ACTIONS`` set), which leaves out the two tests that download pretrained weights from
the Hugging Face Hub (tests have no network). If the source distribution cannot be
downloaded, the tests skip.

Models above ``BIG_PARAMS`` parameters (DGMN2-Medium / Large, the 101-layer ResNets) run in
the slow run only.
"""
import os
import pkgutil
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import List

import pytest
import timm
import torch

import dgmn_timm.models

BIG_PARAMS = 34_000_000
MODULES = sorted(m.name for m in pkgutil.iter_modules(dgmn_timm.models.__path__))


def _models() -> List[str]:
    return sorted(timm.list_models(module=MODULES))


def _num_params(name: str) -> int:
    with torch.device('meta'):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def _patch(source: str) -> str:
    """ The two allowed changes; each must apply exactly once, so a changed timm file fails loudly. """
    anchor = '\nimport timm\n'
    filters = '\nFEAT_INTER_FILTERS = [\n'
    assert source.count(anchor) == 1 and source.count(filters) == 1, 'timm test_models.py changed shape'
    source = source.replace(anchor, anchor + 'import dgmn_timm  # registers the models under test\n')
    ours = ''.join(f"'{m}', " for m in MODULES)
    return source.replace(filters, filters + '    ' + ours + '\n')


def _timm_test_file() -> Path:
    version = timm.__version__
    root = Path(os.environ.get('DGMN_TIMM_TIMM_TESTS') or Path(tempfile.gettempdir()) / 'dgmn_timm_timm_tests')
    target = root / version / 'test_models.py'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, '-m', 'pip', 'download', '--no-binary', ':all:', '--no-deps', '--quiet',
               f'timm=={version}', '-d', tmp]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f'pip download of the timm {version} source distribution timed out (no network?)')
        sdists = list(Path(tmp).glob('timm-*.tar.gz'))
        if r.returncode != 0 or not sdists:
            pytest.skip(f'could not download the timm {version} source distribution (no network?): '
                        + (r.stderr or r.stdout).strip()[-500:])
        with tarfile.open(sdists[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith('/tests/test_models.py'))
            source = tar.extractfile(member).read().decode()
    partial = target.with_suffix('.tmp')
    partial.write_text(_patch(source))
    os.replace(partial, target)  # atomic: a concurrent or interrupted run never sees half a file
    return target


def _run_timm_tests(names: List[str], tmp_path: Path):
    test_file = _timm_test_file()
    ini = tmp_path / 'pytest.ini'
    ini.write_text('[pytest]\n')  # not this repository's settings (its addopts, markers)
    report = tmp_path / 'report.xml'
    cmd = [sys.executable, '-m', 'pytest', str(test_file), '-q', '-p', 'no:cacheprovider', '-c', str(ini),
           '--rootdir', str(test_file.parent), '-W', 'ignore', f'--junitxml={report}', '-k', ' or '.join(names)]
    # GITHUB_ACTIONS: timm's CI mode, no tests that download pretrained weights
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', GITHUB_ACTIONS='true')
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=3600)
    out = r.stdout[-6000:] + r.stderr[-2000:]
    assert r.returncode == 0, out
    cases = ET.parse(report).getroot().iter('testcase')
    ran = [c.get('name') for c in cases if not list(c)]  # passed: no failure / error / skipped child
    for name in names:
        passed = [c for c in ran if re.search(rf'[\[-]{re.escape(name)}[.\]-]', c)]
        # forward, backward, default cfgs, torchscript, features, intermediates (x2), FX forward / backward / script
        assert len(passed) >= 8, f'{name}: only {passed} passed\n{out}'


def _split():
    small, big = [], []
    for name in _models():
        (big if _num_params(name) > BIG_PARAMS else small).append(name)
    return small, big


def test_registered_models_found():
    names = _models()
    assert {'dgmn2_tiny', 'resnet50_dgmn_c5'} <= set(names), names


def test_timm_test_models_small_variants(tmp_path):
    small, _ = _split()
    _run_timm_tests(small, tmp_path)


@pytest.mark.slow
def test_timm_test_models_big_variants(tmp_path):
    _, big = _split()
    _run_timm_tests(big, tmp_path)
