#!/usr/bin/env python3
""" Extract per-image features with any registered timm model (DGMN2 included).

    dgmn-extract-features IMAGES/ --model dgmn2_small --pretrained --output feats.safetensors
    python -m dgmn_timm.extract_features list.txt --checkpoint OUT/best.safetensors --levels 0,1,2,3 --output pyr.npy
    torchrun --nproc_per_node 4 -m dgmn_timm.extract_features IMAGES/ --pretrained --output feats.safetensors

INPUT is a folder (searched recursively, natural order) or a list file (one image path a line,
relative to the list file). By default each image gives its pooled embedding,
``forward_head(features, pre_logits=True)``; ``--levels 0,1,2,3`` gives the pyramid levels
instead (globally average-pooled, or the full maps with ``--maps``).

Output: a .safetensors file (tensors ``features`` or ``level0``, ``level1``, ...; metadata
holds the image paths) or .npy files (one per level: OUT.level0.npy, ...), plus a JSON sidecar
(OUT with .json) listing the image paths in row order and any unreadable images (skipped).
Work is written in chunks under OUT.parts/ and merged at the end, so an interrupted run
continues where it stopped when started again with the same arguments; under torchrun the
chunks are shared out over the processes.
"""
import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from timm.data import create_transform, resolve_data_config

from dgmn_timm.errors import DataDirError
from dgmn_timm.tools.data import SafeImageDataset, collate_skip, list_images
from dgmn_timm.tools.cli import HelpFormatter, UsageError, add_run_args, check_model_args, \
    check_positive, clear_run_files, run_cli, set_threads
from dgmn_timm.tools.engine import atomic_path, atomic_write_text, autocast, barrier, create_model, init_distributed, resolve_amp_dtype

_logger = logging.getLogger('extract_features')

FORMATS = ('.safetensors', '.npy')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument('input', help='folder of images (recursive) or a list file with one image path per line')
    p.add_argument('--output', required=True, metavar='FILE', help='output file, .safetensors or .npy')
    p.add_argument('--model', default='dgmn2_tiny', help='registered model name')
    p.add_argument('--pretrained', nargs='?', const=True, default=None, metavar='TAG',
                   help='pretrained weights (the default tag, or the one given)')
    p.add_argument('--checkpoint', default=None, metavar='FILE', help='weights file (any format the model loads)')
    p.add_argument('--levels', default=None, help='pyramid levels to extract, e.g. 0,1,2,3 (default: pooled embedding)')
    p.add_argument('--maps', action='store_true',
                   help='keep full (C, H, W) maps instead of pooling (with --levels: per level; '
                        'without: the unpooled forward_features output)')
    p.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s, 224)')
    p.add_argument('--crop-pct', type=float, default=None, help='centre-crop fraction (default: the model\'s)')
    p.add_argument('--batch-size', type=int, default=64, help='images per forward pass')
    p.add_argument('--chunk-size', type=int, default=1024, help='images per saved chunk (the unit of resuming)')
    p.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 on CPU, float16 on GPU)')
    p.add_argument('--amp-dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='autocast dtype of --amp (auto: bfloat16 on CPU, float16 on GPU)')
    g = add_run_args(p, seed=None, resume=False)
    g.add_argument('--resume', action='store_true',
                   help='continue an interrupted extraction from the chunks saved in OUTPUT.parts/')
    return p


def parse_levels(text: Optional[str]) -> Optional[List[int]]:
    """ The sorted levels of ``--levels`` (None without it); ``UsageError`` unless comma-separated integers. """
    if text is None:
        return None
    try:
        levels = sorted({int(v) for v in text.split(',') if v.strip()})
    except ValueError:
        raise UsageError(f'--levels takes comma-separated integers, got {text!r}') from None
    if not levels:
        raise UsageError(f'--levels names no level, got {text!r}')
    return levels


def compute_features(model, x: torch.Tensor, levels: Optional[List[int]] = None, maps: bool = False
                     ) -> Dict[str, torch.Tensor]:
    """ Features of a batch: {'features': ...} or {'level0': ..., ...} (pooled unless ``maps``). """
    if levels is None:
        feats = model.forward_features(x)
        return {'features': feats if maps else model.forward_head(feats, pre_logits=True)}
    inter = model.forward_intermediates(x, indices=levels, intermediates_only=True)
    return {f'level{lv}': f if maps else f.mean(dim=(-2, -1)) for lv, f in zip(levels, inter)}


def output_files(output: str, levels: Optional[List[int]]) -> List[str]:
    """ The files a finished extraction writes (features, then the JSON sidecar). """
    stem, ext = os.path.splitext(output)
    if ext not in FORMATS:
        raise UsageError(f'--output must end in {" or ".join(FORMATS)}, got {output}')
    files = [output] if ext == '.safetensors' or levels is None or len(levels) == 1 else [
        f'{stem}.level{lv}.npy' for lv in levels]
    return files + [stem + '.json']


def check_previous(args, files: List[str], parts_dir: str) -> List[str]:
    """ The no-overwrite rule for one output file: returns what ``--overwrite`` deletes. """
    if args.resume and args.overwrite:
        raise UsageError('give --resume or --overwrite, not both')
    finished = [f for f in files if os.path.exists(f)]
    unfinished = os.path.isdir(parts_dir)
    if args.overwrite:
        return finished + ([parts_dir] if unfinished else [])
    if finished and not (args.resume and unfinished):
        raise UsageError(f'{", ".join(finished)} already exist(s) (a previous extraction); replace with --overwrite '
                         f'or give another --output' + ('' if not unfinished else f' (--resume continues {parts_dir})'))
    if unfinished and not args.resume:
        raise UsageError(f'{parts_dir} holds an unfinished extraction; continue it with --resume or start over '
                         f'with --overwrite')
    if args.resume and not unfinished:
        raise UsageError(f'no unfinished extraction to resume at {parts_dir}')
    return []


def _fingerprint(args, paths: List[str], levels, data_config) -> dict:
    weights = None
    if args.checkpoint:
        st = os.stat(args.checkpoint)
        weights = [os.path.abspath(args.checkpoint), st.st_size, int(st.st_mtime)]
    elif args.pretrained:
        weights = str(args.pretrained)
    digest = hashlib.sha1('\n'.join(paths).encode('utf-8')).hexdigest()
    return dict(model=args.model, weights=weights, levels=levels, maps=args.maps, chunk_size=args.chunk_size,
                input_size=list(data_config['input_size']), crop_pct=data_config['crop_pct'], paths=digest,
                num_paths=len(paths))


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    # every check before anything is built or written
    check_model_args(args)
    check_positive(args, 'batch_size', 'chunk_size', 'threads')
    check_positive(args, 'workers', allow_zero=('workers',))
    if args.crop_pct is not None and not 0 < args.crop_pct <= 1:
        raise UsageError(f'--crop-pct must be in (0, 1], got {args.crop_pct}')
    levels = parse_levels(args.levels)
    files = output_files(args.output, levels)
    stem, ext = os.path.splitext(args.output)
    parts_dir = args.output + '.parts'
    previous = check_previous(args, files, parts_dir)
    paths = list_images(args.input)

    info = init_distributed(args.device)
    device = info.device
    amp_dtype = resolve_amp_dtype(device, args.amp_dtype) if args.amp else None
    set_threads(args.threads, args.workers)
    model = create_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=0)
    num_levels = len(model.feature_info)
    if levels is not None and levels[-1] >= num_levels or levels is not None and levels[0] < 0:
        raise UsageError(f'--levels {args.levels} out of range; {args.model} has levels 0..{num_levels - 1}')
    if levels is not None and hasattr(model, 'prune_intermediate_layers'):
        try:
            model.prune_intermediate_layers(levels, prune_head=True)  # skip stages after the last level
        except (TypeError, NotImplementedError, AssertionError):
            pass
    model = model.to(device).eval()
    data_config = resolve_data_config(dict(img_size=args.img_size, crop_pct=args.crop_pct), model=model)
    transform = create_transform(**data_config, is_training=False)

    fingerprint = _fingerprint(args, paths, levels, data_config)
    fresh = False
    if info.is_main:
        clear_run_files('', previous)
        config_path = os.path.join(parts_dir, 'config.json')
        if os.path.isdir(parts_dir):
            try:
                with open(config_path, encoding='utf-8') as f:
                    same = json.load(f) == fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                raise UsageError(f'{parts_dir} holds chunks of another extraction (other images, model, weights or '
                                 f'options); start over with --overwrite')
        fresh = not os.path.isdir(parts_dir)
        os.makedirs(parts_dir, exist_ok=True)
        atomic_write_text(json.dumps(fingerprint), config_path)
    barrier(info)

    dataset = SafeImageDataset([(p, -1) for p in paths], transform=transform)
    num_chunks = (len(paths) + args.chunk_size - 1) // args.chunk_size
    my_chunks = list(range(info.rank, num_chunks, info.world_size))

    def chunk_range(c):
        return range(c * args.chunk_size, min((c + 1) * args.chunk_size, len(paths)))

    def chunk_file(c):
        return os.path.join(parts_dir, f'chunk_{c:06d}.safetensors')

    done = [c for c in my_chunks if os.path.isfile(chunk_file(c))]
    bar = tqdm(total=sum(len(chunk_range(c)) for c in my_chunks),
               initial=sum(len(chunk_range(c)) for c in done), unit='img', desc='extract',
               disable=not info.is_main or args.no_progress, dynamic_ncols=True)
    if done and info.is_main:
        tqdm.write(f'Continuing: {len(done)} of {len(my_chunks)} chunks already extracted in {parts_dir}.')
    from safetensors.torch import save_file
    try:
        for c in my_chunks:
            if c in done:
                continue
            loader = DataLoader(torch.utils.data.Subset(dataset, list(chunk_range(c))), batch_size=args.batch_size,
                                num_workers=args.workers, collate_fn=collate_skip, pin_memory=device.type == 'cuda')
            outs: Dict[str, List[torch.Tensor]] = {}
            kept: List[int] = []
            with torch.no_grad():
                for images, _, indices, num_skipped in loader:
                    if images is not None:
                        with autocast(device, amp_dtype):
                            feats = compute_features(model, images.to(device, non_blocking=True), levels, args.maps)
                        for k, v in feats.items():
                            outs.setdefault(k, []).append(v.float().cpu())
                        kept.extend(indices.tolist())
                    bar.update(len(indices) if indices is not None else 0)
                    bar.update(len(num_skipped))
            tensors = {k: torch.cat(v).contiguous() for k, v in outs.items()}
            skipped = sorted(set(chunk_range(c)) - set(kept))
            with atomic_path(chunk_file(c)) as tmp:
                save_file(tensors, tmp, metadata=dict(kept=json.dumps(kept), skipped=json.dumps(skipped)))
    except BaseException:
        # a run that fails before its first chunk leaves nothing that blocks the corrected command
        if fresh and not any(n.startswith('chunk_') for n in os.listdir(parts_dir)):
            shutil.rmtree(parts_dir, ignore_errors=True)
        raise
    bar.close()
    barrier(info)

    result = {}
    if info.is_main:
        result = _merge(args, paths, num_chunks, chunk_file, stem, ext, levels, data_config)
        shutil.rmtree(parts_dir, ignore_errors=True)
    barrier(info)
    if info.distributed:
        torch.distributed.destroy_process_group()
    return result


def _merge(args, paths, num_chunks, chunk_file, stem, ext, levels, data_config) -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file
    parts: Dict[str, List[torch.Tensor]] = {}
    kept: List[int] = []
    skipped: List[int] = []
    for c in range(num_chunks):
        with safe_open(chunk_file(c), framework='pt') as f:
            meta = f.metadata()
            for k in f.keys():
                parts.setdefault(k, []).append(f.get_tensor(k))
        kept += json.loads(meta['kept'])
        skipped += json.loads(meta['skipped'])
    keys = ['features'] if levels is None else [f'level{lv}' for lv in levels]
    if not kept:
        raise DataDirError(f'None of the {len(paths)} images of {args.input} could be read.')
    tensors = {k: torch.cat(parts[k]).contiguous() for k in keys}
    kept_paths = [paths[i] for i in kept]
    description = dict(
        model=args.model, weights=args.checkpoint or (str(args.pretrained) if args.pretrained else 'random'),
        kind='pooled pre-logits embedding' if levels is None else 'pyramid levels',
        levels=levels, pooled=not args.maps, input_size=list(data_config['input_size']),
        shapes={k: list(v.shape) for k, v in tensors.items()})
    files = []
    if ext == '.safetensors':
        meta = {k: json.dumps(v) for k, v in description.items()}
        meta['paths'] = json.dumps(kept_paths)
        with atomic_path(args.output) as tmp:
            save_file(tensors, tmp, metadata=meta)
        files.append(args.output)
    else:
        for k, v in tensors.items():
            path = args.output if len(tensors) == 1 else f'{stem}.{k}.npy'
            with atomic_path(path) as tmp:
                np.save(tmp, v.numpy())
            files.append(path)
    sidecar = dict(description, files=files, paths=kept_paths, skipped=[paths[i] for i in skipped])
    atomic_write_text(json.dumps(sidecar, indent=1), stem + '.json')
    msg = f'wrote {", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())} for {len(kept)} images to ' \
          f'{", ".join(files)} (paths in {stem}.json)'
    if skipped:
        msg += f'; skipped {len(skipped)} unreadable image(s)'
    _logger.info(msg)
    return dict(sidecar, sidecar=stem + '.json')


if __name__ == '__main__':
    sys.exit(run_cli(main))
