""" Loading the authors' released checkpoints (docs/ARCHITECTURE.md, "Released checkpoint layout") and our own.

timm's routes (``checkpoint_path=``, ``pretrained_cfg_overlay=dict(file=...)``) behave for our models as for
timm's own; ours (``load_weights``, ``create_with_weights``, the converter, the detection builders) read with
``dgmn_timm.weights.checkpoints``.
"""
import argparse
import json
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import dgmn_timm  # noqa: F401
from dgmn_timm.errors import CheckpointError, CheckpointMismatchError
from dgmn_timm.models.dgmn2 import checkpoint_filter_fn
from utils import to_released_layout
from dgmn_timm.weights.checkpoints import create_with_weights, load_state_dict_into, load_weights, read_state_dict
from utils import randomise


def _model(name='dgmn2_tiny', **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture(scope='module')
def source():
    """ A tiny model with non-trivial weights everywhere (walks, BN statistics). """
    return randomise(_model(), seed=3)


@pytest.fixture(scope='module')
def image():
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(4))


def _released(model):
    return to_released_layout(model.state_dict())


def _deit_file(path, state_dict):
    torch.save({
        'model': state_dict,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3}]},
        'lr_scheduler': {'last_epoch': 299},
        'epoch': 299,
        'scaler': {'scale': 65536.0},
        'args': argparse.Namespace(model='dgmn2_tiny', lr=1e-3, drop_path=0.1),
    }, path)
    return str(path)


def test_released_key_names(source):
    keys = set(_released(source))
    for k in ('patch_embed1.conv1.weight', 'patch_embed1.norm3.running_var', 'patch_embed2.conv.weight',
              'patch_embed4.norm.num_batches_tracked', 'block1.0.attn.qkv.weight', 'block1.1.attn.conv_offset.bias',
              'block3.1.attn.pos_emb.rel_height', 'block4.0.mlp.fc2.weight', 'head.weight'):
        assert k in keys, k
    sd = _released(source)
    assert sd['block1.0.attn.conv_offset.weight'].shape == (18, 64)
    assert sd['block2.0.attn.conv_offset.weight'].shape == (18, 64)  # head dim 128 / 2
    assert sd['block1.0.attn.pos_emb.rel_height'].shape == (64, 64)
    assert sd['block2.0.attn.pos_emb.rel_width'].shape == (36, 64)
    assert sd['block3.0.attn.pos_emb.rel_width'].shape == (22, 64)
    assert sd['block4.0.attn.pos_emb.rel_height'].shape == (15, 64)
    assert sd['block1.0.attn.qkv.weight'].shape == (192, 64)


def test_released_layout_round_trip(source, image):
    sd = _released(source)
    assert checkpoint_filter_fn(sd).keys() == source.state_dict().keys()
    model = _model()
    model.load_state_dict(checkpoint_filter_fn(sd, model))  # strict
    for k, v in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image), atol=0, rtol=0)


def test_deit_file_through_pretrained_file(source, image, tmp_path):
    path = _deit_file(tmp_path / 'dgmn2_tiny.pth', _released(source))
    model = timm.create_model('dgmn2_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image), atol=0, rtol=0)


def test_deit_file_through_our_routes(source, image, tmp_path):
    path = _deit_file(tmp_path / 'dgmn2_tiny.pth', _released(source))
    loaded = _model()
    load_weights(loaded, path)
    for model in (loaded, create_with_weights('dgmn2_tiny', path)):
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(image), source(image), atol=0, rtol=0)


def test_checkpoint_path_takes_timm_format(source, image, tmp_path):
    """ timm's checkpoint_path= takes our key layout, as for every timm model (the authors' files go through
    pretrained_cfg_overlay=dict(file=...), where timm runs our filter, or through the converter). """
    torch.save({'state_dict': source.state_dict(), 'epoch': 3}, tmp_path / 'ours.pth')
    model = timm.create_model('dgmn2_tiny', checkpoint_path=str(tmp_path / 'ours.pth')).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(image), source(image), atol=0, rtol=0)


def test_unsafe_pickle_refused_on_our_routes(source, tmp_path, capsys):
    """ A pickle that needs anything beyond tensors and argparse.Namespace is refused, never executed. """

    class Evil:
        def __reduce__(self):
            return (print, ('executed!',))

    path = tmp_path / 'evil.pth'
    torch.save({'model': source.state_dict(), 'payload': Evil()}, path)
    for route in (lambda: read_state_dict(path), lambda: load_weights(_model(), path),
                  lambda: create_with_weights('dgmn2_tiny', path)):
        with pytest.raises(CheckpointError, match='would need full \\(unsafe\\) unpickling'):
            route()
    assert 'executed!' not in capsys.readouterr().out


def test_plain_state_dict_and_safetensors(source, image, tmp_path):
    torch.save(_released(source), tmp_path / 'plain.pth')
    save_file(source.state_dict(), str(tmp_path / 'ours.safetensors'))
    for name in ('plain.pth', 'ours.safetensors'):
        model = timm.create_model('dgmn2_tiny', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name))).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(image), source(image), atol=0, rtol=0)


def test_detection_checkpoint_with_prefix(source, image, tmp_path):
    backbone = {f'backbone.{k}': v for k, v in _released(source).items() if not k.startswith('head')}
    neck = {'neck.fpn_convs.0.conv.weight': torch.zeros(256, 256, 3, 3), 'bbox_head.retina_cls.bias': torch.zeros(9)}
    torch.save({'state_dict': {**backbone, **neck}, 'meta': {'epoch': 12}}, tmp_path / 'retinanet.pth')
    path = str(tmp_path / 'retinanet.pth')
    model = create_with_weights('dgmn2_tiny', path).eval()
    assert model.num_classes == 0
    with torch.no_grad():
        torch.testing.assert_close(model(image), source.forward_head(source.forward_features(image), pre_logits=True))
    features = timm.create_model('dgmn2_tiny', features_only=True, output_stride=8, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=path)).eval()
    with torch.no_grad():
        assert [f.shape[1] for f in features(image)] == [64, 128, 320, 512]
    # a classifier needs a head the detection checkpoint does not have
    with pytest.raises(CheckpointMismatchError, match=r'dgmn2_tiny: Missing keys \(2\): head.weight, head.bias'):
        load_weights(_model(), path)


def test_wrong_variant_is_named(tmp_path):
    small = _model('dgmn2_small')
    path = _deit_file(tmp_path / 'dgmn2_small.pth', _released(small))
    with pytest.raises(CheckpointMismatchError, match=r'dgmn2_small.*\(3, 4, 6, 3\).*model is dgmn2_tiny'):
        load_weights(_model(), path)
    with pytest.raises(CheckpointMismatchError, match=r'dgmn2_small.*model is dgmn2_tiny'):
        create_with_weights('dgmn2_tiny', path, num_classes=10)
    # timm's route runs the model's filter, which names the variant too
    with pytest.raises(RuntimeError, match=r'dgmn2_small.*model is dgmn2_tiny'):
        timm.create_model('dgmn2_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=10)
    with pytest.raises(RuntimeError, match=r'dgmn2_tiny.*model is dgmn2_medium'):
        checkpoint_filter_fn(_model().state_dict(), _model('dgmn2_medium'))


def test_truncated_state_dict_names_missing_keys(source):
    sd = _released(source)
    del sd['block2.1.attn.qkv.weight'], sd['patch_embed3.norm.running_var']
    sd['block2.1.attn.extra'] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_state_dict_into(_model(), sd)
    msg = str(err.value)
    assert 'dgmn2_tiny' in msg and '\n' not in msg
    assert 'stages.1.blocks.1.attn.qkv.weight' in msg and 'stages.2.downsample.norm.running_var' in msg
    assert 'Unexpected keys (1): stages.1.blocks.1.attn.extra' in msg


def test_shape_mismatch_is_named(source):
    sd = source.state_dict()
    sd['stages.0.blocks.0.attn.rel_height'] = torch.zeros(10, 64)
    with pytest.raises(CheckpointMismatchError,
                       match=r'stages.0.blocks.0.attn.rel_height: checkpoint \(10, 64\) vs model \(64, 64\)'):
        load_state_dict_into(_model(), sd)


def test_corrupt_file_raises(source, tmp_path):
    path = tmp_path / 'dgmn2_tiny.pth'
    _deit_file(path, _released(source))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='is truncated or corrupt'):
        load_weights(_model(), path)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_in_chans_adapted_when_loading(source, tmp_path, in_chans):
    path = _deit_file(tmp_path / 'dgmn2_tiny.pth', _released(source))
    w = source.stem.conv1.weight
    loaded = timm.create_model('dgmn2_tiny', in_chans=in_chans)
    load_weights(loaded, path)
    for model in (timm.create_model('dgmn2_tiny', in_chans=in_chans, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=path)),
                  create_with_weights('dgmn2_tiny', path, in_chans=in_chans), loaded):
        got = model.stem.conv1.weight
        assert got.shape == (32, in_chans, 3, 3)
        if in_chans == 1:
            torch.testing.assert_close(got, w.sum(1, keepdim=True))
        else:
            # timm's rule: repeat the RGB filters and rescale by 3 / in_chans
            torch.testing.assert_close(got[:, :3], w * 3 / in_chans)
        torch.testing.assert_close(model.stages[0].blocks[0].attn.qkv.weight, source.stages[0].blocks[0].attn.qkv.weight)


def test_num_classes_override_drops_head(source, image, tmp_path):
    path = _deit_file(tmp_path / 'dgmn2_tiny.pth', _released(source))
    for model in (timm.create_model('dgmn2_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=5),
                  create_with_weights('dgmn2_tiny', path, num_classes=5)):
        model.eval()
        with torch.no_grad():
            assert model(image).shape == (2, 5)
            torch.testing.assert_close(model.forward_features(image), source.forward_features(image), atol=0, rtol=0)


def test_training_checkpoint_unwrap_order(source, tmp_path):
    """ The reader's one order: 'model', else 'state_dict'; with use_ema 'model_ema', else 'state_dict_ema'. """
    a = {'x': torch.zeros(1)}
    b = {'x': torch.ones(1)}
    c = {'x': torch.full((1,), 2.)}
    cases = [
        (dict(model=a, model_ema=b, state_dict=c, state_dict_ema=c), a, b),
        (dict(state_dict=a, state_dict_ema=b, args=argparse.Namespace(lr=1)), a, b),
        (dict(model=a, state_dict=c), a, None),
        ({'module.x': torch.zeros(1), 'backbone.y': torch.ones(1)}, None, None),
    ]
    for i, (ckpt, plain, ema) in enumerate(cases):
        path = tmp_path / f'{i}.pth'
        torch.save(ckpt, path)
        if plain is None:
            assert read_state_dict(path).keys() == {'y'}  # DDP prefix off, a detector's backbone kept
            continue
        assert torch.equal(read_state_dict(path)['x'], plain['x'])
        if ema is None:
            with pytest.raises(CheckpointError, match='has no EMA weights'):
                read_state_dict(path, use_ema=True)
        else:
            assert torch.equal(read_state_dict(path, use_ema=True)['x'], ema['x'])


def test_one_reader_serves_every_route(source, image, tmp_path, monkeypatch):
    """ The same released file through each of our routes: read once by dgmn_timm.weights.checkpoints, same model. """
    from dgmn_timm.weights import checkpoints
    from dgmn_timm.weights.convert import convert_checkpoint
    from dgmn_timm.tasks.detection import create_feature_backbone
    from dgmn_timm.tools.engine import create_model
    from pathlib import Path
    path = _deit_file(tmp_path / 'dgmn2_tiny.pth', _released(source))
    reads = []
    real = checkpoints._weights_file
    monkeypatch.setattr(checkpoints, '_weights_file', lambda p: reads.append(str(p)) or real(p))
    repo = str(Path(__file__).resolve().parents[1])
    models = {
        'torch_hub': lambda: torch.hub.load(repo, 'dgmn2_tiny', source='local', checkpoint_path=path),
        'load_weights': lambda: load_weights(timm.create_model('dgmn2_tiny'), path),
        'create_with_weights': lambda: create_with_weights('dgmn2_tiny', path),
        'scripts': lambda: create_model('dgmn2_tiny', checkpoint=path),
        'converter': lambda: convert_checkpoint(path, 'dgmn2_tiny', tmp_path / 'out', check_size=32, verify=False).model,
    }
    for route, build in models.items():
        reads.clear()
        model = build()
        assert reads == [path], route
        if model is not None:
            with torch.no_grad():
                torch.testing.assert_close(model.eval()(image), source(image), atol=0, rtol=0, msg=route)
    reads.clear()
    features = create_feature_backbone('dgmn2_tiny', backbone_checkpoint=path).eval()
    assert reads == [path]
    with torch.no_grad():
        torch.testing.assert_close(features(image)[-1], source.forward_features(image), atol=0, rtol=0)


def test_other_timm_models_load_as_timm_loads_them(tmp_path):
    """ import dgmn_timm changes nothing for models registered elsewhere: timm's own reader and errors. """
    model = timm.create_model('test_vit')
    torch.save({'state_dict_ema': model.state_dict(), 'state_dict': {}}, tmp_path / 'ema.pth')
    timm.create_model('test_vit', checkpoint_path=str(tmp_path / 'ema.pth'))  # timm's EMA-first order
    (tmp_path / 'empty.pth').write_bytes(b'')
    with pytest.raises(Exception) as e:
        timm.create_model('test_vit', checkpoint_path=str(tmp_path / 'empty.pth'))
    assert not isinstance(e.value, CheckpointError)


_IDENTITY_CHECK = r"""
import importlib, json, sys
names = {
    'timm.models._builder': ['load_pretrained', 'load_state_dict_from_hf', 'load_state_dict_from_path',
                             'load_custom_from_hf', '_resolve_pretrained_source', 'download_cached_file'],
    'timm.models._factory': ['create_model', 'load_checkpoint', 'load_model_config_from_hf',
                             'load_model_config_from_path'],
    'timm.models._helpers': ['load_checkpoint', 'load_state_dict', 'clean_state_dict', 'remap_state_dict',
                             'resume_checkpoint', '_torch_load'],
    'timm.models._hub': ['load_model_config_from_hf', 'load_model_config_from_path', 'load_state_dict_from_hf',
                         'load_state_dict_from_path', 'download_cached_file', 'hf_hub_download', 'save_for_hf'],
    'timm.models': ['create_model', 'load_checkpoint', 'load_pretrained', 'load_state_dict'],
    'timm': ['create_model'],
    'torch': ['load', 'save'],
    'torch.hub': ['load_state_dict_from_url', 'download_url_to_file', 'load'],
    'torch.serialization': ['load', 'add_safe_globals', 'get_safe_globals'],
    'torch.nn.modules.module': [],
    'huggingface_hub': ['hf_hub_download', 'snapshot_download', 'try_to_load_from_cache', 'get_hf_file_metadata'],
    'huggingface_hub.file_download': ['hf_hub_download', 'get_hf_file_metadata'],
}
def snapshot():
    out = {}
    for mod, attrs in names.items():
        m = importlib.import_module(mod)
        for a in attrs:
            if hasattr(m, a):
                out[f'{mod}.{a}'] = id(getattr(m, a))
    import torch.nn as nn
    out['nn.Module.load_state_dict'] = id(nn.Module.load_state_dict)
    out['safe_globals'] = repr(sorted(map(str, __import__('torch').serialization.get_safe_globals())))
    return out
before = snapshot()
import dgmn_timm, dgmn_timm.weights.hub, dgmn_timm.weights.convert, dgmn_timm.tasks.detection
after = snapshot()
print(json.dumps(dict(changed=sorted(k for k in before if before[k] != after.get(k)), count=len(before))))
"""


def test_import_replaces_no_function():
    """ After import dgmn_timm, the loaders of timm, torch and huggingface_hub are the objects they were. """
    proc = subprocess.run([sys.executable, '-c', _IDENTITY_CHECK], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['count'] > 30 and result['changed'] == []


def _ema_choice(name, tmp_path):
    """ Which entry of a training checkpoint with both 'state_dict' and 'state_dict_ema' checkpoint_path= loads. """
    torch.manual_seed(0)
    model = timm.create_model(name)
    plain = model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in plain.items()}
    path = tmp_path / f'{name}.pth'
    torch.save({'state_dict': plain, 'state_dict_ema': ema, 'epoch': 1}, path)
    loaded = timm.create_model(name, checkpoint_path=str(path)).state_dict()
    key = next(k for k, v in plain.items() if v.is_floating_point())
    if torch.equal(loaded[key], ema[key]):
        return 'state_dict_ema'
    assert torch.equal(loaded[key], plain[key])
    return 'state_dict'


def test_checkpoint_path_picks_the_entry_timm_picks(tmp_path):
    assert _ema_choice('dgmn2_tiny', tmp_path) == _ema_choice('resnet10t', tmp_path)
