""" Reading weight files and loading them into models: the one reader of dgmn_timm.

Every route of this package that takes a weights file ends here: ``dgmn_timm.load_weights``,
``create_with_weights`` (torch.hub's ``checkpoint_path`` and ``pretrained``, the detection / segmentation
``backbone_checkpoint`` / ``pretrained_file``, the scripts' ``--checkpoint`` and ``--pretrained``) and the
converter (``python -m dgmn_timm.convert``). A file that cannot be used raises ``CheckpointError`` (a
``ValueError``) or a subclass (``dgmn_timm.errors``), with one line that names the file, says what is
wrong with it and what to do, the same on every route.

The reader:

* accepts ``.safetensors`` files, PyTorch files (``.pth`` / ``.pt`` / ``.bin`` / any name) and
  converted folders (``model.safetensors`` or ``pytorch_model.bin`` inside, next to a ``config.json``);
* reads PyTorch files with ``torch.load(weights_only=True)``, allowing ``argparse.Namespace`` for that
  one call (DeiT-style training checkpoints keep their arguments in one);
* unwraps a training checkpoint in this order: ``'model'``, then ``'state_dict'`` (the trained weights),
  or with ``use_ema=True`` ``'model_ema'``, then ``'state_dict_ema'``; a plain state dict is taken as it is;
* strips the ``module.`` / ``_orig_mod.`` wrapper prefixes (timm's ``clean_state_dict``) and keeps the
  ``backbone.`` entries of a detection / segmentation checkpoint, prefix removed.

Loading goes through timm's own ``load_pretrained`` (the architecture's ``checkpoint_filter_fn``, the
input-conv adaptation), before any feature wrapper is built, as timm's builder does. timm's own routes
(``timm.create_model(checkpoint_path=...)``, ``pretrained=True``, ``pretrained_cfg_overlay=dict(file=...)``)
are timm's: importing dgmn_timm changes nothing in them.
"""
import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import (
    CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, abbrev, mismatch, mismatch_error,
    shape_mismatches,
)

__all__ = [
    'read_checkpoint', 'read_state_dict', 'unwrap_state_dict', 'load_weights', 'load_state_dict_into', 'fit_state_dict',
    'create_with_weights', 'classifier_rows', 'filter_fn_for', 'architecture_of', 'folder_architecture',
    'check_folder_architecture', 'convert_command',
]

PathLike = Union[str, os.PathLike]
PACKAGE = __name__.split('.')[0]
CONFIG_NAME = 'config.json'
# weights files of a converted (timm / Hugging Face) folder, in the order timm prefers them
FOLDER_WEIGHTS = ('model.safetensors', 'pytorch_model.bin')
_MODEL_KEYS = ('model', 'state_dict')
_EMA_KEYS = ('model_ema', 'state_dict_ema')
_BACKBONE_PREFIX = 'backbone.'


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


def _first_convs(cfg: Mapping[str, Any]) -> Sequence[str]:
    first = cfg.get('first_conv')
    return (first,) if isinstance(first, str) else tuple(first or ())


def _classifiers(cfg: Mapping[str, Any]) -> Sequence[str]:
    classifier = cfg.get('classifier')
    return (classifier,) if isinstance(classifier, str) else tuple(classifier or ())


def classifier_rows(model_name: str, state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """ Rows of the classifier weight (timm's pretrained-cfg ``classifier`` name) in a state dict, if any. """
    from timm.models import get_pretrained_cfg_value
    try:
        cfg = dict(classifier=get_pretrained_cfg_value(model_name, 'classifier'))
    except Exception:  # no pretrained cfg for this name
        return None
    for name in _classifiers(cfg):
        weight = state_dict.get(f'{name}.weight')
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            return int(weight.shape[0])
    return None


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> Dict[str, torch.Tensor]:
    """ ``state_dict`` mapped by the architecture's ``checkpoint_filter_fn`` and checked against ``model``.

    The filter maps the authors' released layout and refuses another variant; then every missing,
    unexpected (with ``strict``) and mis-shaped key is reported in one ``CheckpointMismatchError`` line
    naming the architecture. The input conv's shape is left to timm's ``load_pretrained`` (another in_chans).
    """
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    model_filter = filter_fn_for(model)
    out = dict(model_filter(state_dict, model) if model_filter is not None else state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in out]
    unexpected = [k for k in out if k not in own]
    mismatched = shape_mismatches(out, own, skip={f'{c}.weight' for c in _first_convs(cfg)})
    if mismatched or (strict and (missing or unexpected)):
        arch = cfg.get('architecture') or type(model).__name__
        raise mismatch_error(f'The weights do not fit {arch}:', missing, unexpected, mismatched)
    return out


def load_state_dict_into(
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        source: Any = 'the state dict',
        strict: bool = True,
) -> None:
    """ A state dict (as the reader returns it) -> ``model``, with timm's ``load_pretrained``.

    timm runs ``fit_state_dict`` as the filter (the architecture's ``checkpoint_filter_fn`` and one-line
    errors naming ``source``, the architecture and the keys) and adapts the input conv to the model's channels.

    Raises:
        CheckpointMismatchError: the weights do not fit the model.
    """
    from timm.models import load_pretrained
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    in_chans = 3
    for name in _first_convs(cfg):
        try:
            in_chans = model.get_submodule(name).in_channels
        except AttributeError:
            pass
    # the state dict as timm's source, and the model's own head size: nothing dropped, nothing re-initialised
    cfg.update(source='', state_dict=dict(state_dict), num_classes=getattr(model, 'num_classes', 0), label_offset=0)
    try:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=cfg['num_classes'], in_chans=in_chans,
                        filter_fn=lambda sd, m: fit_state_dict(m, sd, strict=strict), strict=strict)
    except RuntimeError as e:
        raise mismatch(source, e) from e


def load_weights(
        model: nn.Module,
        path: PathLike,
        strict: bool = True,
        use_ema: bool = False,
) -> None:
    """ Weights file (or converted folder) -> a model you already have (not a feature wrapper).

    Reads with ``read_state_dict`` and loads with ``load_state_dict_into``.

    Raises:
        CheckpointError / CheckpointNotFoundError: the file cannot be read (see ``read_checkpoint``).
        CheckpointMismatchError: the weights do not fit the model (the message names the file, the
            variant or architecture they are for, and the offending keys).
    """
    check_folder_architecture(path, architecture_of(model))
    load_state_dict_into(model, read_state_dict(path, use_ema=use_ema), path, strict=strict)


def create_with_weights(
        model_name: str,
        path: PathLike,
        num_classes: Optional[int] = None,
        use_ema: bool = False,
        features_only: bool = False,
        **kwargs,
) -> nn.Module:
    """ ``timm.create_model(model_name, **kwargs)`` holding the weights of a file, read by this module.

    The model is built with the file's classifier (none for a backbone-only file) and loaded strictly;
    with ``num_classes`` of another size its classifier is then replaced (a new head on the trained
    weights). With ``features_only`` the weights are loaded into the model before timm wraps it
    (``out_indices`` and the other feature options go in ``kwargs``).

    Raises:
        CheckpointError (and subclasses): the file cannot be read or does not fit the model.
    """
    from timm import create_model, is_model
    from timm.models import split_model_name_tag
    arch = split_model_name_tag(model_name)[0]
    check_folder_architecture(path, arch if is_model(arch) else None)
    state_dict = read_state_dict(path, use_ema=use_ema)
    rows = classifier_rows(model_name, state_dict)
    feature_kwargs = {k: kwargs.pop(k) for k in ('out_indices', 'feature_cls', 'output_fmt') if k in kwargs}
    model = create_model(model_name, num_classes=rows or 0, **kwargs)
    load_state_dict_into(model, state_dict, path)
    del state_dict
    if features_only:
        # timm's builder loads before it wraps: give it the loaded weights as its state-dict source
        overlay = dict(kwargs.pop('pretrained_cfg_overlay', None) or {}, state_dict=model.state_dict())
        features = create_model(model_name, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay,
                                **feature_kwargs, **kwargs)
        features.pretrained_cfg.pop('state_dict', None)
        return features
    if num_classes is not None and num_classes != (rows or 0):
        model.reset_classifier(num_classes)
    return model
