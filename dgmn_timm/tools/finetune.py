#!/usr/bin/env python3
""" Fine-tune any registered timm model (DGMN2 included) on an ImageFolder tree or a Hugging Face dataset.

    python scripts/finetune.py --model dgmn2_tiny --data-dir DIR --img-size 32 --epochs 4 --batch-size 64 --output-dir OUT
    torchrun --nproc_per_node 4 scripts/finetune.py --model dgmn2_small --pretrained --data-dir DIR --output-dir OUT

DIR holds train/<class>/<image> and val/<class>/<image>; or --dataset hfds/NAME reads a Hugging Face
dataset (a Hub name or a local folder of parquet files), --dataset wds/NAME webdataset shards. timm's data pipeline, optimisers and
schedulers, in the training loop of dgmn_timm.tools.engine (shared with the dense scripts); defaults follow the DGMN2 recipe (AdamW, weight decay 0.05, cosine with warm-up,
label smoothing 0.1, RandAugment, mixup 0.8 / cutmix 1.0, random erasing 0.25, drop path 0.1).

OUT gets args.json, metrics.jsonl (one line per epoch), best.safetensors / last.safetensors
(weights), train_state.pt (optimizer, loss scaler, EMA, epoch: continue with --resume) and
summary.json at the end. Under torchrun only rank 0 writes. An OUT that holds a previous run is
refused unless --resume (continue it) or --overwrite (replace it) is given.
"""
import argparse
import math
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from timm.data import IterableImageDataset, Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import accuracy, random_seed

from dgmn_timm.weights.checkpoints import read_state_dict
from dgmn_timm.tools.data import (
    DataDirError, SafeImageDataset, ShardSampler, collate_pairs, collate_skip, open_image_dataset,
    patch_timm_posterize,
)
from dgmn_timm.tools.cli import (
    HelpFormatter, UsageError, add_run_args, check_model_args, check_positive, clear_run_files,
    run_cli, set_threads,
)
from dgmn_timm.tools.engine import (
    Task, add_train_args, all_reduce_sum, autocast, check_train_args, create_model,
    init_distributed, pretrained_name, pretrained_weights, resolve_amp_dtype, train,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.strip().splitlines()[0],
        formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None,
                   help='folder with train/<class>/* and val/<class>/* (with --dataset hfds/...: the cache folder)')
    g.add_argument('--dataset', default='', metavar='NAME',
                   help='a timm dataset name instead of the folder: hfds/NAME (a Hugging Face dataset: a Hub name '
                        'or a local folder of parquet files), wds/NAME (webdataset shards and their _info.json '
                        'in --data-dir)')
    g.add_argument('--train-split', default='train', help='training split of --dataset')
    g.add_argument('--val-split', default='validation', help='validation split of --dataset')
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

    g = add_train_args(p, epochs=300, batch_size=64, opt='adamw', weight_decay=0.05)
    g.add_argument('--lr-base', type=float, default=1e-3, help='lr at --lr-base-size (DGMN2 recipe), when no --lr')
    g.add_argument('--lr-base-size', type=int, default=1024, help='global batch size of --lr-base')
    g.add_argument('--lr-base-scale', default='', choices=['', 'linear', 'sqrt'],
                   help='lr scaling with batch size (default as timm: sqrt for Adam/LAMB family, else linear)')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay, e.g. 0.75 (group_matcher)')
    g.add_argument('--sched', default='cosine', help='timm scheduler name')
    g.add_argument('--warmup-epochs', type=float, default=5,
                   help='linear warm-up epochs (at most a tenth of --epochs), stepped per update')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='lr at the start of the warm-up')
    g.add_argument('--min-lr', type=float, default=1e-6, help='lr the schedule decays to')
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
    add_run_args(p, output_dir='output/finetune')
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


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    # every check before anything is built or written
    check_model_args(args)
    if not args.dataset and not args.data_dir:
        raise UsageError('give --data-dir (an ImageFolder tree) or --dataset (e.g. hfds/NAME)')
    check_positive(args, 'lr_base_size')
    previous, state = check_train_args(args)
    data = open_image_dataset(args.dataset, args.data_dir, args.train_split, args.val_split, args.batch_size,
                              args.seed)
    classes = data['classes']
    num_classes = len(classes)
    trained_on = state.get('run_info', {}).get('classes', classes) if state is not None else classes
    if trained_on != classes:
        raise UsageError(f'{state["path"]} was trained on classes {trained_on}, the data has {classes}')
    if state is None and args.checkpoint:
        read_state_dict(args.checkpoint)  # a bad file fails here, with the checkpoint module's message
    pretrained = pretrained_weights(args.model, args.pretrained) if state is None else None

    dist_info = init_distributed(args.device)
    if dist_info.distributed and data.get('iterable'):  # its readers split the shards by rank when built
        data = open_image_dataset(args.dataset, args.data_dir, args.train_split, args.val_split, args.batch_size,
                                  args.seed)
    device = dist_info.device
    is_main = dist_info.is_main
    progress = is_main and not args.no_progress
    amp_dtype = resolve_amp_dtype(device, args.amp_dtype) if args.amp else None
    threads = set_threads(args.threads, args.workers)

    random_seed(args.seed)
    build = dict(num_classes=num_classes, drop_path_rate=args.drop_path, drop_rate=args.drop)
    if state is not None:  # the run's weights are loaded by the training loop
        model = create_model(args.model, **build)
    else:
        model = create_model(pretrained_name(args.model, args.pretrained), checkpoint=args.checkpoint or pretrained,
                             **build)
    if is_main and previous and args.overwrite:
        clear_run_files(args.output_dir, previous)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)

    data_config, train_tf, eval_tf = build_transforms(args, model)
    loader_kw = dict(num_workers=args.workers, pin_memory=args.pin_mem)
    if data.get('iterable'):  # wds/: timm's iterable dataset, shuffled and split over ranks by its reader
        train_ds = IterableImageDataset(args.data_dir, reader=data['train'], transform=train_tf)
        val_ds = IterableImageDataset(args.data_dir, reader=data['val'], transform=eval_tf)
        for ds in (train_ds, val_ds):
            ds.set_loader_cfg(num_workers=args.workers)
        train_loader = DataLoader(train_ds, batch_size=args.batch_size, collate_fn=collate_pairs, **loader_kw)
        val_loader = DataLoader(val_ds, batch_size=args.batch_size, collate_fn=collate_pairs, **loader_kw)
    else:
        train_ds = SafeImageDataset(data['train'], transform=train_tf)
        val_ds = SafeImageDataset(data['val'], transform=eval_tf)
        train_sampler = DistributedSampler(
            train_ds, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True, seed=args.seed)
        train_loader = DataLoader(
            train_ds, batch_size=args.batch_size, sampler=train_sampler, collate_fn=collate_skip,
            drop_last=len(train_sampler) >= 2 * args.batch_size, **loader_kw)
        val_loader = DataLoader(
            val_ds, batch_size=args.batch_size, collate_fn=collate_skip,
            sampler=ShardSampler(len(val_ds), dist_info.rank, dist_info.world_size), **loader_kw)
    lr = resolve_lr(args, dist_info.world_size)

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

    def forward(model, batch):
        images, targets, _, unreadable = batch
        if images is not None and mixup_fn is not None and images.shape[0] % 2:
            images, targets = images[:-1], targets[:-1]  # mixup pairs samples up
            if images.shape[0] == 0:
                images = None
        if images is None:
            return None, {}, 0, unreadable
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        return criterion(model(images).float(), targets), {}, images.shape[0], unreadable

    def describe(m):
        return f'val loss {m["loss"]:.4f}, top-1 {m["top1"]:.2f}%, top-5 {m["top5"]:.2f}%'

    input_size = list(data_config['input_size'])
    task = Task(
        forward=forward,
        evaluate=lambda m, desc: evaluate(m, val_loader, device, amp_dtype, dist_info, num_classes, desc, progress),
        score='top1', describe=describe,
        meta=dict(format='dgmn-timm finetune', model=args.model, num_classes=num_classes, classes=classes,
                  input_size=input_size),
        summary=dict(model=args.model, num_classes=num_classes, classes=classes, train_samples=len(train_ds),
                     val_samples=len(val_ds), input_size=input_size))
    if is_main:
        tqdm.write(
            f'{args.model}: {num_classes} classes, {len(train_ds)} train / {len(val_ds)} val images, '
            f'input {data_config["input_size"]}, {dist_info.world_size} process(es) on {device} '
            f'({threads} thread(s), {args.workers} loader worker(s)), '
            f'global batch {args.batch_size * dist_info.world_size}, lr {lr:.3g}, {len(train_loader)} steps/epoch')
    schedule = dict(sched=args.sched, warmup_epochs=min(args.warmup_epochs, args.epochs / 10.),
                    warmup_lr=args.warmup_lr, min_lr=args.min_lr)
    run_info = dict(classes=classes,
                    data_config={k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()})
    summary = train(args, model, train_loader, task, schedule, dist_info, state=state, lr=lr, run_info=run_info)
    if dist_info.distributed:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == '__main__':
    sys.exit(run_cli(main))
