""" Reading weight files and loading them into models: one reader, one filter lookup, one error type.

Every route that takes a weights file ends here: ``timm.create_model(checkpoint_path=...)``,
``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:`` / ``hf-hub:`` sources of dgmn_timm models,
torch.hub's ``checkpoint_path``, the detection / segmentation ``backbone_checkpoint``, the converter
(``python -m dgmn_timm.convert``) and the scripts. A file that cannot be used raises ``CheckpointError``
(a ``ValueError``) or a subclass, with one message that names the file, says what is wrong with it and
what to do, the same on every route.

The reader:

* accepts ``.safetensors`` files, PyTorch files (``.pth`` / ``.pt`` / ``.bin`` / any name) and
  converted folders (``model.safetensors`` or ``pytorch_model.bin`` inside, next to a ``config.json``);
* reads PyTorch files with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` for that
  one call (DeiT-style training checkpoints keep their arguments in one), as timm's loader does;
* unwraps a training checkpoint in this order: ``'model'``, then ``'state_dict'`` (the trained weights),
  or with ``use_ema=True`` ``'model_ema'``, then ``'state_dict_ema'``; a plain state dict is taken as it is;
* strips the ``module.`` / ``_orig_mod.`` wrapper prefixes (timm's ``clean_state_dict``) and keeps the
  ``backbone.`` entries of a detection / segmentation checkpoint, prefix removed.

``import dgmn_timm`` routes timm's own loaders through this module for dgmn_timm models only (see
``install_timm_loaders``; timm's EMA-first default of ``checkpoint_path=`` is not followed for them); other
timm models load exactly as timm loads them.
"""
import argparse
import functools
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'CheckpointNotFoundError', 'CheckpointMismatchError',
    'read_checkpoint', 'read_state_dict', 'unwrap_state_dict', 'load_weights', 'filter_fn_for',
    'architecture_of', 'folder_architecture', 'check_folder_architecture', 'mismatch', 'convert_command',
    'shape_mismatches', 'mismatch_error', 'abbrev', 'is_package_architecture', 'install_timm_loaders',
]

PathLike = Union[str, os.PathLike]
PACKAGE = __name__.split('.')[0]
CONFIG_NAME = 'config.json'
# weights files of a converted (timm / Hugging Face) folder, in the order timm prefers them
FOLDER_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
_MODEL_KEYS = ('model', 'state_dict')
_EMA_KEYS = ('model_ema', 'state_dict_ema')
_BACKBONE_PREFIX = 'backbone.'


class CheckpointError(ValueError):
    """ A weights file cannot be used: the message names the file, the problem and what to do. """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """ The weights file, folder or Hub repo does not exist or cannot be reached. """


class CheckpointMismatchError(CheckpointError, RuntimeError):
    """ The weights were read but do not fit the model (another variant or architecture, wrong shapes).

    Also a RuntimeError, as ``nn.Module.load_state_dict`` raises for the same mistakes.
    """


def convert_command(model_name: str = 'dgmn2_tiny', cache: bool = True) -> str:
    """ The command that turns an authors' released checkpoint into a loadable folder (pip users have it). """
    arch = model_name.split('.')[0]
    name = model_name if '.' in model_name else f'{arch}.in1k'
    cmd = f'python -m {PACKAGE}.convert {arch}.pth --model {name} --output-dir {name}'
    return cmd + ' --to-cache' if cache else cmd


# ---------------------------------------------------------------------------------------------
# Reading


def _weights_file(path: PathLike) -> Path:
    """ The file to read for ``path`` (a file, or the weights file of a converted folder). """
    p = Path(path)
    if p.is_dir():
        for name in FOLDER_WEIGHTS:
            if (p / name).is_file():
                return p / name
        raise CheckpointNotFoundError(
            f'{p} is a folder without a weights file ({" or ".join(FOLDER_WEIGHTS)}). Give a weights file, or a '
            f'folder written by `{convert_command(cache=False)}`.')
    if not p.exists():
        raise CheckpointNotFoundError(
            f'{p} does not exist. Give the path of a weights file (.safetensors, .pth, .pt, .bin) or of a '
            f'converted folder.')
    if not p.is_file():
        raise CheckpointError(f'{p} is not a regular file.')
    if p.stat().st_size == 0:
        raise CheckpointError(f'{p} is empty (0 bytes), not a weights file. Save, download or convert it again.')
    return p


def _file_kind(path: Path) -> str:
    """ 'zip' (torch.save), 'pickle' (legacy torch.save), 'safetensors' or 'other', from the first bytes. """
    with open(path, 'rb') as f:
        head = f.read(9)
    if head.startswith(b'PK'):
        return 'zip'
    if head[:1] == b'\x80':
        return 'pickle'
    if len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < (1 << 32):
        return 'safetensors'
    if path.suffix == '.safetensors' and len(head) < 9:
        return 'safetensors'
    return 'other'


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    detail = ' '.join(f'{type(error).__name__}: {error}'.split()).rstrip(':')
    return CheckpointError(
        f'{path} is truncated or corrupt: it cannot be read ({detail}). Save, download or convert it again.')


def read_checkpoint(path: PathLike, map_location: Any = 'cpu') -> Any:
    """ The object stored in a weights file (a training checkpoint or a state dict), read safely.

    Safetensors files are read with ``safetensors``; PyTorch files with ``torch.load(weights_only=True)``,
    allowing ``argparse.Namespace`` for this call only. A folder stands for its weights file.

    Raises:
        CheckpointNotFoundError: missing file, or a folder without a weights file.
        CheckpointError: empty, truncated or corrupt file, not a weights file, or a pickle that would
            need full (unsafe) unpickling.
    """
    p = _weights_file(path)
    kind = _file_kind(p)
    if kind == 'other':
        raise CheckpointError(
            f'{p} is not a weights file: it is neither a PyTorch checkpoint (torch.save) nor a safetensors file. '
            f'Check the path.')
    if kind == 'safetensors':
        from safetensors.torch import load_file
        try:
            return load_file(str(p), device=str(map_location))
        except Exception as e:  # safetensors raises its own SafetensorError for a bad file
            raise _unreadable(p, e) from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights_only' in str(e) or 'Unsupported global' in str(e):
            unsafe = ''
            try:
                unsafe = ', '.join(g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(p))
                                   if g != 'argparse.Namespace')
            except Exception:
                pass
            raise CheckpointError(
                f'Refusing to read {p}: it holds Python objects other than tensors, containers and '
                f'argparse.Namespace ({unsafe or "unsupported globals"}), which torch.load(weights_only=True) '
                f'blocks because they would need full (unsafe) unpickling. If you trust the file, save its '
                f"weights alone once: torch.save(torch.load(PATH, weights_only=False)['model'], 'weights.pth'), "
                f'and use that.') from e
        raise _unreadable(p, e) from e
    except (RuntimeError, EOFError, ValueError, KeyError, OSError, IndexError, TypeError) as e:
        raise _unreadable(p, e) from e


def unwrap_state_dict(
        checkpoint: Any,
        use_ema: bool = False,
        source: PathLike = 'the checkpoint',
        backbone_only: bool = True,
) -> Dict[str, torch.Tensor]:
    """ The state dict of a training checkpoint (see the module doc for the order), prefixes stripped.

    With ``backbone_only`` (default) a dict with 'backbone.' keys keeps only those, prefix removed.
    """
    from timm.models import clean_state_dict
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{source} holds a {type(checkpoint).__name__}, not a state dict or checkpoint dict.')
    keys = _EMA_KEYS if use_ema else _MODEL_KEYS
    state_dict = next((checkpoint[k] for k in keys if isinstance(checkpoint.get(k), Mapping)), None)
    if state_dict is None:
        if use_ema:
            raise CheckpointError(
                f'{source} has no EMA weights ({" / ".join(_EMA_KEYS)}); load it without use_ema / --use-ema.')
        state_dict = checkpoint
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors or len(tensors) < len(state_dict):
        others = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
        raise CheckpointError(
            f'{source} holds no state dict of tensors (entries that are not tensors: {abbrev(others, 5)}).')
    state_dict = clean_state_dict(tensors)
    if backbone_only and any(k.startswith(_BACKBONE_PREFIX) for k in state_dict):
        state_dict = {k[len(_BACKBONE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(_BACKBONE_PREFIX)}
    return state_dict


def read_state_dict(path: PathLike, use_ema: bool = False, map_location: Any = 'cpu') -> Dict[str, torch.Tensor]:
    """ The weights in a file or converted folder: ``read_checkpoint`` + ``unwrap_state_dict``. """
    return unwrap_state_dict(read_checkpoint(path, map_location=map_location), use_ema=use_ema, source=path)


# ---------------------------------------------------------------------------------------------
# Models


def architecture_of(model: nn.Module) -> Optional[str]:
    """ The registered timm architecture a model (or timm feature wrapper) was built as, if known. """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    arch = cfg.get('architecture')
    return arch if isinstance(arch, str) else None


def filter_fn_for(model_or_arch: Union[nn.Module, str]) -> Optional[Callable]:
    """ The ``checkpoint_filter_fn`` of the module that registers the architecture (timm's convention). """
    from timm.models import is_model, model_entrypoint
    arch = model_or_arch if isinstance(model_or_arch, str) else architecture_of(model_or_arch)
    if not arch or not is_model(arch.split('.')[0]):
        return None
    module = sys.modules.get(model_entrypoint(arch.split('.')[0]).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def folder_architecture(path: PathLike) -> Optional[str]:
    """ The architecture a converted folder's ``config.json`` names (None for files and folders without one). """
    p = Path(path)
    cfg_path = p / CONFIG_NAME if p.is_dir() else None
    if cfg_path is None or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:
        raise CheckpointError(f'{cfg_path} is not a valid JSON config ({e}). Convert the folder again.') from e
    arch = cfg.get('architecture') if isinstance(cfg, dict) else None
    return arch.split('.')[0] if isinstance(arch, str) else None


def check_folder_architecture(path: PathLike, arch: Optional[str]) -> None:
    """ Refuse a converted folder whose config.json names another architecture than ``arch``. """
    folder_arch = folder_architecture(path)
    if arch and folder_arch and folder_arch != arch.split('.')[0]:
        raise CheckpointMismatchError(
            f'{path} holds weights for {folder_arch} (named by its {CONFIG_NAME}) but the model is '
            f"{arch.split('.')[0]}. Load the folder as it is with timm.create_model('local-dir:{path}', "
            f'pretrained=True), or give {arch.split(".")[0]} weights converted for it.')


def mismatch(path: PathLike, error: BaseException) -> CheckpointMismatchError:
    """ The error for weights that were read from ``path`` but do not fit the model. """
    return CheckpointMismatchError(f'{path}: {error}')


def load_weights(
        model: nn.Module,
        path: PathLike,
        strict: bool = True,
        use_ema: bool = False,
) -> Any:
    """ Weights file (or converted folder) -> model, through the architecture's ``checkpoint_filter_fn``.

    Reads with ``read_state_dict``, maps the keys with the filter of the module that registers the
    model's architecture (the authors' released layout, a 'backbone.' prefix), and loads with
    ``model.load_state_dict(strict=strict)``.

    Returns:
        What ``model.load_state_dict`` returns (missing and unexpected keys when not strict).

    Raises:
        CheckpointError / CheckpointNotFoundError: the file cannot be read (see ``read_checkpoint``).
        CheckpointMismatchError: the weights do not fit the model (the message names the file, the
            variant or architecture they are for, and the offending keys).
    """
    arch = architecture_of(model)
    check_folder_architecture(path, arch)
    state_dict = read_state_dict(path, use_ema=use_ema)
    filter_fn = filter_fn_for(model)
    try:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        raise mismatch(path, e) from e


# ---------------------------------------------------------------------------------------------
# Describing a state dict that does not fit


def abbrev(items: Sequence[str], n: int = 8) -> str:
    """ The first ``n`` items, comma-separated, with a count of the rest. """
    items = list(items)
    more = f', ... (+{len(items) - n} more)' if len(items) > n else ''
    return ', '.join(items[:n]) + more


def shape_mismatches(
        state_dict: Mapping[str, Any],
        own: Mapping[str, torch.Tensor],
        skip: Collection[str] = (),
) -> List[str]:
    """ 'key: checkpoint (shape) vs model (shape)' for every tensor whose shape differs from the model's. """
    return [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items()
        if k in own and k not in skip and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]


def mismatch_error(
        title: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
        missing_label: str = 'Missing keys',
) -> CheckpointMismatchError:
    """ An error whose one-line message lists the missing, unexpected and mis-shaped keys after ``title``. """
    msg = []
    if missing:
        msg.append(f'{missing_label} ({len(missing)}): {abbrev(missing)}')
    if unexpected:
        msg.append(f'Unexpected keys ({len(unexpected)}): {abbrev(unexpected)}')
    if mismatched:
        msg.append(f'Shape mismatches ({len(mismatched)}): {abbrev(mismatched)}')
    return CheckpointMismatchError(f'{title} ' + '; '.join(msg))


# ---------------------------------------------------------------------------------------------
# timm's loaders, for this package's models


def is_package_architecture(arch: Optional[str]) -> bool:
    """ Whether ``arch`` (optionally with a tag) is registered by a module of this package. """
    from timm.models import is_model, model_entrypoint
    name = (arch or '').split('.')[0]
    if not name or not is_model(name):
        return False
    module = model_entrypoint(name).__module__
    return module == PACKAGE or module.startswith(PACKAGE + '.')


def _wrap_load_pretrained(original: Callable) -> Callable:
    """ timm's ``load_pretrained``, reading this package's weights with ``read_state_dict``.

    Files, folders and Hub repos are read here (clear errors, the Hub asked without retries); timm's
    ``load_pretrained`` then does the rest from the state dict (filter, input conv, classifier).
    """
    @functools.wraps(original)
    def load_pretrained(model, pretrained_cfg=None, num_classes=1000, in_chans=3, filter_fn=None, strict=True,
                        cache_dir=None):
        cfg = pretrained_cfg or getattr(model, 'pretrained_cfg', None) or {}
        arch = cfg.get('architecture')
        if not is_package_architecture(arch):
            return original(model, pretrained_cfg, num_classes, in_chans, filter_fn, strict, cache_dir)
        from timm.models._builder import _resolve_pretrained_source
        load_from, location = _resolve_pretrained_source(cfg)
        if load_from in ('file', 'local-dir'):
            path = location
            check_folder_architecture(path, arch)
        elif load_from == 'hf-hub':
            from .hub import hub_weights_file
            repo_id, filename = location if isinstance(location, (tuple, list)) else (location, None)
            path = hub_weights_file(repo_id, filename, cache_dir=cache_dir, model_name=_tagged(arch, cfg.get('tag')))
        elif load_from == '':
            name = _tagged(arch, cfg.get('tag'))
            raise CheckpointNotFoundError(
                f'No pretrained weights are registered for {name}. Use pretrained=False, or give weights with '
                f"checkpoint_path=PATH or timm.create_model('local-dir:FOLDER', pretrained=True).")
        else:  # a state dict or a url: timm's own business
            return original(model, pretrained_cfg, num_classes, in_chans, filter_fn, strict, cache_dir)
        try:
            state_dict = read_state_dict(path)
        except CheckpointError as e:
            if load_from != 'hf-hub':
                raise
            raise type(e)(f"{e} (It is the cached copy of the Hugging Face Hub repo '{repo_id}': delete it, then "
                          f'download it again or run `{convert_command(_tagged(arch, cfg.get("tag")))}`.)') from e
        cfg = dict(cfg, state_dict=state_dict, source='', file=None)
        try:
            return original(model, cfg, num_classes, in_chans, filter_fn, strict, cache_dir)
        except RuntimeError as e:
            raise mismatch(path, e) from e
    return load_pretrained


def _wrap_load_checkpoint(original: Callable) -> Callable:
    """ timm's ``load_checkpoint`` (``create_model(checkpoint_path=...)``), as ``load_weights`` for this package.

    timm's ``use_ema`` default (True) is not followed: the trained weights load, as on every other route.
    """
    @functools.wraps(original)
    def load_checkpoint(model, checkpoint_path, use_ema=True, device='cpu', strict=True, remap=False, filter_fn=None,
                        weights_only=True):
        if remap or filter_fn is not None or not weights_only or not is_package_architecture(architecture_of(model)):
            return original(model, checkpoint_path, use_ema, device, strict, remap, filter_fn, weights_only)
        return load_weights(model, checkpoint_path, strict=strict)
    return load_checkpoint


def _wrap_config_from_hf(original: Callable) -> Callable:
    """ timm's ``load_model_config_from_hf`` (``hf-hub:`` names): this package's repos fail fast and clearly. """
    @functools.wraps(original)
    def load_model_config_from_hf(model_id, cache_dir=None, **kwargs):
        from .hub import hub_file, is_package_repo
        if is_package_repo(model_id):
            hub_file(model_id, (CONFIG_NAME,), cache_dir=cache_dir)
        return original(model_id, cache_dir=cache_dir, **kwargs)
    return load_model_config_from_hf


def _wrap_config_from_path(original: Callable) -> Callable:
    """ timm's ``load_model_config_from_path`` (``local-dir:`` names), with the reader's message for a missing folder. """
    @functools.wraps(original)
    def load_model_config_from_path(model_path, **kwargs):
        p = Path(model_path)
        if not p.is_dir():
            raise CheckpointNotFoundError(
                f'{p} is not a folder. local-dir: takes a folder with {CONFIG_NAME} and model.safetensors, written by '
                f'`{convert_command(cache=False)}` or timm.models.save_for_hf.')
        if not (p / CONFIG_NAME).is_file():
            raise CheckpointNotFoundError(
                f'{p} has no {CONFIG_NAME}. local-dir: takes a folder written by `{convert_command(cache=False)}` or '
                f'timm.models.save_for_hf; load a bare weights file with checkpoint_path=.')
        return original(model_path, **kwargs)
    return load_model_config_from_path


def _tagged(arch: Optional[str], tag: Optional[str]) -> str:
    return f'{arch}.{tag}' if tag else str(arch)


def install_timm_loaders() -> None:
    """ Route timm's weight loading for this package's models through this module (once; idempotent).

    Replaces, in timm's own modules, the functions ``timm.create_model`` calls to load weights:
    ``load_pretrained`` (pretrained tags, ``pretrained_cfg_overlay=dict(file=...)``, ``local-dir:``,
    ``hf-hub:``), ``load_checkpoint`` (``checkpoint_path=``) and the two config readers of ``hf-hub:`` /
    ``local-dir:``. For models registered outside this package each one calls timm's original unchanged
    (the ``local-dir:`` reader only adds a message for a missing folder). Nothing in torch is changed.
    """
    from timm.models import _builder, _factory
    if getattr(_builder.load_pretrained, '__wrapped__', None) is not None:
        return
    _builder.load_pretrained = _wrap_load_pretrained(_builder.load_pretrained)
    _factory.load_checkpoint = _wrap_load_checkpoint(_factory.load_checkpoint)
    _factory.load_model_config_from_hf = _wrap_config_from_hf(_factory.load_model_config_from_hf)
    _factory.load_model_config_from_path = _wrap_config_from_path(_factory.load_model_config_from_path)
