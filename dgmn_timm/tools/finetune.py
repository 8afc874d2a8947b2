#!/usr/bin/env python3
""" Fine-tune any registered timm model (DGMN2 included) on an ImageFolder tree.

    python scripts/finetune.py --model dgmn2_tiny --data-dir DIR --img-size 32 --epochs 4 --batch-size 64 --output-dir OUT
    torchrun --nproc_per_node 4 scripts/finetune.py --model dgmn2_small --pretrained --data-dir DIR --output-dir OUT

DIR holds train/<class>/<image> and val/<class>/<image>. timm's data pipeline, optimisers and
schedulers; defaults follow the DGMN2 recipe (AdamW, weight decay 0.05, cosine with warm-up,
label smoothing 0.1, RandAugment, mixup 0.8 / cutmix 1.0, random erasing 0.25, drop path 0.1).

OUT gets metrics.jsonl (one line per epoch), best.safetensors / last.safetensors (weights),
train_state.pt (optimizer, scheduler, EMA, RNG, epoch: continue with --resume) and
summary.json at the end. Under torchrun only rank 0 writes. An OUT that holds a previous run is
refused unless --resume (continue it) or --overwrite (replace it) is given.
"""
import argparse
import json
import logging
import math
import os
import signal
import sys
import time

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, accuracy, distribute_bn, random_seed

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.weights.checkpoints import read_state_dict
from dgmn_timm.tools.data import (
    DataDirError, SafeImageDataset, ShardSampler, collate_skip, patch_timm_posterize, scan_image_folder_tree,
)
from dgmn_timm.tools.cli import HelpFormatter, UsageError, add_run_args, check_model_name, check_positive, check_run_folder, clear_run_files, run_cli, set_threads
from dgmn_timm.tools.engine import all_reduce_sum, atomic_torch_save, atomic_write_text, autocast, backward_step, barrier, create_model, init_distributed, load_model_weights, load_train_state, read_model_weights, resolve_amp_dtype, rng_state, save_safetensors, set_rng_state

_logger = logging.getLogger('finetune')

STATE_FILE = 'train_state.pt'
LAST_FILE = 'last.safetensors'
BEST_FILE = 'best.safetensors'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'
ARGS_FILE = 'args.json'
RUN_FILES = (STATE_FILE, LAST_FILE, BEST_FILE, METRICS_FILE, SUMMARY_FILE, ARGS_FILE)

# arguments that define the run: a --resume with different values warns
_RUN_DEFINING = ('model', 'epochs', 'batch_size', 'lr', 'opt', 'sched', 'img_size', 'seed', 'mixup', 'cutmix')


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=HelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', required=True, help='folder with train/<class>/* and val/<class>/*')
    g.add_argument('--img-size', type=int, default=None, help='input size (default: the model\'s, 224)')
    g.add_argument('--crop-pct', type=float, default=None, help='validation centre-crop fraction (model default)')
    g.add_argument('--interpolation', default='', help='resize interpolation (default: the model\'s, bicubic)')
    g.add_argument('--pin-mem', action='store_true', help='pin loader memory (GPU)')

    g = p.add_argument_group('model')
    g.add_argument('--model', default='dgmn2_tiny', help='registered model name')
    g.add_argument('--pretrained', nargs='?', const=True, default=None, metavar='TAG',
                   help='start from pretrained weights (the default tag, or the one given, e.g. in1k)')
    g.add_argument('--checkpoint', default=None, metavar='FILE',
                   help='start from this weights file (ours, the authors\' .pth, timm .safetensors)')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the classifier')
    g.add_argument('--grad-checkpointing', action='store_true', help='trade compute for activation memory')

    g = p.add_argument_group('optimisation')
    g.add_argument('--epochs', type=int, default=300, help='training epochs')
    g.add_argument('--batch-size', type=int, default=64, help='images per step and process')
    g.add_argument('--opt', default='adamw', help='any timm optimizer name')
    g.add_argument('--lr', type=float, default=None,
                   help='learning rate (default: --lr-base scaled from --lr-base-size to the global batch size)')
    g.add_argument('--lr-base', type=float, default=1e-3, help='lr at --lr-base-size (DGMN2 recipe)')
    g.add_argument('--lr-base-size', type=int, default=1024, help='global batch size of --lr-base')
    g.add_argument('--lr-base-scale', default='', choices=['', 'linear', 'sqrt'],
                   help='lr scaling with batch size (default as timm: sqrt for Adam/LAMB family, else linear)')
    g.add_argument('--weight-decay', type=float, default=0.05, help='AdamW-style decoupled weight decay')
    g.add_argument('--momentum', type=float, default=0.9, help='for SGD-like optimizers')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay, e.g. 0.75 (group_matcher)')
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--warmup-epochs', type=float, default=5,
                   help='linear warm-up epochs (at most a tenth of --epochs), stepped per update')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='lr at the start of the warm-up')
    g.add_argument('--min-lr', type=float, default=1e-6, help='lr the schedule decays to')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping value (default: off)')
    g.add_argument('--clip-mode', default='norm', choices=['norm', 'value', 'agc'], help='what --clip-grad clips')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')

    g = p.add_argument_group('augmentation')
    g.add_argument('--no-aug', action='store_true', help='no training augmentation (resize + centre crop)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help='auto-augment policy, "none" to disable')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), help='random resized crop scale')
    g.add_argument('--ratio', type=float, nargs=2, default=(3. / 4., 4. / 3.), help='random resized crop ratio')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0., help='vertical flip probability')
    g.add_argument('--color-jitter', type=float, default=0.4, help='colour jitter strength (with --aa none)')
    g.add_argument('--reprob', type=float, default=0.25, help='random erasing probability')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, 0 = off')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, 0 = off')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', default='batch', choices=['batch', 'pair', 'elem'],
                   help='mix parameters drawn per batch, pair or element')

    g = p.add_argument_group('EMA, precision')
    g.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights (evaluated too)')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='EMA decay per update')
    g.add_argument('--model-ema-warmup', action='store_true', help='ramp the EMA decay up from 0')
    g.add_argument('--amp', action='store_true', help='mixed precision (bfloat16 on CPU, float16 on GPU)')
    g.add_argument('--amp-dtype', default='auto', choices=['auto', 'float16', 'bfloat16'],
                   help='autocast dtype of --amp (auto: bfloat16 on CPU, float16 on GPU)')
    g = add_run_args(p, output_dir='output/finetune', seed=42)
    g.add_argument('--stop-after', type=int, default=None, metavar='N',
                   help='end this run after N epochs (e.g. a job time limit); continue with --resume')
    return p


def resolve_lr(args, world_size: int) -> float:
    if args.lr is not None:
        return args.lr
    global_batch = args.batch_size * world_size
    scale = args.lr_base_scale or ('sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear')
    ratio = global_batch / args.lr_base_size
    return args.lr_base * (math.sqrt(ratio) if scale == 'sqrt' else ratio)


def build_transforms(args, model):
    data_config = resolve_data_config(
        dict(img_size=args.img_size, crop_pct=args.crop_pct, interpolation=args.interpolation or None),
        model=model)
    aa = None if (args.aa or 'none').lower() == 'none' else args.aa
    if aa:
        patch_timm_posterize()
    train_tf = create_transform(
        input_size=data_config['input_size'],
        is_training=True,
        no_aug=args.no_aug,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=aa,
        interpolation='random' if not args.no_aug and not args.interpolation else data_config['interpolation'],
        mean=data_config['mean'],
        std=data_config['std'],
        re_prob=0. if args.no_aug else args.reprob,
        crop_pct=data_config['crop_pct'],
    )
    eval_tf = create_transform(**data_config, is_training=False)
    return data_config, train_tf, eval_tf


class _Terminated(Exception):
    pass


_MAIN_PID = os.getpid()


def _on_sigterm(signum, frame):
    if os.getpid() != _MAIN_PID:  # a data-loading worker: just end, as without the handler
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise _Terminated()


def evaluate(model, loader, device, amp_dtype, dist_info, num_classes, desc='val', progress=True):
    """ Loss, top-1 and top-5 (percent) over the whole validation set, summed over ranks. """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    k5 = min(5, num_classes)
    loss_sum = top1 = top5 = n = skipped = 0.
    with torch.no_grad():
        for images, targets, _, unreadable in tqdm(loader, desc=desc, leave=False, disable=not progress):
            skipped += len(unreadable)
            if images is None:
                continue
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                output = model(images)
            output = output.float()
            loss_sum += criterion(output, targets).item()
            a1, a5 = accuracy(output, targets, topk=(1, k5))
            b = targets.shape[0]
            top1 += round(a1.item() * b / 100.)
            top5 += round(a5.item() * b / 100.)
            n += b
    loss_sum, top1, top5, n, skipped = all_reduce_sum([loss_sum, top1, top5, n, skipped], dist_info)
    if n == 0:
        raise DataDirError('No validation image could be decoded.')
    return dict(loss=loss_sum / n, top1=100. * top1 / n, top5=100. * top5 / n, samples=int(n), skipped=int(skipped))


def _weights_metadata(args, classes, epoch, data_config, source):
    return dict(
        format='dgmn-timm finetune', model=args.model, num_classes=len(classes), classes=classes, epoch=epoch,
        input_size=list(data_config['input_size']), weights=source)


def main(argv=None) -> dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    # every check before anything is built or written
    if args.pretrained and args.checkpoint:
        raise UsageError('give --pretrained or --checkpoint, not both')
    check_positive(args, 'epochs', 'batch_size', 'stop_after', 'threads', 'lr_base_size')
    check_positive(args, 'workers', allow_zero=('workers',))
    check_model_name(args.model)
    out = args.output_dir
    previous = check_run_folder(out, RUN_FILES, args.resume, args.overwrite)
    data = scan_image_folder_tree(args.data_dir)
    classes = data['classes']
    num_classes = len(classes)
    state = None
    if args.resume:
        state_path = os.path.join(out, STATE_FILE) if args.resume == 'auto' else args.resume
        state = load_train_state(state_path)
        if state['classes'] != classes:
            raise UsageError(f'{state_path} was trained on classes {state["classes"]}, the data has {classes}')
        if state['args']['model'] != args.model:
            raise UsageError(f'{state_path} is for --model {state["args"]["model"]}, not {args.model}')
    elif args.checkpoint:
        read_state_dict(args.checkpoint)  # a bad file fails here, with the checkpoint module's message

    dist_info = init_distributed(args.device)
    device = dist_info.device
    is_main = dist_info.is_main
    progress = is_main and not args.no_progress
    amp_dtype = resolve_amp_dtype(device, args.amp_dtype) if args.amp else None
    threads = set_threads(args.threads, args.workers)
    if state is not None:
        changed = [k for k in _RUN_DEFINING if state['args'].get(k) != getattr(args, k)]
        if changed and is_main:
            _logger.warning('Resuming with different ' + ', '.join(
                f'--{k.replace("_", "-")} ({state["args"].get(k)} -> {getattr(args, k)})' for k in changed))

    random_seed(args.seed)
    if state is not None:
        model = create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop)
        weights = os.path.join(os.path.dirname(os.path.abspath(state_path)), state['weights_file'])
        load_model_weights(model, read_model_weights(weights), weights)
    else:
        model = create_model(
            args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, num_classes=num_classes,
            drop_path_rate=args.drop_path, drop_rate=args.drop)
    if is_main:
        if previous and args.overwrite:
            clear_run_files(out, previous)
        os.makedirs(out, exist_ok=True)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)

    data_config, train_tf, eval_tf = build_transforms(args, model)
    train_ds = SafeImageDataset(data['train'], data['train_dir'], transform=train_tf)
    val_ds = SafeImageDataset(data['val'], data['val_dir'], transform=eval_tf)
    train_sampler = DistributedSampler(
        train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=args.seed)
    per_rank = len(train_sampler)
    loader_kw = dict(num_workers=args.workers, collate_fn=collate_skip, pin_memory=args.pin_mem)
    train_loader = DataLoader(
        train_ds, batch_size=args.batch_size, sampler=train_sampler,
        drop_last=per_rank >= 2 * args.batch_size, **loader_kw)
    val_loader = DataLoader(
        val_ds, batch_size=args.batch_size, sampler=ShardSampler(len(val_ds), dist_info.rank, dist_info.world_size),
        **loader_kw)
    updates_per_epoch = len(train_loader)

    ema = None
    if args.model_ema:
        ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    lr = resolve_lr(args, dist_info.world_size)
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=lr, weight_decay=args.weight_decay, momentum=args.momentum,
        layer_decay=args.layer_decay)
    warmup_epochs = min(args.warmup_epochs, args.epochs / 10.)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    loss_scaler = NativeScaler(device.type) if amp_dtype == torch.float16 else None

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
            num_classes=num_classes)
        criterion = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    start_epoch, num_updates = 0, 0
    best = dict(top1=-1., top5=0., loss=float('nan'), epoch=0, weights='model')
    if state is not None:
        optimizer.load_state_dict(state['optimizer'])
        if scheduler is not None and state.get('scheduler') is not None:
            scheduler.load_state_dict(state['scheduler'])
        if loss_scaler is not None and state.get('scaler'):
            loss_scaler.load_state_dict(state['scaler'])
        if ema is not None and state.get('ema') is not None:
            ema.module.load_state_dict(state['ema'])
        start_epoch, num_updates, best = state['epoch'], state['num_updates'], state['best']
        set_rng_state(state['rng'])
        if is_main:
            _logger.info(f'Resumed from {state_path}: {start_epoch} epochs done, best top-1 {best["top1"]:.2f}%')

    train_model = model
    if dist_info.distributed:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    metrics_path = os.path.join(out, METRICS_FILE)
    if is_main:
        # keep the log of the epochs already done (a resume after an interruption drops the rest)
        kept = []
        if state is not None and os.path.isfile(metrics_path):
            with open(metrics_path, encoding='utf-8') as f:
                kept = [line for line in f if line.strip() and json.loads(line)['epoch'] <= start_epoch]
        atomic_write_text(''.join(kept), metrics_path)
        run_args = dict(vars(args), lr_resolved=lr, world_size=dist_info.world_size, classes=classes,
                        data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})
        atomic_write_text(json.dumps(run_args, indent=2, default=str), os.path.join(out, ARGS_FILE))
        _logger.info(
            f'{args.model}: {num_classes} classes, {len(train_ds)} train / {len(val_ds)} val images, '
            f'input {data_config["input_size"]}, {dist_info.world_size} process(es) on {device} '
            f'({threads} thread(s), {args.workers} loader worker(s)), '
            f'global batch {args.batch_size * dist_info.world_size}, lr {lr:.3g}, {updates_per_epoch} steps/epoch')

    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    last = None
    t_start = time.time()
    old_handler = None
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    try:
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        for epoch in range(start_epoch, end_epoch):
            t0 = time.time()
            # data order, augmentation, mixup and drop-path draw from RNGs seeded per epoch (and
            # rank), so a resumed run continues exactly as an uninterrupted one would
            random_seed(args.seed + 10007 * (epoch + 1), dist_info.rank)
            train_sampler.set_epoch(epoch)
            train_model.train()
            loss_sum = n_seen = skipped = 0.
            bar = tqdm(train_loader, desc=f'epoch {epoch + 1}/{args.epochs}', disable=not progress,
                       dynamic_ncols=True)
            for images, targets, _, unreadable in bar:
                skipped += len(unreadable)
                for item in unreadable:
                    tqdm.write(f'skipped unreadable image {item.path}: {item.reason}')
                if images is not None and mixup_fn is not None and images.shape[0] % 2:
                    images, targets = images[:-1], targets[:-1]  # mixup pairs samples up
                    if images.shape[0] == 0:
                        images = None
                if images is None:
                    if not dist_info.distributed:
                        continue
                    # every image of this batch was unreadable: take a zero step to stay in sync with the other ranks
                    loss = sum(p.sum() * 0. for p in train_model.parameters())
                    b = 0
                else:
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    if mixup_fn is not None:
                        images, targets = mixup_fn(images, targets)
                    with autocast(device, amp_dtype):
                        output = train_model(images)
                        loss = criterion(output.float(), targets)
                    b = images.shape[0]
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f'Loss is {loss.item()} at epoch {epoch + 1}; lower --lr or use --clip-grad.')
                backward_step(loss, optimizer, loss_scaler, model.parameters(), args.clip_grad, args.clip_mode)
                num_updates += 1
                if scheduler is not None:
                    scheduler.step_update(num_updates=num_updates)
                if ema is not None:
                    ema.update(model, step=num_updates)
                loss_sum += loss.item() * b
                n_seen += b
                if progress:
                    bar.set_postfix(loss=f'{loss_sum / max(n_seen, 1):.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
            bar.close()
            if scheduler is not None:
                scheduler.step(epoch + 1)
            loss_sum, n_seen, skipped = all_reduce_sum([loss_sum, n_seen, skipped], dist_info)
            if n_seen == 0:
                raise DataDirError(f'No training image of {data["train_dir"]} could be decoded.')
            if dist_info.distributed:
                distribute_bn(model, dist_info.world_size, reduce=True)  # same BatchNorm stats on every rank

            val = evaluate(model, val_loader, device, amp_dtype, dist_info, num_classes, progress=progress)
            record = dict(
                epoch=epoch + 1, train_loss=loss_sum / n_seen, lr=optimizer.param_groups[0]['lr'],
                train_samples=int(n_seen), train_skipped=int(skipped),
                val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'],
                val_samples=val['samples'], val_skipped=val['skipped'])
            candidates = [('model', val, model)]
            if ema is not None:
                ema_val = evaluate(ema.module, val_loader, device, amp_dtype, dist_info, num_classes,
                                   desc='val (EMA)', progress=progress)
                record.update(ema_val_loss=ema_val['loss'], ema_val_top1=ema_val['top1'], ema_val_top5=ema_val['top5'])
                candidates.append(('ema', ema_val, ema.module))
            record['epoch_time'] = time.time() - t0
            source, cand_metrics, cand_model = max(candidates, key=lambda c: c[1]['top1'])  # first wins ties
            improved = cand_metrics['top1'] > best['top1']
            if improved:
                best = dict(top1=cand_metrics['top1'], top5=cand_metrics['top5'], loss=cand_metrics['loss'],
                            epoch=epoch + 1, weights=source)

            if is_main:
                if improved:
                    save_safetensors(cand_model.state_dict(), os.path.join(out, BEST_FILE),
                                     _weights_metadata(args, classes, epoch + 1, data_config, source))
                save_safetensors(model.state_dict(), os.path.join(out, LAST_FILE),
                                 _weights_metadata(args, classes, epoch + 1, data_config, 'model'))
                atomic_torch_save(dict(
                    epoch=epoch + 1, num_updates=num_updates, best=best, classes=classes,
                    args={k: v for k, v in vars(args).items() if k in _RUN_DEFINING}, weights_file=LAST_FILE,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict() if scheduler is not None else None,
                    scaler=loss_scaler.state_dict() if loss_scaler is not None else None,
                    ema=ema.module.state_dict() if ema is not None else None,
                    rng=rng_state(),
                ), os.path.join(out, STATE_FILE))
                with open(metrics_path, 'a', encoding='utf-8') as f:
                    f.write(json.dumps(record) + '\n')
                msg = (f'epoch {epoch + 1}/{args.epochs}: train loss {record["train_loss"]:.4f}, '
                       f'val loss {val["loss"]:.4f}, top-1 {val["top1"]:.2f}%, top-5 {val["top5"]:.2f}%')
                if ema is not None:
                    msg += f', EMA top-1 {record["ema_val_top1"]:.2f}%'
                if skipped or val['skipped']:
                    msg += f', skipped {int(skipped)} train / {val["skipped"]} val unreadable images'
                tqdm.write(msg + f' ({record["epoch_time"]:.1f}s)')
            last = record
            barrier(dist_info)
    except (KeyboardInterrupt, _Terminated):
        if is_main:
            _logger.error(f'Interrupted. Completed epochs are saved in {out}; continue with --resume.')
        raise SystemExit(130)
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)

    epochs_done = end_epoch
    summary = dict(
        model=args.model, num_classes=num_classes, classes=classes,
        epochs=epochs_done, epochs_planned=args.epochs, completed=epochs_done >= args.epochs,
        best_epoch=best['epoch'], best_weights=best['weights'],
        val_top1=best['top1'], val_top5=best['top5'], val_loss=best['loss'],
        last_val_top1=last['val_top1'] if last else None, last_val_top5=last['val_top5'] if last else None,
        last_train_loss=last['train_loss'] if last else None,
        train_samples=len(train_ds), val_samples=len(val_ds),
        input_size=list(data_config['input_size']), world_size=dist_info.world_size,
        global_batch_size=args.batch_size * dist_info.world_size, lr=lr,
        best_checkpoint=os.path.join(out, BEST_FILE), last_checkpoint=os.path.join(out, LAST_FILE),
        train_time_s=time.time() - t_start,
    )
    if is_main:
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(out, SUMMARY_FILE))
        _logger.info(f'Best val top-1 {best["top1"]:.2f}% at epoch {best["epoch"]} ({best["weights"]} weights): '
                     f'{os.path.join(out, BEST_FILE)}')
    barrier(dist_info)
    if dist_info.distributed:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == '__main__':
    sys.exit(run_cli(main))
