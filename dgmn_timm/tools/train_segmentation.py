#!/usr/bin/env python3
""" Train and evaluate a DGMN2 semantic segmentation model (Semantic FPN or FCN) on image / mask folders.

Data: a folder of images and a folder of masks (single-channel PNGs of class indices, the
--ignore-index value, default 255, marks unlabelled pixels), paired by file name: an image
``<name><image-suffix>.<jpg|jpeg|png>`` goes with the mask ``<name><mask-suffix>.png``; both
folders are searched recursively (Cityscapes: --image-suffix _leftImg8bit
--mask-suffix _gtFine_labelTrainIds).

Defaults follow the paper's Semantic FPN recipe: AdamW lr 1e-4, weight decay 1e-4 on every
parameter, poly lr decay (power 0.9) over all iterations (timm's poly schedule stepped per update,
in the training loop of dgmn_timm.tools.engine), random rescaling 0.5-2.0, random crop (512x1024 for
Cityscapes), horizontal flips; evaluation on whole images. A head may bring its own recipe
(``dgmn_timm.tasks.segmentation.HEAD_DEFAULTS``): its values replace these defaults for every option
not given on the command line (listed at the end of --help).

    python scripts/train_segmentation.py --backbone dgmn2_tiny --pretrained --num-classes 19 \\
        --train-images cityscapes/leftImg8bit/train --train-masks cityscapes/gtFine/train \\
        --val-images cityscapes/leftImg8bit/val --val-masks cityscapes/gtFine/val \\
        --image-suffix _leftImg8bit --mask-suffix _gtFine_labelTrainIds \\
        --crop-size 512 1024 --batch-size 8 --epochs 107 --output-dir output/semfpn_dgmn2_tiny

Writes to --output-dir: args.json, metrics.jsonl (one line per epoch: losses, mIoU, pixel
accuracy, per-class IoU), last.safetensors / best.safetensors (model weights; best by mIoU),
train_state.pt (for --resume) and summary.json. A folder that holds a
previous run is refused unless --resume or --overwrite is given.
"""
import argparse
import math
import random
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from PIL import Image
from tqdm import tqdm
from timm.utils import random_seed

from dgmn_timm.errors import DataDirError
from dgmn_timm.tools.data import find_pairs
from dgmn_timm.tools.cli import (
    HelpFormatter, UsageError, add_run_args, check_input_size, clear_run_files, run_cli, set_threads,
)
from dgmn_timm.tools.engine import (
    DistInfo, Task, add_dense_args, add_train_args, check_checkpoint_classes, check_dense_args,
    evaluate_only, load_model_weights, make_loader, pretrained_name, pretrained_weights, resolve_device, train,
)
from dgmn_timm.tasks.segmentation import HEAD_DEFAULTS, HEADS

# defaults of the options a head's recipe (HEAD_DEFAULTS) may replace
RECIPE = dict(epochs=10, batch_size=8, opt='adamw', lr=1e-4, momentum=0.9, weight_decay=1e-4, poly_power=0.9,
              min_lr=0.0, clip_grad=None, crop_size=[512, 1024], scale_range=[0.5, 2.0], hflip=0.5, drop_path=0.1,
              output_stride=None)


def _recipes_epilog() -> str:
    def fill(title: str, values: Dict[str, Any]) -> str:
        text = ', '.join(f'--{k.replace("_", "-")} {v}' for k, v in values.items())
        return textwrap.fill(text, width=100, initial_indent=f'  {title}: ', subsequent_indent='    ')

    lines = ['recipe defaults (for the options not given on the command line):', fill('every head', RECIPE)]
    for head in sorted(HEADS):
        changed = {k: v for k, v in HEAD_DEFAULTS.get(head, {}).items() if RECIPE.get(k, object()) != v}
        if changed:
            lines.append(fill(f'--head {head}', changed))
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter, allow_abbrev=False,
                                epilog=_recipes_epilog())
    data = p.add_argument_group('data')
    data.add_argument('--train-images', required=True, help='folder of training images (searched recursively)')
    data.add_argument('--train-masks', required=True, help='folder of training masks (single-channel PNGs)')
    data.add_argument('--val-images', default=None, help='folder of validation images (default: the training images)')
    data.add_argument('--val-masks', default=None, help='folder of validation masks (default: the training masks)')
    data.add_argument('--image-suffix', default='', help='suffix of image names before the extension')
    data.add_argument('--mask-suffix', default='', help='suffix of mask names before .png')
    data.add_argument('--num-classes', type=int, required=True, help='number of classes (labels 0..N-1)')
    data.add_argument('--ignore-index', type=int, default=255, help='mask value of unlabelled pixels')
    model = add_dense_args(p, frozen_bn=False)
    model.add_argument('--head', choices=sorted(HEADS), default='fpn', help='segmentation head')
    model.add_argument('--output-stride', type=int, help='backbone output stride (default: the head\'s: fpn 32, fcn 8)')
    model.add_argument('--drop-path', type=float, help='backbone stochastic depth rate (default: recipe)')
    train = add_train_args(p, decay_bias_norm=True)
    train.add_argument('--poly-power', type=float, help='power of the poly lr decay (default: recipe)')
    train.add_argument('--min-lr', type=float, help='lr the poly decay ends at (default: recipe)')
    train.add_argument('--crop-size', type=int, nargs=2, metavar=('H', 'W'), help='training crop (default: recipe)')
    train.add_argument('--scale-range', type=float, nargs=2, metavar=('MIN', 'MAX'),
                       help='random rescaling of training images (default: recipe)')
    train.add_argument('--base-size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                       help='resize images to this size before the random rescaling (default: as they are)')
    train.add_argument('--hflip', type=float, help='horizontal flip probability (default: recipe)')
    train.add_argument('--eval-size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                       help='resize images to this size for evaluation (default: as they are; IoU at mask size)')
    add_run_args(p, output_dir='output/train_segmentation')
    p.set_defaults(**{k: None for k in RECIPE})
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """ The options, with the head's recipe (then ``RECIPE``) for every one not given. """
    args = build_parser().parse_args(argv)
    recipe = dict(RECIPE, **HEAD_DEFAULTS.get(args.head, {}))
    args.head_kwargs = {k: v for k, v in recipe.items() if k not in RECIPE and not hasattr(args, k)}
    for k, v in recipe.items():
        if hasattr(args, k) and getattr(args, k) is None:
            setattr(args, k, v)
    return args


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
        try:
            with Image.open(image_path) as im:
                image = torch.from_numpy(np.asarray(im.convert('RGB'), dtype=np.float32) / 255.)
            with Image.open(mask_path) as im:
                mask = np.asarray(im)
        except (OSError, ValueError) as e:  # stops the run: one line naming the file
            raise DataDirError(f'cannot read {image_path} or its mask {mask_path}: {e}') from None
        if mask.ndim != 2:
            raise DataDirError(f'{mask_path}: masks must be single-channel class-index images, got shape {mask.shape}')
        image = (image.permute(2, 0, 1) - self.mean) / self.std
        mask = torch.from_numpy(mask.astype(np.int64))
        labelled = mask[mask != self.args.ignore_index]
        if labelled.numel() and (labelled.min() < 0 or labelled.max() >= self.args.num_classes):
            raise DataDirError(f'{mask_path} has labels outside 0..{self.args.num_classes - 1} '
                             f'(and the ignore index {self.args.ignore_index}); check --num-classes')
        if image.shape[-2:] != mask.shape:
            raise DataDirError(f'{image_path} is {tuple(image.shape[-2:])} but its mask is {tuple(mask.shape)}')
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


def lr_schedule(args: argparse.Namespace) -> Dict[str, Any]:
    """ The recipe's poly decay over all iterations as ``engine.create_scheduler`` options (timm's poly,
    stepped per update). """
    return dict(sched='poly', decay_rate=args.poly_power, min_lr=args.min_lr)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    # every check before anything is built or written
    if args.num_classes < 1:
        raise UsageError(f'--num-classes must be at least 1, got {args.num_classes}')
    check_input_size(args.backbone, '--crop-size', *args.crop_size)
    if args.eval_size:
        check_input_size(args.backbone, '--eval-size', *args.eval_size)
    previous, state, weights = check_dense_args(args)
    pretrained = pretrained_weights(args.backbone, args.pretrained) if state is None else None
    check_checkpoint_classes(args.checkpoint, args.num_classes)
    train_pairs, unmatched = find_pairs(args.train_images, args.train_masks, args.image_suffix, args.mask_suffix)
    if unmatched:
        tqdm.write(f'warning: {unmatched} images in {args.train_images} have no mask, skipped')
    val_pairs, _ = find_pairs(args.val_images or args.train_images, args.val_masks or args.train_masks,
                              args.image_suffix, args.mask_suffix)
    device = resolve_device(args.device)
    set_threads(args.threads, args.workers)
    random_seed(args.seed)  # the model's initialisation
    model = HEADS[args.head](
        pretrained_name(args.backbone, args.pretrained),
        num_classes=args.num_classes,
        output_stride=args.output_stride,
        pretrained_file=args.pretrained_file or pretrained,
        backbone_checkpoint=args.backbone_checkpoint,
        frozen_bn=args.frozen_bn,
        frozen_stages=args.frozen_stages,
        backbone_kwargs=dict(drop_path_rate=args.drop_path) if args.drop_path else None,
        **args.head_kwargs,
    )
    if weights is not None:
        load_model_weights(model, weights, args.checkpoint)
    if args.overwrite:
        clear_run_files(args.output_dir, previous)
    model.to(device)
    cfg = model.pretrained_cfg
    mean, std = cfg.get('mean', (0.485, 0.456, 0.406)), cfg.get('std', (0.229, 0.224, 0.225))
    train_set = SegmentationFolder(train_pairs, mean, std, train=True, args=args)
    val_set = SegmentationFolder(val_pairs, mean, std, train=False, args=args)
    train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, seed=args.seed,
                               drop_last=len(train_set) > args.batch_size)
    val_loader = make_loader(val_set, 1, args.workers)  # whole images of different sizes: one at a time

    def forward(model, batch):
        images, masks = batch
        loss = model.training_loss(images.to(device), masks.to(device), ignore_index=args.ignore_index)
        return loss, {}, images.shape[0], []

    meta = {'head': args.head, 'backbone': args.backbone, 'num_classes': args.num_classes}
    task = Task(forward=forward, evaluate=lambda m, desc: evaluate(m, val_loader, device, args), score='mIoU',
                describe=lambda ev: f'mIoU {ev["mIoU"]:.4f}, aAcc {ev["aAcc"]:.4f}', meta=meta,
                summary=dict(meta, train_images=len(train_set), val_images=len(val_set)))
    if args.eval_only:
        return evaluate_only(args, model, task)
    return train(args, model, train_loader, task, lr_schedule(args), DistInfo(device), state=state)


if __name__ == '__main__':
    sys.exit(run_cli(main))
