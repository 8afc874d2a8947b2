""" Every bad weights file through every loading route of ours: the same exception type and the same message.

Routes: torch.hub.load(checkpoint_path=), dgmn_timm.load_weights, create_with_weights, the scripts' create_model,
the converter, detection's backbone_checkpoint= / pretrained_file=, and the command lines
`python -m dgmn_timm --checkpoint` and `scripts/finetune.py --checkpoint` (exit code 2, one `error:` line).
timm's own routes (checkpoint_path=, pretrained_cfg_overlay=dict(file=)) raise timm's errors, as for timm's models.
"""
import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import dgmn_timm
from dgmn_timm.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from dgmn_timm.weights.checkpoints import create_with_weights, load_weights
from dgmn_timm.weights.convert import convert_checkpoint
from dgmn_timm.tasks.detection import create_feature_backbone
from utils import to_released_layout
from utils import load_script

ROOT = Path(__file__).resolve().parents[1]


class NotAllowed:
    """ Unpickling this needs full (unsafe) unpickling. """


def _tiny_state_dict():
    torch.manual_seed(0)
    return timm.create_model('dgmn2_tiny').state_dict()


def _deit(path, state_dict, **extra):
    torch.save({'model': to_released_layout(state_dict), 'epoch': 3, 'args': argparse.Namespace(lr=1e-3), **extra},
               path)


# name -> (exception type, the specific part of the message)
EXPECTED = {
    'missing': (CheckpointNotFoundError, 'does not exist'),
    'empty': (CheckpointError, 'is empty (0 bytes)'),
    'truncated_pth': (CheckpointError, 'is truncated or corrupt'),
    'truncated_safetensors': (CheckpointError, 'is truncated or corrupt'),
    'text': (CheckpointError, 'is not a weights file'),
    'unsafe_pickle': (CheckpointError, 'would need full (unsafe) unpickling'),
    'other_variant': (CheckpointMismatchError, 'The weights are for dgmn2_small (blocks per stage (3, 4, 6, 3)) '
                                               'but the model is dgmn2_tiny (blocks per stage (2, 2, 2, 2))'),
    'wrong_shape': (CheckpointMismatchError, 'The weights do not fit dgmn2_tiny: Shape mismatches (1): '
                                             'stages.0.blocks.0.attn.rel_height: checkpoint (10, 64) vs model (64, 64)'),
    'other_architecture': (CheckpointMismatchError, 'holds weights for test_vit (named by its config.json) but the '
                                                    'model is dgmn2_tiny'),
}


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp('bad_files')
    tiny = _tiny_state_dict()
    files = {'missing': root / 'no_such_file.pth'}
    files['empty'] = root / 'empty.pth'
    files['empty'].write_bytes(b'')
    _deit(root / 'good.pth', tiny)
    data = (root / 'good.pth').read_bytes()
    files['truncated_pth'] = root / 'truncated.pth'
    files['truncated_pth'].write_bytes(data[:len(data) // 2])
    save_file(tiny, str(root / 'good.safetensors'))
    data = (root / 'good.safetensors').read_bytes()
    files['truncated_safetensors'] = root / 'truncated.safetensors'
    files['truncated_safetensors'].write_bytes(data[:len(data) // 3])
    files['text'] = root / 'notes.pth'
    files['text'].write_text('these are my notes, not weights\n')
    files['unsafe_pickle'] = root / 'unsafe.pth'
    _deit(files['unsafe_pickle'], tiny, extra=NotAllowed())
    with torch.device('meta'):
        small = timm.create_model('dgmn2_small')
    small = small.to_empty(device='cpu').state_dict()
    files['other_variant'] = root / 'dgmn2_small.pth'
    _deit(files['other_variant'], small)
    wrong = dict(tiny)
    wrong['stages.0.blocks.0.attn.rel_height'] = torch.zeros(10, 64)
    files['wrong_shape'] = root / 'wrong_shape.pth'
    _deit(files['wrong_shape'], wrong)
    files['other_architecture'] = root / 'test_vit.in1k'
    timm.models.save_for_hf(timm.create_model('test_vit'), files['other_architecture'], safe_serialization=True)
    assert json.loads((files['other_architecture'] / 'config.json').read_text())['architecture'] == 'test_vit'
    return files


def _torch_hub(path, tmp_path):
    torch.hub.load(str(ROOT), 'dgmn2_tiny', source='local', checkpoint_path=str(path))


def _load_weights(path, tmp_path):
    load_weights(timm.create_model('dgmn2_tiny'), path)


def _converter(path, tmp_path):
    convert_checkpoint(path, 'dgmn2_tiny', tmp_path / 'out', check_size=32, verify=False)
    assert not (tmp_path / 'out').exists()


def _create_with_weights(path, tmp_path):
    create_with_weights('dgmn2_tiny', path)


def _scripts(path, tmp_path):
    from dgmn_timm.tools.engine import create_model
    create_model('dgmn2_tiny', checkpoint=str(path), num_classes=0)


def _detection(path, tmp_path):
    create_feature_backbone('dgmn2_tiny', backbone_checkpoint=path)


def _detection_pretrained_file(path, tmp_path):
    create_feature_backbone('dgmn2_tiny', pretrained_file=path)


ROUTES = dict(torch_hub=_torch_hub, load_weights=_load_weights, create_with_weights=_create_with_weights,
              scripts=_scripts, converter=_converter, detection=_detection,
              detection_pretrained_file=_detection_pretrained_file)


@pytest.mark.parametrize('route', list(ROUTES))
@pytest.mark.parametrize('name', list(EXPECTED))
def test_bad_file_route(bad_files, name, route, tmp_path):
    path = bad_files[name]
    error_type, specific = EXPECTED[name]
    with pytest.raises(CheckpointError) as e:
        ROUTES[route](path, tmp_path)
    assert type(e.value) is error_type
    assert str(e.value) == _message(path), route


@functools.lru_cache(maxsize=None)
def _message(path):
    """ What load_weights says about ``path``: every route must say exactly this. """
    with pytest.raises(CheckpointError) as e:
        load_weights(timm.create_model('dgmn2_tiny'), path)
    msg = str(e.value)
    assert str(path) in msg and '\n' not in msg
    return msg


@pytest.mark.parametrize('name', list(EXPECTED))
def test_message_is_specific(bad_files, name):
    assert EXPECTED[name][1] in _message(bad_files[name])


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    from dgmn_timm.tools.data import write_digits_imagefolder
    root = str(tmp_path_factory.mktemp('digits'))
    write_digits_imagefolder(root, img_size=32, per_class=2, classes=[0, 1])
    return root


def _cli_args(script, path, digits, tmp_path):
    if script == 'quickstart':
        return ['--checkpoint', str(path)]
    if script == 'convert':
        return [str(path), '--model', 'dgmn2_tiny', '--output-dir', str(tmp_path / 'run'), '--check-size', '32']
    return ['--data-dir', digits, '--output-dir', str(tmp_path / 'run'), '--checkpoint', str(path), '--epochs', '1',
            '--batch-size', '2', '--workers', '0', '--no-progress', '--threads', '1']


@pytest.mark.parametrize('script', ['quickstart', 'finetune', 'convert'])
@pytest.mark.parametrize('name', list(EXPECTED))
def test_bad_file_command_line(bad_files, digits, name, script, tmp_path, capsys):
    """ The commands' own entry (`python -m dgmn_timm`, `scripts/finetune.py`, `python -m dgmn_timm.convert`),
    in this process. """
    from dgmn_timm.weights.convert import main as convert_main
    from dgmn_timm.tools.cli import run_cli
    path = bad_files[name]
    capsys.readouterr()
    if script == 'convert':
        rc = convert_main(_cli_args(script, path, digits, tmp_path))
    else:
        main = importlib.import_module('dgmn_timm.__main__').main if script == 'quickstart' else \
            load_script('finetune').main
        rc = run_cli(main, _cli_args(script, path, digits, tmp_path))
    assert rc == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith('error:')] == [f'error: {_message(path)}']
    assert not (tmp_path / 'run').exists() or not any((tmp_path / 'run').iterdir())


def _subprocess(script, path, digits, tmp_path):
    cmd = [sys.executable, '-m', 'dgmn_timm'] if script == 'quickstart' else [sys.executable, str(ROOT / 'scripts' / 'finetune.py')]
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    return subprocess.run(cmd + _cli_args(script, path, digits, tmp_path), capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(tmp_path))


# by default one file per command (a fresh process imports torch: seconds each); all of them with -m slow
_SUBPROCESS_CASES = [
    pytest.param(script, name, marks=() if (script, name) in (('quickstart', 'truncated_pth'), ('finetune', 'other_variant'))
                 else pytest.mark.slow, id=f'{name}-{script}')
    for script in ('quickstart', 'finetune') for name in EXPECTED]


@pytest.mark.parametrize('script, name', _SUBPROCESS_CASES)
def test_bad_file_subprocess(bad_files, digits, name, script, tmp_path):
    """ The commands as users run them: exit code 2 and the message on one `error:` line. """
    proc = _subprocess(script, bad_files[name], digits, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert errors == [f'error: {_message(bad_files[name])}'], proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_error_classes_where_the_readme_names_them():
    from dgmn_timm.weights import hub
    assert dgmn_timm.CheckpointError is CheckpointError and dgmn_timm.load_weights is load_weights
    assert dgmn_timm.CheckpointMismatchError is CheckpointMismatchError
    assert dgmn_timm.CheckpointNotFoundError is CheckpointNotFoundError
    assert not hasattr(hub, 'PretrainedWeightsError') and not hasattr(hub, 'PretrainedWeightsNotFoundError')
    assert issubclass(CheckpointNotFoundError, FileNotFoundError) and issubclass(CheckpointMismatchError, RuntimeError)
