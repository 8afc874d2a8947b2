#!/usr/bin/env python3
""" Train and evaluate a DGMN2 semantic segmentation model (Semantic FPN or FCN) on image / mask folders.

Data: a folder of images and a folder of masks (single-channel PNGs of class indices, the
--ignore-index value, default 255, marks unlabelled pixels), paired by file name: an image
``<name><image-suffix>.<jpg|jpeg|png>`` goes with the mask ``<name><mask-suffix>.png``; both
folders are searched recursively (Cityscapes: --image-suffix _leftImg8bit
--mask-suffix _gtFine_labelTrainIds).

Defaults follow the paper's Semantic FPN recipe: AdamW lr 1e-4, weight decay 1e-4, poly lr
decay (power 0.9) over all iterations, random rescaling 0.5-2.0, random crop (512x1024 for
Cityscapes), horizontal flips; evaluation on whole images.

    python scripts/train_segmentation.py --backbone dgmn2_tiny --pretrained --num-classes 19 \\
        --train-images cityscapes/leftImg8bit/train --train-masks cityscapes/gtFine/train \\
        --val-images cityscapes/leftImg8bit/val --val-masks cityscapes/gtFine/val \\
        --image-suffix _leftImg8bit --mask-suffix _gtFine_labelTrainIds \\
        --crop-size 512 1024 --batch-size 8 --epochs 107 --output-dir runs/semfpn_dgmn2_tiny

Writes to --output-dir: last.safetensors (model weights) and metrics.json (per-epoch losses,
mIoU, pixel accuracy, per-class IoU).
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm

import dgmn_timm  # noqa: F401  (registers the models)
from dgmn_timm.segmentation import create_segmentation_model
from dgmn_timm.train_utils import backward_step, save_safetensors, seed_everything

IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    data = p.add_argument_group('data')
    data.add_argument('--train-images', required=True)
    data.add_argument('--train-masks', required=True)
    data.add_argument('--val-images', default=None, help='default: the training images')
    data.add_argument('--val-masks', default=None, help='default: the training masks')
    data.add_argument('--image-suffix', default='', help='suffix of image names before the extension')
    data.add_argument('--mask-suffix', default='', help='suffix of mask names before .png')
    data.add_argument('--num-classes', type=int, required=True)
    data.add_argument('--ignore-index', type=int, default=255)
    data.add_argument('--workers', type=int, default=2)
    model = p.add_argument_group('model')
    model.add_argument('--head', choices=('fpn', 'fcn'), default='fpn')
    model.add_argument('--backbone', default='dgmn2_tiny', help='timm model name (tags, local-dir: allowed)')
    model.add_argument('--output-stride', type=int, default=None, help='backbone output stride (fpn 32, fcn 8)')
    model.add_argument('--pretrained', action='store_true')
    model.add_argument('--pretrained-file', default=None)
    model.add_argument('--backbone-checkpoint', default=None,
                       help="segmentation / detection checkpoint whose 'backbone.' weights initialise the backbone")
    model.add_argument('--weights', default=None, help='our safetensors checkpoint of the whole model')
    model.add_argument('--frozen-bn', action='store_true', help='freeze the backbone BatchNorm layers')
    model.add_argument('--frozen-stages', type=int, default=-1)
    model.add_argument('--drop-path', type=float, default=0.1, help='backbone stochastic depth rate')
    train = p.add_argument_group('training')
    train.add_argument('--crop-size', type=int, nargs=2, default=[512, 1024], metavar=('H', 'W'))
    train.add_argument('--scale-range', type=float, nargs=2, default=[0.5, 2.0], metavar=('MIN', 'MAX'),
                       help='random rescaling of training images')
    train.add_argument('--base-size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                       help='resize images to this size before the random rescaling (default: as they are)')
    train.add_argument('--hflip', type=float, default=0.5)
    train.add_argument('--epochs', type=int, default=10)
    train.add_argument('--batch-size', type=int, default=8)
    train.add_argument('--lr', type=float, default=1e-4)
    train.add_argument('--weight-decay', type=float, default=1e-4)
    train.add_argument('--poly-power', type=float, default=0.9)
    train.add_argument('--min-lr', type=float, default=0.0)
    train.add_argument('--clip-grad', type=float, default=0.0)
    train.add_argument('--amp', action='store_true', help='mixed precision (CUDA)')
    train.add_argument('--eval-interval', type=int, default=1)
    train.add_argument('--eval-size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                       help='resize images to this size for evaluation (IoU still at mask resolution)')
    train.add_argument('--eval-only', action='store_true')
    run = p.add_argument_group('run')
    run.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    run.add_argument('--output-dir', default='runs/segmentation')
    run.add_argument('--seed', type=int, default=0)
    run.add_argument('--num-threads', type=int, default=0, help='torch CPU threads (0: default)')
    run.add_argument('--no-progress', action='store_true')
    return p.parse_args(argv)


def find_pairs(image_dir: str, mask_dir: str, image_suffix: str = '', mask_suffix: str = '') -> List[Tuple[Path, Path]]:
    """ (image, mask) pairs matched by name (relative path without suffix and extension). """
    def index(root: str, exts, suffix: str) -> Dict[str, Path]:
        root_path = Path(root)
        if not root_path.is_dir():
            raise FileNotFoundError(f'Not a folder: {root}')
        out = {}
        for path in sorted(root_path.rglob('*')):
            if path.suffix.lower() not in exts or not path.stem.endswith(suffix):
                continue
            stem = path.stem[:len(path.stem) - len(suffix)] if suffix else path.stem
            out[str(path.relative_to(root_path).with_name(stem))] = path
        return out

    images = index(image_dir, IMAGE_EXTS, image_suffix)
    masks = index(mask_dir, ('.png',), mask_suffix)
    pairs = [(images[k], masks[k]) for k in sorted(images) if k in masks]
    if not pairs:
        raise ValueError(f'No image / mask pairs in {image_dir} and {mask_dir} '
                         f'(image suffix {image_suffix!r}, mask suffix {mask_suffix!r})')
    unmatched = len(images) - len(pairs)
    if unmatched:
        print(f'warning: {unmatched} images in {image_dir} have no mask, skipped', file=sys.stderr)
    return pairs


class SegmentationFolder(torch.utils.data.Dataset):
    """ Image / mask pairs; training samples are rescaled, cropped (padded) and flipped. """

    def __init__(self, pairs: List[Tuple[Path, Path]], mean, std, train: bool, args: argparse.Namespace):
        self.pairs = pairs
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.train = train
        self.args = args

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = torch.from_numpy(np.asarray(Image.open(image_path).convert('RGB'), dtype=np.float32) / 255.)
        mask = np.asarray(Image.open(mask_path))
        if mask.ndim != 2:
            raise ValueError(f'{mask_path}: masks must be single-channel class-index images, got shape {mask.shape}')
        image = (image.permute(2, 0, 1) - self.mean) / self.std
        mask = torch.from_numpy(mask.astype(np.int64))
        labelled = mask[mask != self.args.ignore_index]
        if labelled.numel() and (labelled.min() < 0 or labelled.max() >= self.args.num_classes):
            raise ValueError(f'{mask_path} has labels outside 0..{self.args.num_classes - 1} '
                             f'(and the ignore index {self.args.ignore_index}); check --num-classes')
        if image.shape[-2:] != mask.shape:
            raise ValueError(f'{image_path} is {tuple(image.shape[-2:])} but its mask is {tuple(mask.shape)}')
        return image, mask

    @staticmethod
    def _resize(image: torch.Tensor, mask: torch.Tensor, size: Tuple[int, int]):
        image = F.interpolate(image[None], size=size, mode='bilinear', align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode='nearest')[0, 0].long()
        return image, mask

    def __getitem__(self, index: int):
        image, mask = self._load(index)
        args = self.args
        if not self.train:
            return image, mask
        if args.base_size:
            image, mask = self._resize(image, mask, tuple(args.base_size))
        scale = random.uniform(*args.scale_range)
        h, w = image.shape[-2:]
        image, mask = self._resize(image, mask, (max(1, round(h * scale)), max(1, round(w * scale))))
        ch, cw = args.crop_size
        h, w = image.shape[-2:]
        if h < ch or w < cw:  # pad: image with 0 (the mean after normalisation), mask with ignore
            ph, pw = max(ch - h, 0), max(cw - w, 0)
            image = F.pad(image, (0, pw, 0, ph), value=0.)
            mask = F.pad(mask, (0, pw, 0, ph), value=args.ignore_index)
            h, w = image.shape[-2:]
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        image = image[:, top:top + ch, left:left + cw]
        mask = mask[top:top + ch, left:left + cw]
        if random.random() < args.hflip:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes).cpu()


def segmentation_metrics(conf: torch.Tensor) -> Dict[str, Any]:
    """ mIoU, mean class accuracy and pixel accuracy from a (target, prediction) confusion matrix. """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    gt = conf.sum(1)
    iou = tp / union  # NaN for classes absent from both prediction and ground truth
    acc = tp / gt
    present = gt > 0
    return {
        'mIoU': float(iou[present].nanmean()) if present.any() else 0.0,
        'mAcc': float(acc[present].mean()) if present.any() else 0.0,
        'aAcc': float(tp.sum() / conf.sum()) if conf.sum() > 0 else 0.0,
        'per_class_iou': [None if (not p or math.isnan(v)) else float(v) for v, p in zip(iou.tolist(), present.tolist())],
    }


def train_one_epoch(model, loader, optimizer, scheduler, scaler, device, epoch: int, args) -> Dict[str, float]:
    model.train()
    total, count = 0.0, 0
    bar = tqdm(loader, desc=f'epoch {epoch}/{args.epochs}', disable=args.no_progress, dynamic_ncols=True)
    for images, masks in bar:
        images, masks = images.to(device), masks.to(device)
        with torch.autocast(device_type=device.type, enabled=args.amp and device.type == 'cuda'):
            loss = model.training_loss(images, masks, ignore_index=args.ignore_index)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f'Loss is {loss.item()} at epoch {epoch}')
        backward_step(loss, optimizer, scaler, model.parameters(), args.clip_grad)
        scheduler.step()
        total += loss.item()
        count += 1
        bar.set_postfix(loss=f'{loss.item():.4f}', lr=f'{optimizer.param_groups[0]["lr"]:.2e}')
    return {'loss': total / max(1, count)}


@torch.no_grad()
def evaluate(model, loader, device, args) -> Dict[str, Any]:
    model.eval()
    conf = torch.zeros(args.num_classes, args.num_classes, dtype=torch.int64)
    for image, mask in tqdm(loader, desc='eval', disable=args.no_progress, dynamic_ncols=True):
        image, mask = image.to(device), mask.to(device)
        x = image
        if args.eval_size:
            x = F.interpolate(image, size=tuple(args.eval_size), mode='bilinear', align_corners=False)
        logits = model(x)
        if logits.shape[-2:] != mask.shape[-2:]:
            logits = F.interpolate(logits, size=mask.shape[-2:], mode='bilinear', align_corners=False)
        conf += confusion_matrix(logits.argmax(1), mask, args.num_classes, args.ignore_index)
    return segmentation_metrics(conf)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    seed_everything(args.seed)
    device = torch.device(args.device)
    os.makedirs(args.output_dir, exist_ok=True)

    model = create_segmentation_model(
        args.backbone,
        num_classes=args.num_classes,
        head=args.head,
        output_stride=args.output_stride,
        pretrained=args.pretrained,
        pretrained_file=args.pretrained_file,
        backbone_checkpoint=args.backbone_checkpoint,
        frozen_bn=args.frozen_bn,
        frozen_stages=args.frozen_stages,
        backbone_kwargs=dict(drop_path_rate=args.drop_path) if args.drop_path else None,
    )
    if args.weights:
        model.load_state_dict(load_file(args.weights, device='cpu'))
    model.to(device)
    cfg = model.pretrained_cfg
    mean, std = cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))

    train_pairs = find_pairs(args.train_images, args.train_masks, args.image_suffix, args.mask_suffix)
    val_pairs = find_pairs(args.val_images or args.train_images, args.val_masks or args.train_masks,
                           args.image_suffix, args.mask_suffix)
    train_set = SegmentationFolder(train_pairs, mean, std, train=True, args=args)
    val_set = SegmentationFolder(val_pairs, mean, std, train=False, args=args)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, num_workers=args.workers, generator=generator,
        drop_last=len(train_set) > args.batch_size)
    # whole images of different sizes: one at a time
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=1, shuffle=False, num_workers=args.workers)

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)
    total_iters = max(1, args.epochs * len(train_loader))
    min_factor = args.min_lr / args.lr if args.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: max((1 - min(it, total_iters) / total_iters) ** args.poly_power, min_factor))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and device.type == 'cuda')

    history: Dict[str, Any] = {
        'args': vars(args), 'train_images': len(train_set), 'val_images': len(val_set), 'epochs': [], 'eval': None}
    metrics_path = os.path.join(args.output_dir, 'metrics.json')
    ckpt_path = os.path.join(args.output_dir, 'last.safetensors')
    meta = {'head': args.head, 'backbone': args.backbone, 'num_classes': args.num_classes}

    def write_metrics():
        with open(metrics_path + '.tmp', 'w') as f:
            json.dump(history, f, indent=2)
        os.replace(metrics_path + '.tmp', metrics_path)

    if args.eval_only:
        history['eval'] = evaluate(model, val_loader, device, args)
        write_metrics()
        return history

    for epoch in range(1, args.epochs + 1):
        start = time.time()
        record: Dict[str, Any] = {'epoch': epoch}
        record.update(train_one_epoch(model, train_loader, optimizer, scheduler, scaler, device, epoch, args))
        record['lr'] = optimizer.param_groups[0]['lr']
        record['time_s'] = time.time() - start
        save_safetensors(model.state_dict(), ckpt_path, dict(meta, epoch=epoch))
        if epoch % args.eval_interval == 0 or epoch == args.epochs:
            record['eval'] = history['eval'] = evaluate(model, val_loader, device, args)
        history['epochs'].append(record)
        write_metrics()
        print(f'epoch {epoch}: loss {record["loss"]:.4f}'
              + (f', mIoU {record["eval"]["mIoU"]:.4f}' if 'eval' in record else ''))
    history['checkpoint'] = ckpt_path
    write_metrics()
    return history


if __name__ == '__main__':
    main()
    sys.exit(0)
