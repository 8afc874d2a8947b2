""" Pretrained weights on the Hugging Face Hub for dgmn_timm models.

The authors released DeiT-style ``.pth`` training checkpoints. This module turns one into a
folder in timm's Hub format (``model.safetensors`` + ``config.json`` + ``README.md`` model card),
optionally places it in the local Hugging Face cache under the model's ``hf_hub_id`` (so
``timm.create_model('dgmn2_tiny.in1k', pretrained=True)`` works with ``HF_HUB_OFFLINE=1``),
pushes it to the Hub, provides the torch.hub entry points of ``hubconf.py``, and turns
failures to find or use pretrained weights into errors that say what went wrong and what to do.

Main entry points:
    * ``convert_checkpoint``: released checkpoint -> verified Hub-ready folder (``scripts/convert_official.py``).
    * ``place_in_cache``: Hub-ready folder -> local HF cache under a repo id.
    * ``push_folder``: Hub-ready folder -> Hub repo (``scripts/push_to_hub.py``), with a dry run.
    * ``build_model_with_pretrained_checks``: ``timm.models.build_model_with_cfg`` with clear pretrained errors,
      used by the model families' ``_create_*`` functions.
    * ``package_models`` / ``hub_entrypoint``: torch.hub entry points for every registered dgmn_timm model.
"""
import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.models import (
    get_pretrained_cfg,
    list_models,
    model_entrypoint,
    resolve_pretrained_cfg,
    save_for_hf,
    split_model_name_tag,
)

from .checkpoints import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, read_checkpoint as safe_load

__all__ = [
    'PretrainedWeightsError', 'PretrainedWeightsNotFoundError', 'ConversionResult',
    'CONVERTER_SCRIPT', 'PAPER_METRICS',
    'build_model_with_pretrained_checks', 'load_released_checkpoint', 'extract_state_dict',
    'convert_checkpoint', 'write_model_card', 'place_in_cache', 'hub_folder_files', 'verify_hub_folder',
    'push_folder', 'registered_architecture', 'package_models', 'hub_entrypoint', 'create_hub_model',
]

PACKAGE = __name__.split('.')[0]
CONVERTER_SCRIPT = 'scripts/convert_official.py'
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
README_NAME = 'README.md'
# weight files the Hub stores with git LFS (their cache etag is the sha256 of the content)
_LFS_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt', '.ckpt', '.npz', '.onnx', '.h5', '.msgpack')

# Numbers reported in the papers (shared/spec tables), for the model cards. Families added
# later add their architectures here.
PAPER_METRICS: Dict[str, Dict[str, float]] = {
    'dgmn2_tiny': dict(params_m=12.1, gmacs=2.3, top1=78.7),
    'dgmn2_small': dict(params_m=21.0, gmacs=4.3, top1=81.7),
    'dgmn2_medium': dict(params_m=35.8, gmacs=7.1, top1=82.5),
    'dgmn2_large': dict(params_m=48.3, gmacs=10.4, top1=83.3),
}

_PAPERS: Dict[str, Dict[str, str]] = {
    'dgmn2': dict(
        name='DGMN2',
        title='Dynamic Graph Message Passing Networks for Visual Recognition',
        arxiv='2209.09760',
        description=(
            'a four-stage pyramid vision transformer whose attention lets every query attend to '
            'K = 9 key/value nodes sampled at a 3x3 neighbourhood plus learned per-token walks '
            '(a dynamic graph), with cost linear in the number of pixels'),
        citation=(
            '@article{zhang2022dgmn2,\n'
            '  title={Dynamic Graph Message Passing Networks for Visual Recognition},\n'
            '  author={Zhang, Li and Chen, Mohan and Arnab, Anurag and Xue, Xiangyang and Torr, Philip HS},\n'
            '  journal={IEEE Transactions on Pattern Analysis and Machine Intelligence},\n'
            '  year={2022}\n'
            '}'),
    ),
}


# the errors the README promises, as the checkpoint module's
PretrainedWeightsError = CheckpointError
PretrainedWeightsNotFoundError = CheckpointNotFoundError


# ---------------------------------------------------------------------------------------------
# Hugging Face Hub helpers (imported lazily, all public huggingface_hub API)


def _hf_constants():
    from huggingface_hub import constants
    return constants


def hf_cache_dir(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """ The Hugging Face Hub cache that ``hf_hub_download`` reads for this call.

    huggingface_hub resolves ``HF_HUB_CACHE`` / ``HF_HOME`` when it is imported and reads the
    resolved ``huggingface_hub.constants.HF_HUB_CACHE`` on every download, so that is the
    folder the loaders use (an explicit ``cache_dir`` takes priority, as in ``timm.create_model``).
    """
    return Path(cache_dir) if cache_dir else Path(_hf_constants().HF_HUB_CACHE)


def _hf_offline() -> bool:
    constants = _hf_constants()
    is_offline = getattr(constants, 'is_offline_mode', None)
    return bool(is_offline() if callable(is_offline) else getattr(constants, 'HF_HUB_OFFLINE', False))


def _split_revision(hub_id: str) -> Tuple[str, Optional[str]]:
    repo_id, _, revision = hub_id.partition('@')
    return repo_id, revision or None


def _repo_cache_folder(repo_id: str) -> str:
    # the documented layout of the Hub cache: models--{namespace}--{name}
    return 'models--' + repo_id.replace('/', '--')


def _cached_hub_config(hub_id: str, cache_dir: Optional[Union[str, Path]] = None) -> Optional[Dict[str, Any]]:
    """ config.json of a Hub repo if it is already in the local cache (never touches the network). """
    from huggingface_hub import try_to_load_from_cache
    repo_id, revision = _split_revision(hub_id)
    try:
        path = try_to_load_from_cache(repo_id, CONFIG_NAME, cache_dir=cache_dir, revision=revision)
    except Exception:  # invalid repo ids etc. are reported by the loader itself
        return None
    if isinstance(path, str) and os.path.isfile(path):
        return _read_config(Path(path), missing_ok=True)
    return None


def _read_config(path: Path, missing_ok: bool = False) -> Optional[Dict[str, Any]]:
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        if missing_ok:
            return None
        raise PretrainedWeightsError(f'{path} does not exist; a timm Hub folder needs a {CONFIG_NAME}.')
    try:
        cfg = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise PretrainedWeightsError(f'{path} is not a valid JSON config ({e}).') from e
    if not isinstance(cfg, dict):
        raise PretrainedWeightsError(f'{path} is not a timm config (expected a JSON object).')
    return cfg


def _config_architecture(cfg: Optional[Mapping[str, Any]]) -> Optional[str]:
    if not cfg:
        return None
    arch = cfg.get('architecture') or (cfg.get('pretrained_cfg') or {}).get('architecture')
    return arch if isinstance(arch, str) else None


def _config_num_classes(cfg: Mapping[str, Any]) -> Optional[int]:
    n = cfg.get('num_classes', (cfg.get('pretrained_cfg') or {}).get('num_classes'))
    return int(n) if n is not None else None


# ---------------------------------------------------------------------------------------------
# Clear errors around the pretrained load of timm's build_model_with_cfg


@dataclasses.dataclass
class _PretrainedSource:
    kind: str  # 'hf-hub', 'local-dir', 'file', 'url', 'state_dict' or ''
    location: str
    tag: Optional[str]
    filename: Optional[str] = None  # hf_hub_filename override of a Hub source
    config_arch: Optional[str] = None  # architecture named by the source's config.json, if known

    def describe(self) -> str:
        if self.kind == 'hf-hub':
            return f"Hugging Face Hub repo '{self.location}'"
        if self.kind == 'local-dir':
            return f"folder '{self.location}'"
        if self.kind == 'file':
            return f"file '{self.location}'"
        if self.kind == 'url':
            return f"url '{self.location}'"
        if self.kind == 'state_dict':
            return 'the given state dict'
        return 'no source'


def _resolve_source(variant: str, kwargs: Dict[str, Any]) -> _PretrainedSource:
    """ Where timm will load the pretrained weights from (mirrors timm's resolution order). """
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    ).to_dict()
    source, tag = cfg.get('source') or '', cfg.get('tag')
    if source == 'hf-hub' and cfg.get('hf_hub_id'):
        return _PretrainedSource('hf-hub', cfg['hf_hub_id'], tag, cfg.get('hf_hub_filename'))
    if source == 'local-dir':
        return _PretrainedSource('local-dir', str(cfg.get('file')), tag)
    if cfg.get('state_dict') is not None:
        return _PretrainedSource('state_dict', '', tag)
    if cfg.get('file'):
        return _PretrainedSource('file', str(cfg['file']), tag)
    if cfg.get('hf_hub_id'):
        return _PretrainedSource('hf-hub', cfg['hf_hub_id'], tag, cfg.get('hf_hub_filename'))
    if cfg.get('url'):
        return _PretrainedSource('url', cfg['url'], tag)
    return _PretrainedSource('', '', tag)


def _converter_command(variant: str, tag: Optional[str], cache_dir: Optional[Union[str, Path]] = None) -> str:
    name = f'{variant}.{tag}' if tag else variant
    cmd = f'python {CONVERTER_SCRIPT} {variant}.pth --model {name} --output-dir {name} --to-cache'
    if cache_dir:
        cmd += f' --cache-dir {cache_dir}'
    return cmd


def _not_found_message(variant: str, src: _PretrainedSource, cache_dir, error: BaseException) -> str:
    name = f'{variant}.{src.tag}' if src.tag else variant
    if src.kind == 'hf-hub':
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
        cache = hf_cache_dir(cache_dir)
        if _hf_offline():
            why = 'and HF_HUB_OFFLINE is set, so the Hub was not asked'
        elif isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError)):
            why = 'and the Hub does not have it (or it is private and no token with access was found)'
        else:
            why = 'and the Hub could not be reached or does not have the weights file'
        lines = [
            f"No pretrained weights for {name}: the Hugging Face Hub repo '{src.location}' is not in the "
            f"local cache ({cache}) {why}.",
            "To obtain them, convert the authors' released checkpoint once into the local cache:",
            f'    {_converter_command(variant, src.tag, cache_dir)}',
            f"(or in Python: dgmn_timm.hub.convert_checkpoint('{variant}.pth', '{name}', '{name}', to_cache=True)).",
            f"Then timm.create_model('{name}', pretrained=True) also works offline (HF_HUB_OFFLINE=1). "
            f"A converted folder elsewhere loads with timm.create_model('local-dir:PATH', pretrained=True).",
        ]
        return '\n'.join(lines)
    if src.kind == 'local-dir':
        return (f"No pretrained weights for {name}: folder '{src.location}' does not exist or holds no weights file "
                f"(expected {WEIGHTS_NAME}). Create it with: {_converter_command(variant, src.tag)}")
    if src.kind == 'file':
        return (f"No pretrained weights for {name}: file '{src.location}' does not exist. Give the path of the "
                f"authors' released .pth, of a timm checkpoint, or of a converted folder.")
    if src.kind == 'url':
        return f"No pretrained weights for {name}: could not download '{src.location}' ({error})."
    return (f'No pretrained weights are registered for {name}. Use pretrained=False, or give weights with '
            f"pretrained_cfg_overlay=dict(file=PATH) or timm.create_model('local-dir:PATH', pretrained=True).")


def _unreadable_message(variant: str, src: _PretrainedSource, error: BaseException) -> str:
    what = src.describe()
    if src.kind == 'hf-hub':
        repo_id = _split_revision(src.location)[0]
        fix = (f'delete {hf_cache_dir() / _repo_cache_folder(repo_id)} (the cached copy) and download it again, '
               f'or re-convert it: {_converter_command(variant, src.tag)}')
    else:
        fix = f'convert the released checkpoint again ({CONVERTER_SCRIPT})'
    return (f'The pretrained weights for {variant} in {what} could not be read; the file is truncated, corrupt '
            f'or not a weights file ({type(error).__name__}: {error}). To fix it, {fix}.')


def _mismatch_message(variant: str, src: _PretrainedSource, error: BaseException) -> str:
    what = src.describe()
    named = ''
    if src.config_arch:
        named = f' (its {CONFIG_NAME} names architecture {src.config_arch})'
    return f'The pretrained weights in {what}{named} do not fit the model {variant}:\n  {error}'


def _check_config_architecture(variant: str, src: _PretrainedSource, cache_dir) -> None:
    """ Fail early when the source's config.json names another architecture than the model built. """
    cfg = None
    if src.kind in ('local-dir', 'file') and Path(src.location).is_dir():
        cfg = _read_config(Path(src.location), missing_ok=True)
    elif src.kind == 'hf-hub':
        cfg = _cached_hub_config(src.location, cache_dir)
    arch = _config_architecture(cfg)
    src.config_arch = arch
    if arch and split_model_name_tag(arch)[0] != variant:
        raise PretrainedWeightsError(
            f'The pretrained weights in {src.describe()} are for architecture {arch} (named by its {CONFIG_NAME}) '
            f'but the model being built is {variant}. Load them with timm.create_model(\'{arch}\', ...) '
            f'or point {variant} at weights converted for it.')


def _hub_weights_cached(src: _PretrainedSource, cache_dir) -> bool:
    """ Whether a weights file timm would read for this Hub source is in the local cache. """
    from huggingface_hub import try_to_load_from_cache
    filename = src.filename or 'pytorch_model.bin'
    candidates = [filename]
    if filename.endswith('.bin'):  # timm prefers a safetensors alternative of a .bin
        candidates.insert(0, WEIGHTS_NAME if filename == 'pytorch_model.bin' else filename[:-4] + '.safetensors')
    repo_id, revision = _split_revision(src.location)
    for name in candidates:
        try:
            path = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision)
        except Exception:
            return True  # let the loader report it
        if isinstance(path, str):
            return True
    return False


def build_model_with_pretrained_checks(
        model_cls: Callable[..., nn.Module],
        variant: str,
        pretrained: bool = False,
        **kwargs,
) -> nn.Module:
    """ ``timm.models.build_model_with_cfg`` with clear errors when the pretrained weights fail.

    Takes exactly the arguments of ``build_model_with_cfg``. With ``pretrained=False`` it is that
    function. With ``pretrained=True``:

    * weights that cannot be found (Hub repo not cached and offline / unreachable / missing,
      missing file or folder) raise ``PretrainedWeightsNotFoundError`` naming the Hub id (or path)
      and the converter command that produces them;
    * a folder or cached Hub repo whose ``config.json`` names another architecture raises
      ``PretrainedWeightsError`` naming both, before anything is read;
    * unreadable (truncated, corrupt) files and weights that do not fit the model raise
      ``PretrainedWeightsError`` naming the source and the model.

    The original exception is chained. ``pretrained_cfg_overlay=dict(file=FOLDER)`` with a converted
    folder is read as a ``local-dir`` source.
    """
    from timm.models import build_model_with_cfg
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)

    overlay = kwargs.get('pretrained_cfg_overlay')
    if overlay and overlay.get('file') and not overlay.get('source') and Path(overlay['file']).is_dir():
        kwargs['pretrained_cfg_overlay'] = dict(overlay, source='local-dir')
    cache_dir = kwargs.get('cache_dir')
    src = _resolve_source(variant, kwargs)
    _check_config_architecture(variant, src, cache_dir)
    if src.kind in ('file', 'local-dir') and not Path(src.location).exists():
        raise PretrainedWeightsNotFoundError(_not_found_message(
            variant, src, cache_dir, FileNotFoundError(src.location)))
    if src.kind == 'hf-hub' and _hf_offline() and not _hub_weights_cached(src, cache_dir):
        # certain to fail: say so before building the model
        from huggingface_hub.errors import LocalEntryNotFoundError
        raise PretrainedWeightsNotFoundError(_not_found_message(
            variant, src, cache_dir, LocalEntryNotFoundError('not in the local cache, offline')))

    # Track the phase of the build so that errors are attributed correctly:
    # 'build' (constructing the model) -> 'read' (finding and reading weights) -> 'load' -> 'done'.
    phase = ['build']
    hooks = []
    user_filter = kwargs.pop('pretrained_filter_fn', None)

    def _post_load_hook(module, incompatible_keys):
        phase[0] = 'done'

    def _tracked_cls(*args, **kw):
        model = model_cls(*args, **kw)
        hooks.append(model.register_load_state_dict_post_hook(_post_load_hook))
        phase[0] = 'read'
        return model

    def _tracked_filter(state_dict, model=None):
        phase[0] = 'load'
        if user_filter is None:
            return state_dict
        return user_filter(state_dict) if model is None else user_filter(state_dict, model)

    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    not_found = (
        EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, OfflineModeIsEnabled,
        FileNotFoundError, ConnectionError)
    try:
        return build_model_with_cfg(_tracked_cls, variant, pretrained, pretrained_filter_fn=_tracked_filter, **kwargs)
    except (PretrainedWeightsError, PretrainedWeightsNotFoundError):
        raise
    except not_found as e:
        if phase[0] != 'read':
            raise
        raise PretrainedWeightsNotFoundError(_not_found_message(variant, src, cache_dir, e)) from e
    except HfHubHTTPError as e:
        if phase[0] != 'read':
            raise
        raise PretrainedWeightsNotFoundError(_not_found_message(variant, src, cache_dir, e)) from e
    except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError, AssertionError) as e:
        if phase[0] == 'read':
            if isinstance(e, RuntimeError) and str(e).startswith('No pretrained weights exist'):
                raise PretrainedWeightsNotFoundError(_not_found_message(variant, src, cache_dir, e)) from e
            raise PretrainedWeightsError(_unreadable_message(variant, src, e)) from e
        if phase[0] == 'load':
            raise CheckpointMismatchError(_mismatch_message(variant, src, e)) from e
        raise
    except Exception as e:
        # e.g. safetensors.SafetensorError for a truncated file (not an OSError subclass)
        if phase[0] == 'read':
            raise PretrainedWeightsError(_unreadable_message(variant, src, e)) from e
        raise
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Reading the authors' released checkpoints


def load_released_checkpoint(path: Union[str, Path]) -> Any:
    """ Read a released training checkpoint without full unpickling.

    ``torch.load(weights_only=True)`` with exactly one extra class allowed: ``argparse.Namespace``
    (the 'args' entry of DeiT-style checkpoints). Anything else that would need arbitrary code
    to unpickle is refused.

    Raises:
        FileNotFoundError: the file does not exist.
        PretrainedWeightsError: the file is truncated, corrupt, or holds objects that are not allowed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist.')
    try:
        return safe_load(path)
    except pickle.UnpicklingError as e:
        if 'weights_only' in str(e) or 'Unsupported global' in str(e):
            raise PretrainedWeightsError(
                f'Refusing to read {path}: it holds Python objects other than tensors, containers and '
                f'argparse.Namespace, which would need full (unsafe) unpickling. If you trust the file, save '
                f'its weights alone in a separate step (e.g. torch.save(torch.load(path, weights_only=False)'
                f"['model'], 'weights.pth')) and convert that. Details:\n  {e}") from e
        raise PretrainedWeightsError(f'Could not read checkpoint {path}: truncated or corrupt ({e}).') from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise PretrainedWeightsError(
            f'Could not read checkpoint {path}: it is truncated, corrupt or not a PyTorch checkpoint '
            f'({type(e).__name__}: {e}).') from e


def extract_state_dict(checkpoint: Any, use_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """ The weights of a training checkpoint and what else it says about itself.

    Accepts DeiT-style dicts ({'model': ..., 'model_ema': ..., 'args': Namespace, 'epoch': ...}),
    mmdet/mmseg-style dicts ({'state_dict': ..., 'meta': ...}) and plain state dicts.

    Returns:
        (state_dict, info) with info holding 'container' (the key the weights came from),
        'epoch' and 'args' (a dict) when present.
    """
    if not isinstance(checkpoint, Mapping):
        raise PretrainedWeightsError(f'Expected a checkpoint dict, got {type(checkpoint).__name__}.')
    keys = ('model_ema', 'state_dict_ema') if use_ema else ('model', 'state_dict')
    container, state_dict = '', checkpoint
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            container, state_dict = key, checkpoint[key]
            break
    else:
        if use_ema:
            raise PretrainedWeightsError(
                f'EMA weights were requested but the checkpoint has none (entries: {", ".join(map(str, checkpoint))}).')
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    others = [k for k in state_dict if k not in tensors]
    if not tensors or others:
        raise PretrainedWeightsError(
            f"The checkpoint's {container or 'top level'} is not a state dict of tensors"
            + (f' (non-tensor entries: {", ".join(map(str, others[:5]))})' if others else '') + '.')
    info: Dict[str, Any] = dict(container=container)
    if container and isinstance(checkpoint.get('epoch'), int):
        info['epoch'] = checkpoint['epoch']
    args = checkpoint.get('args') if container else None
    if isinstance(args, argparse.Namespace):
        info['args'] = dict(vars(args))
    elif isinstance(args, Mapping):
        info['args'] = dict(args)
    return tensors, info


def _registered_cfg(name: str) -> Optional[Any]:
    """ The registered pretrained cfg of ``architecture.tag``, or None (also for unknown tags). """
    try:
        return get_pretrained_cfg(name)
    except RuntimeError:
        return None


def _filter_fn_for(architecture: str) -> Optional[Callable]:
    """ The ``checkpoint_filter_fn`` of the module that registers ``architecture`` (timm's convention). """
    module = sys.modules.get(model_entrypoint(architecture).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def registered_architecture(repo_id: str) -> Optional[Tuple[str, Any]]:
    """ (model name with tag, pretrained cfg) of the registered pretrained cfg that uses this Hub id, if any. """
    for name in list_models(pretrained=True):
        if not _is_package_model(split_model_name_tag(name)[0]):
            continue
        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.hf_hub_id == repo_id:
            return name, cfg
    return None


def _is_package_model(name: str, package: str = PACKAGE) -> bool:
    module = model_entrypoint(name).__module__
    return module == package or module.startswith(package + '.')


@dataclasses.dataclass
class ConversionResult:
    """ What ``convert_checkpoint`` produced. """
    model: nn.Module  # the converted model, in eval mode
    output_dir: Path
    architecture: str
    tag: str
    num_classes: int
    check_input: torch.Tensor  # the sanity-check input ...
    check_output: torch.Tensor  # ... and the converted model's output on it
    ignored_keys: List[str]  # released keys that are not part of the model (detector necks, heads)
    cache_path: Optional[Path] = None  # the cache snapshot folder with to_cache
    repo_id: Optional[str] = None
    verified: bool = False  # the written folder was reloaded and reproduced check_output exactly


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def _check_input(in_chans: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, size, size, generator=g)


def _build_with_weights(model_name: str, state_dict: Mapping[str, torch.Tensor], **kwargs) -> nn.Module:
    """ Create ``model_name`` holding exactly ``state_dict`` (strict: every key used, every tensor filled).

    The model is built on the meta device when it supports that (no wasted random initialisation of
    a model whose every tensor is replaced), else normally.
    """
    state_dict = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                  for k, v in state_dict.items()}
    try:
        with torch.device('meta'):
            model = timm.create_model(model_name, pretrained=False, **kwargs)
    except Exception:
        model = None
    if model is not None:
        model.load_state_dict(state_dict, strict=True, assign=True)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    return model


def convert_checkpoint(
        checkpoint_path: Union[str, Path],
        model_name: str,
        output_dir: Union[str, Path],
        tag: Optional[str] = None,
        use_ema: bool = False,
        check_size: int = 224,
        to_cache: bool = False,
        repo_id: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        overwrite: bool = False,
        verify: bool = True,
        verbose: bool = False,
) -> ConversionResult:
    """ Convert an authors' released checkpoint into a Hub-ready timm folder.

    Reads the checkpoint safely, maps it to ``model_name`` (strict: every released tensor must be
    used and every model tensor filled; detection / segmentation checkpoints keep their backbone,
    the rest is reported in ``ignored_keys``), runs one forward pass, writes ``model.safetensors``,
    ``config.json`` (timm's own ``save_for_hf``) and a ``README.md`` model card, reloads the folder
    through ``timm.create_model('local-dir:...')`` and checks it reproduces the output exactly.

    Args:
        checkpoint_path: the released ``.pth`` file.
        model_name: registered architecture, optionally with tag (``dgmn2_tiny`` or ``dgmn2_tiny.in1k``).
        output_dir: folder to write (must be empty or absent unless ``overwrite``).
        tag: pretrained tag recorded in the config (default: the tag of ``model_name``, else
            'in1k' for a classifier and 'backbone' for a checkpoint without head).
        use_ema: convert the EMA weights of a DeiT checkpoint instead of 'model'.
        check_size: image size of the sanity-check forward pass.
        to_cache: also place the folder into the local Hugging Face cache under ``repo_id``.
        repo_id: Hub id for the cache and the model card (default: the model's registered ``hf_hub_id``).
        cache_dir: Hugging Face cache to use (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        overwrite: replace the files of an existing, non-empty ``output_dir``.
        verify: reload the written folder through ``timm.create_model('local-dir:...')`` and require
            the exact same output.
        verbose: print a summary.
    """
    checkpoint_path = Path(checkpoint_path)
    output_dir = Path(output_dir)
    architecture, name_tag = split_model_name_tag(model_name)
    if not timm.is_model(architecture):
        raise ValueError(f'Unknown model {architecture!r}; registered dgmn_timm models: {", ".join(package_models())}')
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.')

    checkpoint = load_released_checkpoint(checkpoint_path)
    released, info = extract_state_dict(checkpoint, use_ema=use_ema)
    del checkpoint

    filter_fn = _filter_fn_for(architecture)
    mapped = dict(filter_fn(released, None)) if filter_fn is not None else dict(released)
    ignored: List[str] = []
    if len(mapped) < len(released):
        # a wrapped backbone (detector / segmentor): report what is not part of it
        kept = {id(v) for v in mapped.values()}
        ignored = sorted(k for k, v in released.items() if id(v) not in kept)

    default_cfg = get_pretrained_cfg(architecture)
    classifier = (default_cfg.classifier if default_cfg is not None else None) or 'head'
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    head_weight = mapped.get(classifier + '.weight')
    num_classes = int(head_weight.shape[0]) if head_weight is not None else 0

    tag = tag or name_tag or ('in1k' if num_classes else 'backbone')
    if repo_id is None:
        cfg = _registered_cfg(f'{architecture}.{tag}')
        repo_id = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id and num_classes else None
    if to_cache:
        if repo_id is None:
            raise ValueError(
                f'No Hub id to cache {output_dir} under: {architecture}.{tag} has no registered hf_hub_id '
                f'(a backbone-only folder never takes the ImageNet classifier\'s id); pass repo_id (--repo-id).')
        _check_repo_for(f'{checkpoint_path}', architecture, num_classes, repo_id)

    try:
        # a tag of the name that is not registered (e.g. 'dgmn2_tiny.coco') only names the folder's tag
        build_name = model_name if _registered_cfg(model_name) is not None else architecture
        model = _build_with_weights(build_name, mapped, num_classes=num_classes)
    except RuntimeError as e:
        raise PretrainedWeightsError(f'{checkpoint_path} does not fit {architecture}:\n  {e}') from e
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PretrainedWeightsError(f'{checkpoint_path} has non-finite values in {", ".join(bad[:5])}.')

    model.eval()
    x = _check_input(int(getattr(model, 'in_chans', 3)), check_size)
    with torch.inference_mode():
        out = model(x)
    expected = (1, num_classes or model.num_features)
    if tuple(out.shape) != expected or not torch.isfinite(out).all():
        raise PretrainedWeightsError(
            f'Sanity check failed: {architecture} on a {check_size}x{check_size} input gave '
            f'{tuple(out.shape)} (expected {expected}), finite={bool(torch.isfinite(out).all())}.')

    if output_dir.exists() and overwrite:
        for name in (CONFIG_NAME, WEIGHTS_NAME, README_NAME, 'pytorch_model.bin'):
            (output_dir / name).unlink(missing_ok=True)
    save_for_hf(model, output_dir, model_config=dict(pretrained_cfg=dict(tag=tag)), safe_serialization=True)
    write_model_card(
        output_dir,
        repo_id=repo_id,
        source=dict(file=checkpoint_path.name, sha256=_sha256(checkpoint_path), **info),
        ignored_keys=ignored,
    )

    if verify:
        # the folder must reproduce the converted model exactly
        reloaded = timm.create_model(f'local-dir:{output_dir.resolve()}', pretrained=True).eval()
        with torch.inference_mode():
            out_reloaded = reloaded(x)
        if not torch.equal(out, out_reloaded):
            raise PretrainedWeightsError(
                f'{output_dir} does not reproduce the converted model (max abs diff '
                f'{(out - out_reloaded).abs().max().item():.3g}).')

    result = ConversionResult(
        model=model, output_dir=output_dir, architecture=architecture, tag=tag, num_classes=num_classes,
        check_input=x, check_output=out, ignored_keys=ignored, repo_id=repo_id, verified=verify)
    if to_cache:
        result.cache_path = place_in_cache(output_dir, repo_id, cache_dir=cache_dir)
    if verbose:
        print(_summary(checkpoint_path, result, info, len(released)))
    return result


def _summary(checkpoint_path: Path, result: ConversionResult, info: Dict[str, Any], num_released: int) -> str:
    lines = [
        f'Converted {checkpoint_path} ({info.get("container") or "state dict"}, '
        f'{num_released} tensors) -> {result.architecture}.{result.tag}, num_classes={result.num_classes}',
        f'  sanity check: input {tuple(result.check_input.shape)} -> output {tuple(result.check_output.shape)}, '
        f'all finite' + ('; the written folder reproduces it exactly' if result.verified else ''),
        f'  wrote {result.output_dir}: ' + ', '.join(p.name for p in sorted(result.output_dir.iterdir())),
    ]
    if result.ignored_keys:
        groups = sorted({k.split('.')[0] for k in result.ignored_keys})
        lines.append(f'  ignored {len(result.ignored_keys)} tensors outside the backbone ({", ".join(groups)})')
    if result.cache_path is not None:
        lines.append(f"  cached as '{result.repo_id}' in {result.cache_path}")
        lines.append(f"  now: timm.create_model('{result.architecture}.{result.tag}', pretrained=True) "
                     f'works offline (HF_HUB_OFFLINE=1)')
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# Model card


_SAMPLE_IMAGE_URL = (
    'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png')
_IMPORT_LINE = f'import {PACKAGE}  # registers the DGMN models with timm: import it before create_model'


def _fmt_args(args: Mapping[str, Any], keys=('model', 'input_size', 'epochs', 'drop_path', 'lr', 'batch_size')):
    return ', '.join(f'{k}={args[k]}' for k in keys if k in args)


def write_model_card(
        folder: Union[str, Path],
        repo_id: Optional[str] = None,
        source: Optional[Mapping[str, Any]] = None,
        ignored_keys: Optional[List[str]] = None,
) -> Path:
    """ Write the ``README.md`` model card of a converted folder from its ``config.json``.

    Args:
        folder: the folder (with ``config.json`` and ``model.safetensors``).
        repo_id: the Hub id the card refers to (default: ``architecture.tag``).
        source: provenance of the converted file (file, sha256, container, epoch, args).
        ignored_keys: released tensors that are not part of the converted model.
    """
    folder = Path(folder)
    cfg = _read_config(folder)
    arch = _config_architecture(cfg)
    pcfg = cfg.get('pretrained_cfg') or {}
    tag = pcfg.get('tag') or ''
    num_classes = _config_num_classes(cfg) or 0
    name = f'{arch}.{tag}' if tag else arch
    if repo_id:
        hub_name = f'hf-hub:{repo_id}'
    elif _registered_cfg(name) is not None:
        hub_name = name
    else:  # no Hub id: the folder itself
        hub_name = f'local-dir:{folder.name}'
    family = arch.split('_')[0]
    paper = _PAPERS.get(family, {})
    metrics = PAPER_METRICS.get(arch, {})
    variant = arch.split('_', 1)[-1].capitalize() if '_' in arch else arch
    classifier = num_classes > 0

    num_params = None
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        from safetensors import safe_open
        with safe_open(str(weights), framework='pt') as f:
            num_params = sum(
                _numel(f.get_slice(k).get_shape())
                for k in f.keys() if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')))

    size = tuple(pcfg.get('input_size') or (3, 224, 224))
    crop_pct = pcfg.get('crop_pct', 0.875)
    resize = int(round(size[-1] / crop_pct))
    interp = pcfg.get('interpolation', 'bicubic')
    mean, std = tuple(pcfg.get('mean', ())), tuple(pcfg.get('std', ()))
    task = 'image-classification' if classifier else 'image-feature-extraction'

    fm = ['---', 'tags:', f'- {task}', '- timm', f'- {PACKAGE}', 'library_name: timm',
          f'license: {pcfg.get("license", "apache-2.0")}']
    if classifier and 'in1k' in tag:
        fm += ['datasets:', '- imagenet-1k']
    fm += [f'pipeline_tag: {task}', '---']

    title = paper.get('name', family.upper())
    desc = (f'{title}-{variant} {"image classification model" if classifier else "backbone"} '
            f'from the paper "{paper.get("title", "")}"')
    if paper.get('description'):
        desc += f': {paper["description"]}.'
    if classifier:
        desc += (' Trained on ImageNet-1k by the paper authors; the weights were converted from their released '
                 'checkpoint to timm format with dgmn_timm (no retraining, no fine-tuning).')
    else:
        desc += (' Backbone only (no classifier, num_classes=0), converted from a detection / segmentation '
                 'checkpoint of the authors\' release with dgmn_timm; use it as a feature extractor or to '
                 'initialise a dense-prediction model.')

    stats = []
    if num_params is not None:
        exact = f'{num_params / 1e6:.2f} (this checkpoint, {num_params:,} parameters)'
        stats.append(f'  - Params (M): {exact}' + (f'; paper: {metrics["params_m"]}' if metrics and classifier else ''))
    if metrics:
        stats.append(f'  - GMACs: {metrics["gmacs"]} (paper, {size[-2]}x{size[-1]})')
    stats.append(f'  - Image size: {size[-2]} x {size[-1]} (any size of at least 32 x 32 works)')

    lines = fm + [f'# Model card for {name}', '', desc, '', '## Model Details',
                  '- **Model Type:** ' + ('Image classification / backbone' if classifier else 'Feature backbone'),
                  '- **Model Stats:**'] + stats
    if classifier and metrics.get('top1') is not None:
        lines.append(f'- **ImageNet-1k top-1 (paper):** {metrics["top1"]}% '
                     f'(reported by the authors at {size[-1]}x{size[-1]}; not re-evaluated by the converter)')
    if paper:
        lines += [
            '- **Papers:**',
            f'  - {paper["title"]}: https://arxiv.org/abs/{paper["arxiv"]} (arXiv:{paper["arxiv"]})']
    if classifier and 'in1k' in tag:
        lines.append('- **Dataset:** ImageNet-1k')
    if source:
        src = f'`{source.get("file")}`'
        if source.get('sha256'):
            src += f' (sha256 `{source["sha256"][:16]}...`'
            src += f', epoch {source["epoch"]})' if 'epoch' in source else ')'
        lines.append(f"- **Original:** the authors' release (Apache-2.0), converted from {src}")
        if source.get('args') and _fmt_args(source['args']):
            lines.append(f'  - training args recorded in the checkpoint: {_fmt_args(source["args"])}')
    if ignored_keys:
        groups = sorted({k.split('.')[0] for k in ignored_keys})
        lines.append(f'  - not converted: {len(ignored_keys)} tensors outside the backbone ({", ".join(groups)})')

    lines += [
        '', '## Preprocessing', '',
        f'Resize the shorter side to {resize} ({interp}), center crop {size[-2]}x{size[-1]} (crop_pct {crop_pct}), '
        f'scale to [0, 1] and normalise with mean {mean} and std {std}. '
        '`timm.data.resolve_model_data_config(model)` returns exactly this configuration.',
        '', '## Model Usage', '',
    ]
    if classifier:
        lines += [
            '### Image Classification', '```python', 'from urllib.request import urlopen', 'from PIL import Image',
            'import timm', 'import torch', _IMPORT_LINE, '',
            f"img = Image.open(urlopen('{_SAMPLE_IMAGE_URL}'))",
            f"model = timm.create_model('{hub_name}', pretrained=True).eval()",
            'data_config = timm.data.resolve_model_data_config(model)',
            'transforms = timm.data.create_transform(**data_config, is_training=False)',
            'with torch.inference_mode():',
            '    output = model(transforms(img).unsqueeze(0))  # (1, num_classes) logits',
            'top5_probabilities, top5_class_indices = torch.topk(output.softmax(dim=1) * 100, k=5)',
            '```', '',
        ]
    lines += [
        '### Feature Map Extraction', '```python', 'import timm', 'import torch',
        _IMPORT_LINE, '',
        f"model = timm.create_model('{hub_name}', pretrained=True, features_only=True).eval()",
        'with torch.inference_mode():',
        f'    features = model(torch.randn(1, 3, {size[-2]}, {size[-1]}))  # strides 4, 8, 16, 32',
        '```', '',
        '### Offline use', '',
        'The weights live in the local Hugging Face cache after the first download (or after '
        f'`python {CONVERTER_SCRIPT} ... --to-cache`); with `HF_HUB_OFFLINE=1` they load from there. '
        "A copy of this folder loads with `timm.create_model('local-dir:PATH', pretrained=True)`.",
        '',
    ]
    if paper.get('citation'):
        lines += ['## Citation', '```bibtex', paper['citation'], '```', '']
    path = folder / README_NAME
    path.write_text('\n'.join(lines), encoding='utf-8')
    return path


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------------------------
# Local Hugging Face cache


def hub_folder_files(folder: Union[str, Path]) -> List[Path]:
    """ The files of a Hub folder that belong in the repo (relative paths, sorted; hidden entries skipped). """
    folder = Path(folder)
    files = []
    for p in sorted(folder.rglob('*')):
        rel = p.relative_to(folder)
        if any(part.startswith('.') for part in rel.parts) or not p.is_file():  # (symlinks to files count)
            continue
        files.append(rel)
    return files


def _file_etag(path: Path) -> str:
    """ The etag the Hub gives a file: sha256 for LFS weight files, the git blob sha1 otherwise. """
    if path.suffix in _LFS_SUFFIXES:
        return _sha256(path)
    data = path.read_bytes()
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _check_repo_for(what: str, architecture: str, num_classes: Optional[int], repo_id: str) -> None:
    """ A registered Hub id only takes its own architecture (and number of classes). """
    registered = registered_architecture(repo_id)
    if registered is None:
        return
    reg_name, reg_cfg = registered
    reg_arch = split_model_name_tag(reg_name)[0]
    if reg_arch != split_model_name_tag(architecture)[0]:
        raise PretrainedWeightsError(
            f"{what} holds {architecture} but the Hub id '{repo_id}' belongs to {reg_name}; convert the "
            f'{reg_arch} checkpoint for that id, or use another repo id.')
    if reg_cfg.num_classes and num_classes != reg_cfg.num_classes:
        raise PretrainedWeightsError(
            f"{what} holds {architecture} with num_classes={num_classes} but the Hub id '{repo_id}' belongs to "
            f'{reg_name} with num_classes={reg_cfg.num_classes} (a backbone-only folder cannot stand in '
            f'for the classifier); use another repo id.')


def _check_folder_for_repo(folder: Path, repo_id: str) -> Dict[str, Any]:
    """ A folder may only take a registered Hub id if it holds that id's architecture and head. """
    cfg = _read_config(folder)
    arch = _config_architecture(cfg)
    if not arch:
        raise PretrainedWeightsError(f'{folder / CONFIG_NAME} names no architecture.')
    _check_repo_for(f'{folder} (by its {CONFIG_NAME})', arch, _config_num_classes(cfg), repo_id)
    return cfg


def place_in_cache(
        folder: Union[str, Path],
        repo_id: str,
        cache_dir: Optional[Union[str, Path]] = None,
        revision: str = 'main',
) -> Path:
    """ Place a Hub-ready folder into the local Hugging Face cache as if downloaded from ``repo_id``.

    Writes the documented cache layout (``models--ORG--NAME/{blobs,snapshots,refs}``) that
    ``hf_hub_download`` reads, so the weights load with ``HF_HUB_OFFLINE=1`` through the model's
    pretrained tag and ``hf-hub:``. The snapshot gets a commit id derived from the file contents
    (it is not a Hub commit); ``refs/<revision>`` points at it. A folder whose architecture or
    number of classes contradicts the model registered for ``repo_id`` is refused.

    Args:
        folder: the converted folder.
        repo_id: Hub id, e.g. 'dgmn-timm/dgmn2_tiny.in1k'.
        cache_dir: cache root (default: ``HF_HUB_CACHE`` / ``HF_HOME``, as huggingface_hub resolves it).
        revision: the ref to point at the snapshot.

    Returns:
        The snapshot folder.
    """
    from huggingface_hub.utils import validate_repo_id
    folder = Path(folder)
    validate_repo_id(repo_id)
    _check_folder_for_repo(folder, repo_id)
    files = hub_folder_files(folder)
    if not any(str(f) == WEIGHTS_NAME for f in files):
        raise PretrainedWeightsError(f'{folder} has no {WEIGHTS_NAME}.')

    storage = hf_cache_dir(cache_dir) / _repo_cache_folder(repo_id)
    etags = {rel: _file_etag(folder / rel) for rel in files}
    commit = hashlib.sha1('\n'.join(f'{rel.as_posix()} {etags[rel]}' for rel in files).encode()).hexdigest()
    blobs = storage / 'blobs'
    snapshot = storage / 'snapshots' / commit
    blobs.mkdir(parents=True, exist_ok=True)
    for rel in files:
        blob = blobs / etags[rel]
        if not blob.is_file():
            tmp = blob.with_name(blob.name + '.incomplete')
            shutil.copyfile(folder / rel, tmp)
            os.replace(tmp, blob)
        pointer = snapshot / rel
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        try:
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        except OSError:  # no symlinks (e.g. Windows without developer mode): copy, as huggingface_hub does
            shutil.copyfile(blob, pointer)
    refs = storage / 'refs'
    refs.mkdir(parents=True, exist_ok=True)
    (refs / revision).write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------------------------
# Verifying and pushing a folder


def verify_hub_folder(folder: Union[str, Path], repo_id: Optional[str] = None) -> nn.Module:
    """ Check that a folder loads as a timm model: config names a registered architecture, weights fit it.

    With ``repo_id``, also checks the folder may take that Hub id (see ``place_in_cache``).
    Returns the loaded model (eval mode).
    """
    folder = Path(folder)
    cfg = _check_folder_for_repo(folder, repo_id) if repo_id else _read_config(folder)
    arch = _config_architecture(cfg)
    if not arch or not timm.is_model(split_model_name_tag(arch)[0]):
        raise PretrainedWeightsError(
            f'{folder / CONFIG_NAME} names architecture {arch!r}, which is not a registered timm model '
            f'(import {PACKAGE} first; registered here: {", ".join(package_models())}).')
    if not (folder / WEIGHTS_NAME).is_file():
        raise PretrainedWeightsError(f'{folder} has no {WEIGHTS_NAME}.')
    return timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).eval()


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        dry_run: bool = False,
        verify: bool = True,
        print_fn: Callable[[str], None] = print,
) -> Optional[Any]:
    """ Upload a converted folder to a Hub model repo (created if missing).

    The token comes from the usual huggingface_hub places (``HF_TOKEN``, ``huggingface-cli login``).
    Exactly the files of ``hub_folder_files(folder)`` are committed. With ``dry_run`` the plan is
    printed and nothing touches the network.

    Returns:
        The ``CommitInfo`` of the upload, or None for a dry run.
    """
    from huggingface_hub.utils import validate_repo_id
    folder = Path(folder)
    validate_repo_id(repo_id)
    if not folder.is_dir():
        raise FileNotFoundError(f'{folder} is not a folder.')
    if verify:
        verify_hub_folder(folder, repo_id)
    files = hub_folder_files(folder)
    cfg = _read_config(folder)
    commit_message = commit_message or f'Add {_config_architecture(cfg)} weights (converted with {PACKAGE})'
    plan = [
        f"{'[dry run] would upload' if dry_run else 'Uploading'} {len(files)} files from {folder} to "
        f"https://huggingface.co/{repo_id} (model repo, {'private' if private else 'public'} if created, "
        f"revision {revision or 'main'}, commit message {commit_message!r}):",
    ]
    for rel in files:
        path = folder / rel
        plan.append(f'  {rel.as_posix()}  {path.stat().st_size:,} bytes  sha256 {_sha256(path)}')
    print_fn('\n'.join(plan))
    if dry_run:
        return None

    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(library_name='timm', library_version=timm.__version__)
    repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=str(folder / rel)) for rel in files]
    info = api.create_commit(
        repo_id=repo_url.repo_id, repo_type='model', operations=operations,
        commit_message=commit_message, revision=revision)
    print_fn(f'Uploaded: {getattr(info, "commit_url", info)}')
    return info


# ---------------------------------------------------------------------------------------------
# torch.hub entry points


def package_models(package: str = PACKAGE) -> List[str]:
    """ All registered timm models whose entrypoint is defined inside ``package`` (any module of it). """
    return [name for name in list_models() if _is_package_model(name, package)]


_HUB_DOC = """

Pretrained weights: {weights}

Args:
    pretrained: load the pretrained weights (Hub or local Hugging Face cache; works offline with
        HF_HUB_OFFLINE=1 once cached). Without weights available this raises an error that says how to
        convert the authors' release ({converter} ... --to-cache).
    checkpoint_path: load these weights instead: a converted folder (model.safetensors + config.json),
        a timm checkpoint or one of the authors' released .pth files (DeiT-style or 'backbone.'-prefixed).
    num_classes: classes of the classifier; a pretrained head of another size is dropped (new head).
    features_only: return a feature-pyramid backbone (timm FeatureListNet, strides 4/8/16/32).
    **kwargs: any other timm.create_model argument (in_chans, out_indices, output_stride,
        drop_path_rate, pretrained_cfg_overlay, cache_dir, ...).

Example:
    model = torch.hub.load('PATH/TO/dgmn-timm', '{name}', source='local', pretrained=True)
"""


def create_hub_model(
        model_name: str,
        pretrained: bool = False,
        checkpoint_path: Optional[Union[str, Path]] = None,
        num_classes: Optional[int] = None,
        features_only: bool = False,
        **kwargs,
) -> nn.Module:
    """ ``timm.create_model`` for the torch.hub entry points (see ``hub_entrypoint``). """
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {})
        overlay.update(file=str(path))
        if path.is_dir():
            overlay.update(source='local-dir')
        kwargs['pretrained_cfg_overlay'] = overlay
        pretrained = True
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if features_only:
        kwargs['features_only'] = True
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def hub_entrypoint(model_name: str) -> Callable[..., nn.Module]:
    """ A torch.hub entry point for a registered model, documented for ``torch.hub.help``. """
    model_doc = (model_entrypoint(model_name).__doc__ or model_name).strip()
    cfg = get_pretrained_cfg(model_name)
    if cfg is not None and cfg.hf_hub_id:
        weights = f"Hugging Face Hub '{cfg.hf_hub_id}' (timm format, tag {cfg.tag})."
    else:
        weights = 'none registered; pass checkpoint_path.'

    def entry(
            pretrained: bool = False,
            checkpoint_path: Optional[Union[str, Path]] = None,
            num_classes: Optional[int] = None,
            features_only: bool = False,
            **kwargs,
    ) -> nn.Module:
        return create_hub_model(
            model_name, pretrained=pretrained, checkpoint_path=checkpoint_path, num_classes=num_classes,
            features_only=features_only, **kwargs)

    entry.__name__ = entry.__qualname__ = model_name
    entry.__doc__ = model_doc + _HUB_DOC.format(weights=weights, converter=CONVERTER_SCRIPT, name=model_name)
    return entry
