""" Pretrained weights on the Hub: converter, hub format, offline loading, torch.hub.

Everything runs offline: a fake "released" checkpoint is written from a randomly initialised
dgmn2_tiny re-keyed into the authors' layout (docs/ARCHITECTURE.md, "Released checkpoint layout"), converted, and loaded back
through every route, always against a temporary Hugging Face cache with HF_HUB_OFFLINE=1. timm's routes
(pretrained tags, ``hf-hub:``, ``local-dir:``) raise timm's and huggingface_hub's errors; ours
(``hub.pretrained_file``, torch.hub, the scripts' ``create_model``) raise one ``CheckpointError`` line.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import timm

import dgmn_timm  # noqa: F401  (registers the models)
import dgmn_timm.weights.hub as hub
from dgmn_timm.errors import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError
from dgmn_timm.weights.checkpoints import create_with_weights, load_weights, read_checkpoint
from dgmn_timm.weights.convert import convert_checkpoint
from utils import to_released_layout
from utils import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_ID = 'dgmn-timm/dgmn2_tiny.in1k'
SIZE = 64


# ---------------------------------------------------------------------------------------------
# The authors' layout (tests/test_checkpoints.py checks to_released_layout against the spec's key names)


def to_authors_layout(state_dict):
    """ Our key names -> the released key names (docs/ARCHITECTURE.md, "Released checkpoint layout"), as independent copies. """
    return {k: v.clone() for k, v in to_released_layout(state_dict).items()}


def randomized_tiny():
    """ dgmn2_tiny with every tensor random (walks, BN statistics and position tables included).

    Built on the meta device and filled by assignment: no time spent on an initialisation that is
    replaced anyway.
    """
    g = torch.Generator().manual_seed(0)
    with torch.device('meta'):
        model = timm.create_model('dgmn2_tiny')
    state_dict = {}
    for k, v in model.state_dict().items():
        if k.endswith('num_batches_tracked'):
            t = torch.tensor(1234)
        elif k.endswith('running_var'):
            t = torch.rand(v.shape, generator=g) + 0.5
        elif v.ndim >= 2:  # weights (incl. the walk predictor and position tables), fan-in scaled
            t = torch.randn(v.shape, generator=g) * v[0].numel() ** -0.5
        elif k.endswith('.weight'):  # norm scales
            t = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # biases, running means
            t = 0.1 * torch.randn(v.shape, generator=g)
        state_dict[k] = t
    model.load_state_dict(state_dict, assign=True)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    return model.eval()


class NotAllowed:
    """ An object that must not be unpickled by the converter. """


@pytest.fixture(scope='module', autouse=True)
def offline_hub(tmp_path_factory):
    """ Every test of this module sees an empty temporary HF cache and offline mode.

    huggingface_hub resolves HF_HUB_CACHE / HF_HUB_OFFLINE once, at import, into
    huggingface_hub.constants (read on every download), so the constants are patched as well as the
    environment (which subprocesses read).
    """
    from huggingface_hub import constants
    cache = tmp_path_factory.mktemp('hf_home') / 'hub'
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('HF_HUB_CACHE', str(cache))
        mp.setenv('HF_HUB_OFFLINE', '1')
        mp.setattr(constants, 'HF_HUB_CACHE', str(cache))
        mp.setattr(constants, 'HF_HUB_OFFLINE', True)
        yield cache


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """ A fresh, empty cache for one test. """
    from huggingface_hub import constants
    cache = tmp_path / 'hf_cache'
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    return cache


@pytest.fixture(scope='module')
def released(tmp_path_factory):
    """ Fake released checkpoints: DeiT-style classification and 'backbone.'-prefixed detection. """
    root = tmp_path_factory.mktemp('released')
    model = randomized_tiny()
    ours = model.state_dict()
    authors = to_authors_layout(ours)
    assert 'patch_embed1.conv1.weight' in authors and 'block3.1.attn.pos_emb.rel_width' in authors
    assert authors['block1.0.attn.pos_emb.rel_height'].shape == (64, 64)

    cls_path = root / 'dgmn2_tiny.pth'
    torch.save({
        'model': authors,
        'optimizer': {'state': {0: {'step': torch.tensor(10.), 'exp_avg': torch.zeros(3)}},
                      'param_groups': [{'lr': 1e-3, 'weight_decay': 0.05, 'params': [0]}]},
        'lr_scheduler': {'last_epoch': 299},
        'epoch': 299,
        'scaler': {'scale': 65536.0},
        'args': argparse.Namespace(model='dgmn2_tiny', input_size=224, drop_path=0.1, epochs=300, lr=1e-3),
    }, cls_path)

    det_path = root / 'retinanet_dgmn2_tiny.pth'
    det = {'backbone.' + k: v for k, v in authors.items() if not k.startswith('head.')}
    det['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 64, 1, 1)
    det['bbox_head.retina_cls.weight'] = torch.randn(720, 256, 3, 3)
    torch.save({'meta': {'epoch': 12, 'mmdet_version': '2.x'}, 'state_dict': det}, det_path)

    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits, features = model(x), model.forward_features(x)
    return dict(model=model, cls=cls_path, det=det_path, x=x, logits=logits, features=features, root=root)


@pytest.fixture(scope='module')
def converted(released, tmp_path_factory):
    out = tmp_path_factory.mktemp('converted') / 'dgmn2_tiny.in1k'
    # the folder's reload check runs in test_converter_cli_to_cache, here the tests below do it
    return convert_checkpoint(released['cls'], 'dgmn2_tiny', out, check_size=SIZE, verify=False)


def run(model, x):
    with torch.inference_mode():
        return model.eval()(x)


# ---------------------------------------------------------------------------------------------
# Converter


def test_converter_reproduces_released_model(released, converted):
    assert converted.architecture == 'dgmn2_tiny' and converted.tag == 'in1k' and converted.num_classes == 1000
    assert converted.ignored_keys == []
    assert converted.repo_id == HUB_ID
    assert tuple(converted.check_output.shape) == (1, 1000)
    # the converted model is the model the fake release was written from, bit for bit
    torch.testing.assert_close(run(converted.model, released['x']), released['logits'], rtol=0, atol=0)
    for k, v in released['model'].state_dict().items():
        assert torch.equal(converted.model.state_dict()[k], v), k


def test_folder_layout(converted):
    from safetensors.torch import load_file
    folder = converted.output_dir
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['architecture'] == 'dgmn2_tiny'
    assert cfg['num_classes'] == 1000 and cfg['num_features'] == 512 and cfg['global_pool'] == 'avg'
    # transformers' TimmWrapper passes num_classes itself: model_args must not hold it
    assert cfg['model_args'] == {'in_chans': 3, 'global_pool': 'avg'}
    pcfg = cfg['pretrained_cfg']
    assert pcfg['tag'] == 'in1k' and pcfg['num_classes'] == 1000
    assert pcfg['input_size'] == [3, 224, 224] and pcfg['crop_pct'] == 0.875 and pcfg['interpolation'] == 'bicubic'
    assert pcfg['mean'] == [0.485, 0.456, 0.406] and pcfg['std'] == [0.229, 0.224, 0.225]
    assert pcfg['first_conv'] == 'stem.conv1' and pcfg['classifier'] == 'head'
    weights = load_file(str(folder / 'model.safetensors'))
    assert set(weights) == set(converted.model.state_dict())
    assert torch.equal(weights['stages.2.blocks.1.attn.walk.weight'],
                       converted.model.state_dict()['stages.2.blocks.1.attn.walk.weight'])


def test_model_card(converted):
    card = (converted.output_dir / 'README.md').read_text()
    front = card.split('---')[1]
    assert 'library_name: timm' in front and 'license: apache-2.0' in front and '- imagenet-1k' in front
    assert 'arXiv:2209.09760' in card and 'https://arxiv.org/abs/2209.09760' in card
    assert '78.7%' in card  # paper top-1
    assert 'paper: 12.1' in card and '12,101,464 parameters' in card  # paper and exact params
    assert 'GMACs: 2.3' in card
    assert 'Resize the shorter side to 256 (bicubic), center crop 224x224' in card
    usage = card[card.index('## Model Usage'):]
    assert usage.index('import dgmn_timm') < usage.index('timm.create_model')
    assert f"timm.create_model('hf-hub:{HUB_ID}', pretrained=True)" in card
    assert '@article{zhang2022dgmn2' in card
    assert 'dgmn2_tiny.pth' in card and 'epoch 299' in card  # provenance


def test_converter_cli_to_cache(released, hf_cache, tmp_path, capsys):
    """ The script: convert + --to-cache, then the pretrained tag loads offline from that cache. """
    out = tmp_path / 'dgmn2_tiny.in1k'
    rc = load_script('convert').main(
        [str(released['cls']), '--model', 'dgmn2_tiny.in1k', '--output-dir', str(out), '--to-cache',
         '--check-size', str(SIZE)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert 'num_classes=1000' in printed and HUB_ID in printed
    snapshots = list((hf_cache / 'models--dgmn-timm--dgmn2_tiny.in1k' / 'snapshots').iterdir())
    assert len(snapshots) == 1
    model = timm.create_model('dgmn2_tiny.in1k', pretrained=True)
    torch.testing.assert_close(run(model, released['x']), released['logits'], rtol=0, atol=0)
    # errors go to stderr with a non-zero exit status
    rc = load_script('convert').main([str(released['cls']), '--model', 'dgmn2_tiny', '--output-dir', str(out)])
    assert rc == 2 and 'not empty' in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['dgmn2_tiny', 'dgmn2_small', 'dgmn2_medium', 'dgmn2_large'])
def test_converter_all_variants_full_size(variant, tmp_path):
    """ Every variant converts at the default 224x224 check, with the folder reload check. """
    with torch.device('meta'):
        model = timm.create_model(variant)
    g = torch.Generator().manual_seed(0)
    state_dict = {
        k: torch.tensor(1) if k.endswith('num_batches_tracked') else
        torch.rand(v.shape, generator=g) + 0.5 if k.endswith('running_var') else
        torch.randn(v.shape, generator=g) * (v[0].numel() ** -0.5 if v.ndim >= 2 else 0.1)
        for k, v in model.state_dict().items()}
    model.load_state_dict(state_dict, assign=True)
    path = tmp_path / f'{variant}.pth'
    torch.save({'model': to_authors_layout(state_dict), 'epoch': 299, 'args': argparse.Namespace(model=variant)}, path)
    result = convert_checkpoint(path, variant, tmp_path / 'out')
    assert result.verified and result.repo_id == f'dgmn-timm/{variant}.in1k'
    torch.testing.assert_close(run(model, result.check_input), result.check_output, rtol=0, atol=0)
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert f"{hub.PAPER_METRICS[variant]['top1']}%" in card


@pytest.mark.slow
def test_converter_script_respects_hf_home(released, tmp_path):
    """ The converter as users run it (python -m dgmn_timm.convert): a new process, cache from HF_HOME only.

    (slow only because a fresh process imports torch and timm: about 5 s, far more on a loaded machine)
    """
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE')}
    env.update(HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1',
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get('PYTHONPATH', ''))
    out = tmp_path / 'dgmn2_tiny.in1k'
    proc = subprocess.run(
        [sys.executable, '-m', 'dgmn_timm.convert', str(released['cls']),
         '--model', 'dgmn2_tiny', '--output-dir', str(out), '--to-cache', '--check-size', '32'],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'the written folder reproduces it exactly' in proc.stdout
    refs = tmp_path / 'hf_home' / 'hub' / 'models--dgmn-timm--dgmn2_tiny.in1k' / 'refs' / 'main'
    snapshot = refs.parent.parent / 'snapshots' / refs.read_text()
    assert sorted(p.name for p in snapshot.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert (snapshot / 'model.safetensors').read_bytes() == (out / 'model.safetensors').read_bytes()


def test_converter_refuses_unsafe_pickle(released, tmp_path):
    path = tmp_path / 'evil.pth'
    ckpt = read_checkpoint(released['cls'])
    ckpt['extra'] = NotAllowed()
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match='Refusing to read'):
        convert_checkpoint(path, 'dgmn2_tiny', tmp_path / 'out', check_size=SIZE)
    assert not (tmp_path / 'out').exists()


def test_converter_truncated_checkpoint(released, tmp_path):
    path = tmp_path / 'dgmn2_tiny_truncated.pth'
    data = released['cls'].read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated') as e:
        convert_checkpoint(path, 'dgmn2_tiny', tmp_path / 'out', check_size=SIZE)
    assert str(path) in str(e.value)


def test_converter_untagged_name_and_tag(released, tmp_path):
    """ A tag that is not registered only names the folder (here: a backbone under its own id). """
    out = tmp_path / 'dgmn2_tiny.coco'
    result = convert_checkpoint(
        released['det'], 'dgmn2_tiny.coco', out, check_size=32, verify=False, to_cache=True,
        repo_id='someone/dgmn2_tiny.coco', cache_dir=tmp_path / 'cache')
    assert result.tag == 'coco' and result.num_classes == 0
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['tag'] == 'coco'
    assert (result.cache_path / 'model.safetensors').is_file()
    assert "'hf-hub:someone/dgmn2_tiny.coco'" in (out / 'README.md').read_text()


def test_converter_wrong_variant(released, tmp_path):
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(released['cls'], 'dgmn2_small', tmp_path / 'out', check_size=SIZE)
    assert 'dgmn2_small' in str(e.value) and 'dgmn2_tiny' in str(e.value)


def test_converter_detection_backbone(released, tmp_path):
    out = tmp_path / 'dgmn2_tiny.coco'
    result = convert_checkpoint(released['det'], 'dgmn2_tiny', out, check_size=SIZE, verify=False)
    assert result.num_classes == 0 and result.tag == 'backbone' and result.repo_id is None
    assert sorted({k.split('.')[0] for k in result.ignored_keys}) == ['bbox_head', 'neck']
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['num_classes'] == 0 and cfg['pretrained_cfg']['num_classes'] == 0
    card = (out / 'README.md').read_text()
    assert 'library_name: timm' in card and 'num_classes=0' in card and '78.7' not in card
    assert "timm.create_model('local-dir:dgmn2_tiny.coco', pretrained=True, features_only=True)" in card
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.num_classes == 0 and not any(k.startswith('head.') for k in model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model.eval().forward_features(released['x']), released['features'], rtol=0, atol=0)
    # a backbone never takes the ImageNet classifier's Hub id
    with pytest.raises(CheckpointError) as e:
        hub.place_in_cache(out, HUB_ID)
    assert 'num_classes=0' in str(e.value) and 'num_classes=1000' in str(e.value)


# ---------------------------------------------------------------------------------------------
# Loading the converted folder


def test_load_local_dir(converted, released):
    model = timm.create_model(f'local-dir:{converted.output_dir}', pretrained=True)
    assert model.pretrained_cfg['architecture'] == 'dgmn2_tiny'
    torch.testing.assert_close(run(model, released['x']), run(converted.model, released['x']), rtol=0, atol=0)
    # its weights file as timm's pretrained file, the folder itself on our routes
    for model in (timm.create_model('dgmn2_tiny', pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(converted.output_dir / 'model.safetensors'))),
                  create_with_weights('dgmn2_tiny', converted.output_dir)):
        torch.testing.assert_close(run(model, released['x']), released['logits'], rtol=0, atol=0)


def test_load_from_cache_offline(converted, released, hf_cache):
    from huggingface_hub import scan_cache_dir
    snapshot = hub.place_in_cache(converted.output_dir, HUB_ID)
    assert snapshot.parent.parent == hf_cache / 'models--dgmn-timm--dgmn2_tiny.in1k'
    # huggingface_hub itself recognises the cache entry
    repos = {r.repo_id: r for r in scan_cache_dir(hf_cache).repos}
    assert {f.file_name for f in repos[HUB_ID].revisions.__iter__().__next__().files} == {
        'README.md', 'config.json', 'model.safetensors'}
    expected = run(converted.model, released['x'])
    for name in ('dgmn2_tiny.in1k', 'dgmn2_tiny', f'hf-hub:{HUB_ID}'):
        model = timm.create_model(name, pretrained=True)
        torch.testing.assert_close(run(model, released['x']), expected, rtol=0, atol=0, msg=name)
    features = timm.create_model('dgmn2_tiny', pretrained=True, features_only=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(features(released['x'])[-1], released['features'], rtol=0, atol=0)


def test_load_from_explicit_cache_dir(converted, released, tmp_path):
    """ --cache-dir DIR pairs with timm.create_model(..., cache_dir=DIR) and hub.pretrained_file(..., cache_dir=DIR). """
    cache = tmp_path / 'my_models'
    hub.place_in_cache(converted.output_dir, HUB_ID, cache_dir=cache)
    with pytest.raises(CheckpointNotFoundError):  # not in the default cache
        hub.pretrained_file('dgmn2_tiny')
    with pytest.raises(Exception):  # timm's route, huggingface_hub's error
        timm.create_model('dgmn2_tiny', pretrained=True)
    for model in (timm.create_model('dgmn2_tiny', pretrained=True, cache_dir=cache),
                  create_with_weights('dgmn2_tiny', hub.pretrained_file('dgmn2_tiny', cache_dir=cache))):
        torch.testing.assert_close(run(model, released['x']), released['logits'], rtol=0, atol=0)


def test_load_overrides(converted, released, hf_cache):
    hub.place_in_cache(converted.output_dir, HUB_ID)
    x = released['x']
    ten = timm.create_model('dgmn2_tiny.in1k', pretrained=True, num_classes=10).eval()
    assert ten.head.weight.shape == (10, 512)
    with torch.inference_mode():
        torch.testing.assert_close(ten.forward_features(x), released['features'], rtol=0, atol=0)
    gray = timm.create_model(f'local-dir:{converted.output_dir}', pretrained=True, in_chans=1).eval()
    assert gray.stem.conv1.weight.shape[1] == 1
    # one channel summed from the three pretrained ones: a gray image acts like its RGB copy
    g = x[:, :1]
    torch.testing.assert_close(run(gray, g), run(converted.model, g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Errors


def _our_pretrained_routes(name):
    """ The routes of ours that take a pretrained tag: the scripts' --pretrained and torch.hub's pretrained=True. """
    from dgmn_timm.tools.engine import create_model
    return {
        'pretrained_file': lambda: hub.pretrained_file(name),
        'scripts': lambda: create_model(name, pretrained=True),
        'torch_hub': lambda: torch.hub.load(str(REPO_ROOT), name.split('.')[0], source='local', pretrained=True),
    }


def test_error_no_cache_offline(hf_cache):
    for name, hub_id in (('dgmn2_tiny', HUB_ID), ('dgmn2_small.in1k', 'dgmn-timm/dgmn2_small.in1k')):
        for route, build in _our_pretrained_routes(name).items():
            with pytest.raises(CheckpointNotFoundError) as e:
                build()
            msg = str(e.value)
            assert f"'{hub_id}'" in msg and str(hf_cache) in msg and 'HF_HUB_OFFLINE' in msg, route
            assert 'python -m dgmn_timm.convert' in msg and '--to-cache' in msg and '\n' not in msg
            assert isinstance(e.value, FileNotFoundError)
    # without pretrained nothing is looked up
    assert timm.create_model('dgmn2_tiny', pretrained=False).num_classes == 1000


def test_timm_routes_are_timms(hf_cache, tmp_path):
    """ timm's own routes raise timm's / huggingface_hub's errors for our models, as for timm's. """
    for name in ('dgmn2_tiny', f'hf-hub:{HUB_ID}', f'local-dir:{tmp_path / "nowhere"}'):
        with pytest.raises(Exception) as e:
            timm.create_model(name, pretrained=True)
        assert not isinstance(e.value, CheckpointError), name


def test_error_folder_without_weights(tmp_path):
    for route in (lambda: load_weights(timm.create_model('dgmn2_tiny'), tmp_path),
                  lambda: create_with_weights('dgmn2_tiny', tmp_path)):
        with pytest.raises(CheckpointNotFoundError, match='is a folder without a weights file') as e:
            route()
        assert str(tmp_path) in str(e.value) and 'python -m dgmn_timm.convert' in str(e.value)


def test_error_hf_hub_name_offline(hf_cache):
    """ An hf-hub: name of this package's weights, not cached, offline: the same error as the tag. """
    with pytest.raises(CheckpointNotFoundError) as e:
        hub.pretrained_file(f'hf-hub:{HUB_ID}')
    msg = str(e.value)
    assert f"'{HUB_ID}'" in msg and 'HF_HUB_OFFLINE is set' in msg and 'python -m dgmn_timm.convert' in msg


def test_error_resnet_dgmn_offline_names_timm_weights(hf_cache):
    """ The ResNet-DGMN models load timm's plain ResNet weights: the error names those, not a release to convert. """
    with pytest.raises(CheckpointNotFoundError) as e:
        hub.pretrained_file('resnet50_dgmn_c5')
    msg = str(e.value)
    assert "'timm/resnet50.a1_in1k'" in msg and "timm.create_model('resnet50.a1_in1k', pretrained=True)" in msg
    assert 'convert' not in msg and '.pth' not in msg


def test_unreachable_hub_fails_without_retries(hf_cache, monkeypatch):
    """ Online but the Hub cannot be reached: one attempt per file, not huggingface_hub's retries (~47 s). """
    import time
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', 'http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}')
    start = time.perf_counter()
    routes = list(_our_pretrained_routes('dgmn2_tiny').values()) + [lambda: hub.pretrained_file(f'hf-hub:{HUB_ID}')]
    for build in routes:
        with pytest.raises(CheckpointNotFoundError) as e:
            build()
        assert 'could not be reached' in str(e.value) and 'HF_HUB_OFFLINE=1' in str(e.value)
    # huggingface_hub's own retries sleep 1 + 2 + 4 + 8 + 8 s per file
    assert time.perf_counter() - start < 20


def test_transformers_loads_converted_folder(converted, released):
    """ A converted folder in Hugging Face transformers: TimmWrapper and the pipeline, ImageNet labels, timm's logits. """
    transformers = pytest.importorskip('transformers')
    import numpy as np
    from PIL import Image
    folder = str(converted.output_dir)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == 'TimmWrapperForImageClassification'
    assert model.config.num_labels == 1000 and model.config.id2label[0] == 'tench, Tinca tinca'
    x = released['x']
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values=x).logits, run(converted.model, x), rtol=0, atol=0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    pipe = transformers.pipeline('image-classification', model=folder)
    top = pipe(image, top_k=1)[0]
    timm_model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(timm_model))
    expected = run(timm_model, transform(image).unsqueeze(0)).softmax(-1)[0]
    assert top['label'] == model.config.id2label[int(expected.argmax())]
    assert top['score'] == pytest.approx(float(expected.max()), rel=1e-4)


def test_error_wrong_architecture_folder(converted, tmp_path, hf_cache):
    folder = tmp_path / 'mislabelled'
    shutil.copytree(converted.output_dir, folder)
    cfg = json.loads((folder / 'config.json').read_text())
    cfg['architecture'] = 'dgmn2_small'
    (folder / 'config.json').write_text(json.dumps(cfg))
    # config says small, weights are tiny: timm's route runs the model's filter, which names both
    with pytest.raises(RuntimeError) as e:
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert 'dgmn2_small' in str(e.value) and 'dgmn2_tiny' in str(e.value)
    # a tiny folder given to small, on our routes
    for route in (lambda: create_with_weights('dgmn2_small', converted.output_dir),
                  lambda: create_with_weights('dgmn2_small', folder)):
        with pytest.raises(CheckpointMismatchError) as e:
            route()
        assert 'dgmn2_small' in str(e.value) and 'dgmn2_tiny' in str(e.value)
    # a small-labelled folder never takes tiny's Hub id
    with pytest.raises(CheckpointError) as e:
        hub.place_in_cache(folder, HUB_ID)
    assert 'dgmn2_small' in str(e.value) and 'dgmn2_tiny' in str(e.value)


def test_error_corrupt_weights(converted, tmp_path, hf_cache):
    from dgmn_timm.tools.engine import create_model
    folder = tmp_path / 'truncated'
    shutil.copytree(converted.output_dir, folder)
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        create_with_weights('dgmn2_tiny', folder)
    assert 'truncated' in str(e.value) and str(folder) in str(e.value)
    hub.place_in_cache(folder, HUB_ID)
    with pytest.raises(CheckpointError) as e:
        create_model('dgmn2_tiny', pretrained=True)
    assert 'models--dgmn-timm--dgmn2_tiny.in1k' in str(e.value) and 'truncated' in str(e.value)


# ---------------------------------------------------------------------------------------------
# Conversion tells what the checkpoint is


def _finetune_run(root, classes=('cat', 'dog', 'fox'), size=64, metadata=True):
    """ A run folder as python -m dgmn_timm.finetune writes it: best.safetensors (with its metadata),
    args.json, summary.json. """
    from dgmn_timm.tools.engine import save_safetensors, write_json
    root.mkdir(parents=True)
    torch.manual_seed(0)
    model = timm.create_model('dgmn2_tiny', num_classes=len(classes)).eval()
    meta = dict(format='dgmn-timm finetune', model='dgmn2_tiny', num_classes=len(classes), classes=list(classes),
                epoch=2, input_size=[3, size, size], weights='model') if metadata else None
    save_safetensors(model.state_dict(), str(root / 'best.safetensors'), meta)
    write_json(dict(model='dgmn2_tiny', img_size=size, classes=list(classes), epochs=2), str(root / 'args.json'))
    write_json(dict(model='dgmn2_tiny', classes=list(classes), val_top1=66.67, val_top5=100.0, best_epoch=2,
                    input_size=[3, size, size]), str(root / 'summary.json'))
    return model


@pytest.mark.parametrize('metadata', [True, False])
def test_converter_takes_a_run_for_what_it_is(tmp_path, metadata):
    """ A 3-class fine-tuned run: its classes, input size, metrics and a fine-tuned tag; no paper ImageNet claims. """
    model = _finetune_run(tmp_path / 'run', metadata=metadata)
    out = tmp_path / 'dgmn2_tiny.animals'
    result = convert_checkpoint(tmp_path / 'run' / 'best.safetensors', 'dgmn2_tiny', out)
    assert result.verified and result.num_classes == 3 and result.tag == 'ft'
    assert not result.authors and result.repo_id is None and result.run['classes'] == ['cat', 'dog', 'fox']
    assert tuple(result.check_input.shape) == (1, 3, 64, 64)  # the run's input size
    torch.testing.assert_close(run(model, result.check_input), result.check_output, rtol=0, atol=0)
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['num_classes'] == 3 and cfg['label_names'] == ['cat', 'dog', 'fox']
    assert cfg['pretrained_cfg']['tag'] == 'ft' and cfg['pretrained_cfg']['input_size'] == [3, 64, 64]
    card = (out / 'README.md').read_text()
    for claim in ('ImageNet', 'imagenet', '78.7', 'paper authors', "authors' release", 'GMACs'):
        assert claim not in card, claim
    assert 'cat, dog, fox' in card and '66.67%' in card and 'Fine-tuned' in card
    if metadata:  # transformers reads the run's label names
        transformers = pytest.importorskip('transformers')
        config = transformers.AutoConfig.from_pretrained(str(out))
        assert config.id2label == {0: 'cat', 1: 'dog', 2: 'fox'}
    # no Hub id of the paper's weights to cache it under
    with pytest.raises(ValueError, match='no registered hf_hub_id'):
        convert_checkpoint(tmp_path / 'run' / 'best.safetensors', 'dgmn2_tiny', tmp_path / 'o2', to_cache=True)


def test_converter_refuses_a_run_whose_classes_do_not_fit(tmp_path):
    _finetune_run(tmp_path / 'run')
    args = json.loads((tmp_path / 'run' / 'args.json').read_text())
    torch.save(timm.create_model('dgmn2_tiny', num_classes=2).state_dict(), tmp_path / 'run' / 'other.pth')
    assert args['classes'] == ['cat', 'dog', 'fox']
    with pytest.raises(CheckpointError, match='2-class head but its run records 3 classes'):
        convert_checkpoint(tmp_path / 'run' / 'other.pth', 'dgmn2_tiny', tmp_path / 'out', check_size=32)
    assert not (tmp_path / 'out').exists()


def test_converter_unknown_imagenet_sized_file_makes_no_paper_claims(tmp_path):
    """ A 1000-class file in our layout (not the authors' release): converted, but no paper provenance. """
    torch.save(timm.create_model('dgmn2_tiny').state_dict(), tmp_path / 'mine.pth')
    result = convert_checkpoint(tmp_path / 'mine.pth', 'dgmn2_tiny', tmp_path / 'out', check_size=32, verify=False)
    assert not result.authors and result.tag == 'ft' and result.repo_id is None
    card = (tmp_path / 'out' / 'README.md').read_text()
    assert '78.7' not in card and 'paper authors' not in card and 'mine.pth' in card


# ---------------------------------------------------------------------------------------------
# Push


def test_push_dry_run(converted, capsys, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError('dry run must not touch the Hub')
    for name in ('create_repo', 'create_commit', 'upload_folder'):
        monkeypatch.setattr(huggingface_hub.HfApi, name, no_network)
    rc = load_script('push_to_hub').main([str(converted.output_dir), '--repo-id', HUB_ID, '--private', '--dry-run'])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith('[dry run] would upload 3 files') and f'https://huggingface.co/{HUB_ID}' in out
    assert 'private' in out
    listed = re.findall(r'^  (\S+)  ([\d,]+) bytes  sha256 ([0-9a-f]{64})$', out, flags=re.M)
    sizes = {name: int(size.replace(',', '')) for name, size, _ in listed}
    assert sizes == {p.name: p.stat().st_size for p in converted.output_dir.iterdir()}
    # another architecture's Hub id is refused
    rc = load_script('push_to_hub').main(
        [str(converted.output_dir), '--repo-id', 'dgmn-timm/dgmn2_small.in1k', '--dry-run'])
    assert rc == 2
    assert 'dgmn2_small' in capsys.readouterr().err


def test_push_uploads_exactly_the_listed_files(converted, monkeypatch, tmp_path):
    """ The upload path (huggingface_hub's create_repo + upload_folder), with the two Hub calls replaced by recorders. """
    import fnmatch
    import types
    import huggingface_hub
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls['create_repo'] = dict(repo_id=repo_id, **kwargs)
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kwargs):
        calls['upload_folder'] = kwargs
        return types.SimpleNamespace(commit_url='https://huggingface.co/x/commit/0')
    monkeypatch.setattr(huggingface_hub.HfApi, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, 'upload_folder', upload_folder)
    folder = tmp_path / 'folder'
    shutil.copytree(converted.output_dir, folder)
    (folder / '.hidden').write_text('not uploaded')
    printed = []
    hub.push_folder(folder, 'someone/dgmn2_tiny.test', private=True, verify=False, print_fn=printed.append)
    assert calls['create_repo'] == dict(repo_id='someone/dgmn2_tiny.test', repo_type='model', private=True,
                                        exist_ok=True)
    upload = calls['upload_folder']
    assert upload['repo_id'] == 'someone/dgmn2_tiny.test' and Path(upload['folder_path']) == folder
    patterns = upload['allow_patterns']
    uploaded = sorted(p.name for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    assert uploaded == ['README.md', 'config.json', 'model.safetensors']
    assert printed[-1].startswith('Uploaded:')


# ---------------------------------------------------------------------------------------------
# torch.hub


@pytest.fixture
def local_torch_hub(monkeypatch):
    """ torch.hub.list / help resolve a GitHub repo; point that resolution at this checkout (offline). """
    monkeypatch.setattr(torch.hub, '_get_cache_or_reload', lambda *args, **kwargs: str(REPO_ROOT))
    return 'dgmn-timm/dgmn-timm'


def test_torch_hub_list_and_help(local_torch_hub):
    entries = torch.hub.list(local_torch_hub)
    assert set(entries) == set(hub.package_models())
    assert {'dgmn2_tiny', 'dgmn2_small', 'dgmn2_medium', 'dgmn2_large'} <= set(entries)
    doc = torch.hub.help(local_torch_hub, 'dgmn2_tiny')
    assert doc.startswith('DGMN2-Tiny')
    for arg in ('pretrained:', 'checkpoint_path:', 'num_classes:', 'features_only:', '**kwargs:'):
        assert arg in doc
    assert HUB_ID in doc


def test_torch_hub_discovers_new_families(monkeypatch, local_torch_hub):
    """ A model registered later from any module of the package becomes an entry point. """
    import types
    from timm.models import _registry
    for attr in ('_model_entrypoints', '_model_to_module', '_model_pretrained_cfgs', '_model_default_cfgs'):
        monkeypatch.setattr(_registry, attr, dict(getattr(_registry, attr)))
    module = types.ModuleType('dgmn_timm.models.probe_family')
    monkeypatch.setitem(sys.modules, module.__name__, module)

    def dgmn_probe_model(pretrained=False, **kwargs):
        """ A probe. """
        return timm.create_model('dgmn2_tiny', pretrained=pretrained, **kwargs)
    dgmn_probe_model.__module__ = module.__name__
    timm.models.register_model(dgmn_probe_model)
    assert 'dgmn_probe_model' in torch.hub.list(local_torch_hub)
    assert 'resnet18' not in torch.hub.list(local_torch_hub)
    assert 'resnet18' in hub.package_models('timm.models')


def test_torch_hub_load(converted, released):
    model = torch.hub.load(str(REPO_ROOT), 'dgmn2_tiny', source='local', num_classes=5)
    assert model.num_classes == 5 and model.head.weight.shape == (5, 512)
    model = torch.hub.load(str(REPO_ROOT), 'dgmn2_tiny', source='local', checkpoint_path=str(converted.output_dir))
    torch.testing.assert_close(run(model, released['x']), released['logits'], rtol=0, atol=0)
    # the authors' .pth loads as it is, into a feature pyramid
    feats = torch.hub.load(
        str(REPO_ROOT), 'dgmn2_tiny', source='local', checkpoint_path=str(released['cls']), features_only=True)
    with torch.inference_mode():
        out = feats.eval()(released['x'])
    assert [f.shape[1] for f in out] == [64, 128, 320, 512]
    torch.testing.assert_close(out[-1], released['features'], rtol=0, atol=0)
    with pytest.raises(CheckpointNotFoundError, match=HUB_ID):
        torch.hub.load(str(REPO_ROOT), 'dgmn2_tiny', source='local', pretrained=True)
    with pytest.raises(CheckpointNotFoundError, match='does not exist'):
        torch.hub.load(str(REPO_ROOT), 'dgmn2_tiny', source='local', checkpoint_path='no/such/file.pth')
