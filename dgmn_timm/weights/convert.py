""" Convert a DGMN checkpoint (the authors' release, or a run of ours) into a Hugging Face Hub folder in timm's format.

    python -m dgmn_timm.convert dgmn2_tiny.pth --model dgmn2_tiny.in1k --output-dir dgmn2_tiny.in1k
    python -m dgmn_timm.convert dgmn2_tiny.pth --model dgmn2_tiny.in1k --output-dir dgmn2_tiny.in1k --to-cache
    python -m dgmn_timm.convert retinanet_dgmn2_tiny.pth --model dgmn2_tiny --output-dir dgmn2_tiny.coco
    python -m dgmn_timm.convert output/run/best.safetensors --model dgmn2_tiny --output-dir dgmn2_tiny.flowers

The checkpoint is read with dgmn_timm.weights.checkpoints (torch.load(weights_only=True)), mapped strictly to the
model, checked with a forward pass, and written as model.safetensors, config.json (timm's save_for_hf,
loadable by Hugging Face transformers too) and a README.md model card; the folder is then reloaded and must
reproduce the output exactly. Detection / segmentation checkpoints ('backbone.'-prefixed, no head) give a
backbone-only folder (num_classes 0). The folder says what the checkpoint is: the authors' ImageNet
checkpoints (their key layout and a 1000-class head) get the paper's provenance, numbers and the tag in1k;
a fine-tuned run of ours (python -m dgmn_timm.finetune: the safetensors metadata, args.json and summary.json
of its run folder) gets its class names (config.json label_names), input size, metrics and the tag ft;
anything else only its file. --to-cache also places the folder in the local Hugging Face cache
(HF_HUB_CACHE / HF_HOME) under the model's Hub id, so that
timm.create_model('dgmn2_tiny.in1k', pretrained=True) works offline (HF_HUB_OFFLINE=1).
"""
import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn

import timm
from timm.models import get_pretrained_cfg, save_for_hf, split_model_name_tag

from ..errors import CheckpointError, mismatch
from .checkpoints import (
    CONFIG_NAME, check_folder_architecture, filter_fn_for, fit_state_dict, read_checkpoint, unwrap_state_dict,
)
from .hub import README_NAME, WEIGHTS_NAME, _sha256, check_repo_for, package_models, place_in_cache, write_model_card

__all__ = ['ConversionResult', 'convert_checkpoint', 'main']


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
    authors: bool = False  # recognised as the authors' released checkpoint
    run: Optional[Dict[str, Any]] = None  # the record of a fine-tuning run of ours


def _registered_cfg(name: str) -> Optional[Any]:
    try:
        return get_pretrained_cfg(name)
    except RuntimeError:
        return None


def _build_with_weights(model_name: str, released: Dict[str, torch.Tensor], **kwargs) -> nn.Module:
    """ ``model_name`` holding exactly the released weights (``fit_state_dict``: strict, one-line errors),
    built on the meta device when it supports that. """
    try:
        with torch.device('meta'):
            model = timm.create_model(model_name, pretrained=False, **kwargs)
    except Exception:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    state_dict = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                  for k, v in fit_state_dict(model, released).items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        model.load_state_dict(state_dict, strict=True)
    return model


def _write_folder(model: nn.Module, folder: Path, tag: str, run: Optional[Dict[str, Any]] = None) -> None:
    """ timm's save_for_hf, with a config.json transformers also reads (no num_classes among model_args).

    A run's class names become the config's ``label_names`` and its input size the ``input_size``.
    """
    pretrained_cfg: Dict[str, Any] = dict(tag=tag)
    model_config: Dict[str, Any] = dict(pretrained_cfg=pretrained_cfg)
    if run is not None:
        if run.get('input_size'):
            pretrained_cfg['input_size'] = tuple(int(v) for v in run['input_size'])
        if run.get('classes'):
            model_config['label_names'] = [str(c) for c in run['classes']]
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True)
    path = folder / CONFIG_NAME
    cfg = json.loads(path.read_text(encoding='utf-8'))
    # transformers' TimmWrapper passes num_classes itself (from the top-level entry): a second one in
    # model_args makes create_model fail; timm reads it from the top level as well
    (cfg.get('model_args') or {}).pop('num_classes', None)
    path.write_text(json.dumps(cfg, indent=2), encoding='utf-8')


_RUN_FORMAT = 'dgmn-timm finetune'  # the safetensors metadata 'format' of python -m dgmn_timm.finetune
_RELEASED_MARKER = 'patch_embed1.conv1.weight'  # a key of the authors' released DGMN2 layout


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _json_value(value: Any) -> Any:
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


def run_record(checkpoint_path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """ What a fine-tuning run of ours recorded about a weights file, or None for other files.

    A run is recognised by the safetensors metadata that ``python -m dgmn_timm.finetune`` writes, or by
    the run folder's ``args.json`` with the run's classes. Returns the classes, input size, epoch, weights
    (model / EMA) and the best validation metrics (``summary.json``) that are known.
    """
    path = Path(checkpoint_path)
    meta: Dict[str, Any] = {}
    if path.is_file() and path.suffix == '.safetensors':
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework='pt') as f:
                meta = {k: _json_value(v) for k, v in (f.metadata() or {}).items()}
        except Exception:  # the reader has already said what is wrong with an unreadable file
            meta = {}
    folder = path if path.is_dir() else path.parent
    args = _read_json(folder / 'args.json') or {}
    summary = _read_json(folder / 'summary.json') or {}
    if meta.get('format') != _RUN_FORMAT and not args.get('classes'):
        return None
    record: Dict[str, Any] = dict(
        classes=meta.get('classes') or args.get('classes') or summary.get('classes'),
        input_size=meta.get('input_size') or summary.get('input_size'),
        epoch=meta.get('epoch'), weights=meta.get('weights'))
    if not record['input_size'] and args.get('img_size'):
        record['input_size'] = [3, int(args['img_size']), int(args['img_size'])]
    if summary:
        record.update(val_top1=summary.get('val_top1'), val_top5=summary.get('val_top5'))
        record['epoch'] = record['epoch'] or summary.get('best_epoch')
    return record


def convert_checkpoint(
        checkpoint_path: Union[str, Path],
        model_name: str,
        output_dir: Union[str, Path],
        tag: Optional[str] = None,
        use_ema: bool = False,
        check_size: Optional[int] = None,
        to_cache: bool = False,
        repo_id: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        overwrite: bool = False,
        verify: bool = True,
        verbose: bool = False,
) -> ConversionResult:
    """ Convert a checkpoint (the authors' release, a run of ours) into a Hub-ready timm folder.

    Reads the checkpoint with ``dgmn_timm.weights.checkpoints``, maps it to ``model_name`` (strict: every
    released tensor used and every model tensor filled; a detection / segmentation checkpoint keeps its
    backbone and the rest is reported in ``ignored_keys``), runs one forward pass, writes
    ``model.safetensors``, ``config.json`` and a ``README.md`` card (first into a hidden sibling folder,
    then moved in), reloads the folder through ``timm.create_model('local-dir:...')`` and checks it
    reproduces the output exactly.

    Args:
        checkpoint_path: the released ``.pth`` file, a run's ``best.safetensors`` (or any weights file
            ``read_checkpoint`` takes).
        model_name: registered architecture, optionally with tag (``dgmn2_tiny`` or ``dgmn2_tiny.in1k``).
        output_dir: folder to write (must be empty or absent unless ``overwrite``).
        tag: pretrained tag recorded in the config (default: the tag of ``model_name``, else 'in1k' for the
            authors' ImageNet checkpoints, 'backbone' for a checkpoint without head, 'ft' for other classifiers).
        use_ema: convert the EMA weights ('model_ema' / 'state_dict_ema') instead of 'model'.
        check_size: image size of the sanity-check forward pass (default: a run's input size, else 224).
        to_cache: also place the folder into the local Hugging Face cache under ``repo_id``.
        repo_id: Hub id for the cache and the model card (default: the model's registered ``hf_hub_id``).
        cache_dir: Hugging Face cache to use (default: ``HF_HUB_CACHE`` / ``HF_HOME``).
        overwrite: replace the files of an existing, non-empty ``output_dir``.
        verify: reload the written folder and require the exact same output.
        verbose: print a summary.

    Raises:
        CheckpointError (and subclasses): the checkpoint cannot be read or does not fit the model.
        ValueError: an unknown model, or no Hub id for ``to_cache``.
        FileExistsError: ``output_dir`` holds files and ``overwrite`` is not set.
    """
    checkpoint_path = Path(checkpoint_path)
    output_dir = Path(output_dir)
    architecture, name_tag = split_model_name_tag(model_name)
    if not timm.is_model(architecture):
        raise ValueError(f'Unknown model {architecture!r}; registered dgmn_timm models: {", ".join(package_models())}')
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f'{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.')

    check_folder_architecture(checkpoint_path, architecture)
    checkpoint = read_checkpoint(checkpoint_path)
    full = unwrap_state_dict(checkpoint, use_ema=use_ema, source=checkpoint_path, backbone_only=False)
    released = unwrap_state_dict(full, source=checkpoint_path)
    info: Dict[str, Any] = {}
    if isinstance(checkpoint, dict):  # a training checkpoint's provenance, for the model card
        if isinstance(checkpoint.get('epoch'), int):
            info['epoch'] = checkpoint['epoch']
        args = checkpoint.get('args')
        if isinstance(args, argparse.Namespace):
            info['args'] = dict(vars(args))
    del checkpoint
    run = run_record(checkpoint_path)

    filter_fn = filter_fn_for(architecture)
    try:
        mapped = dict(filter_fn(released, None)) if filter_fn is not None else dict(released)
    except RuntimeError as e:
        raise mismatch(checkpoint_path, e) from e
    kept = {id(v) for v in mapped.values()}
    ignored = sorted(k for k, v in full.items() if id(v) not in kept)

    default_cfg = get_pretrained_cfg(architecture)
    classifier = (default_cfg.classifier if default_cfg is not None else None) or 'head'
    classifier = classifier if isinstance(classifier, str) else classifier[0]
    head_weight = mapped.get(classifier + '.weight')
    num_classes = int(head_weight.shape[0]) if head_weight is not None else 0

    # the paper's provenance only for what the authors released: their layout, ImageNet's 1000 classes or no head
    authors = run is None and any(k.endswith(_RELEASED_MARKER) for k in released) and num_classes in (0, 1000)
    if run is not None and run.get('classes') and len(run['classes']) != num_classes:
        raise CheckpointError(
            f'{checkpoint_path} has a {num_classes}-class head but its run records {len(run["classes"])} classes; '
            f'convert the weights file of that run.')
    tag = tag or name_tag or ('backbone' if not num_classes else 'in1k' if authors else 'ft')
    if repo_id is None and authors:
        cfg = _registered_cfg(f'{architecture}.{tag}')
        repo_id = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id and num_classes else None
    if to_cache:
        if repo_id is None:
            raise ValueError(
                f'No Hub id to cache {output_dir} under: {architecture}.{tag} has no registered hf_hub_id '
                f"(a backbone-only folder never takes the ImageNet classifier's id); pass repo_id (--repo-id).")
        check_repo_for(f'{checkpoint_path}', architecture, num_classes, repo_id)

    try:
        # a tag of the name that is not registered (e.g. 'dgmn2_tiny.coco') only names the folder's tag
        build_name = model_name if _registered_cfg(model_name) is not None else architecture
        model = _build_with_weights(build_name, released, num_classes=num_classes)
    except RuntimeError as e:
        raise mismatch(checkpoint_path, e) from e
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f'{checkpoint_path} has non-finite values in {", ".join(bad[:5])}.')

    model.eval()
    g = torch.Generator().manual_seed(0)
    if check_size is None:
        check_size = int(run['input_size'][-1]) if run is not None and run.get('input_size') else 224
    x = torch.randn(1, int(getattr(model, 'in_chans', 3)), check_size, check_size, generator=g)
    with torch.inference_mode():
        out = model(x)
    expected = (1, num_classes or model.num_features)
    if tuple(out.shape) != expected or not torch.isfinite(out).all():
        raise CheckpointError(
            f'Sanity check failed: {architecture} on a {check_size}x{check_size} input gave '
            f'{tuple(out.shape)} (expected {expected}), finite={bool(torch.isfinite(out).all())}.')

    partial = output_dir.parent / f'.{output_dir.name}.partial'
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _write_folder(model, partial, tag, run)
        write_model_card(partial, repo_id=repo_id, ignored_keys=ignored, folder_name=output_dir.name,
                         source=dict(file=checkpoint_path.name, sha256=_sha256(checkpoint_path), **info),
                         authors=authors, run=run)
        output_dir.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME, README_NAME):
            os.replace(partial / name, output_dir / name)
    finally:
        shutil.rmtree(partial, ignore_errors=True)

    if verify:
        reloaded = timm.create_model(f'local-dir:{output_dir.resolve()}', pretrained=True).eval()
        with torch.inference_mode():
            out_reloaded = reloaded(x)
        if not torch.equal(out, out_reloaded):
            raise CheckpointError(
                f'{output_dir} does not reproduce the converted model (max abs diff '
                f'{(out - out_reloaded).abs().max().item():.3g}).')

    result = ConversionResult(
        model=model, output_dir=output_dir, architecture=architecture, tag=tag, num_classes=num_classes,
        check_input=x, check_output=out, ignored_keys=ignored, repo_id=repo_id, verified=verify, authors=authors,
        run=run)
    if to_cache:
        result.cache_path = place_in_cache(output_dir, repo_id, cache_dir=cache_dir)
    if verbose:
        print(_summary(checkpoint_path, result, len(full)))
    return result


def _summary(checkpoint_path: Path, result: ConversionResult, num_released: int) -> str:
    lines = [
        f'Converted {checkpoint_path} ({num_released} tensors) -> {result.architecture}.{result.tag}, '
        f'num_classes={result.num_classes}',
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


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.strip().splitlines()
    parser = argparse.ArgumentParser(
        prog='python -m dgmn_timm.convert', description=doc[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog='\n'.join(doc[1:]))
    parser.add_argument('checkpoint', help="the authors' released .pth file, or a run's best.safetensors")
    parser.add_argument('--model', required=True, help='registered model name, optionally with tag (dgmn2_tiny.in1k)')
    parser.add_argument('--output-dir', required=True, help='folder to write (empty or absent unless --overwrite)')
    parser.add_argument('--tag', default=None, help="pretrained tag (default: from --model, else 'in1k' for the "
                                                    "authors' ImageNet checkpoints, 'backbone' for a checkpoint "
                                                    "without head, 'ft' for other classifiers)")
    parser.add_argument('--use-ema', action='store_true', help="convert the EMA weights ('model_ema') instead of 'model'")
    parser.add_argument('--check-size', type=int, default=None,
                        help="image size of the sanity-check forward pass (default: a run's input size, else 224)")
    parser.add_argument('--to-cache', action='store_true', help='also place the folder into the local HF cache')
    parser.add_argument('--repo-id', default=None, help="Hub id for the cache and the model card (default: the "
                                                        "model's registered hf_hub_id)")
    parser.add_argument('--cache-dir', default=None, help='Hugging Face cache (default: HF_HUB_CACHE / HF_HOME)')
    parser.add_argument('--overwrite', action='store_true', help='replace the files of an existing output folder')
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        convert_checkpoint(
            args.checkpoint, args.model, args.output_dir, tag=args.tag, use_ema=args.use_ema,
            check_size=args.check_size, to_cache=args.to_cache, repo_id=args.repo_id, cache_dir=args.cache_dir,
            overwrite=args.overwrite, verbose=True)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
