#!/usr/bin/env python3
""" Train and evaluate a DGMN2 detector (RetinaNet, Faster R-CNN, Mask R-CNN) on a COCO-format dataset.

The defaults are the paper's 1x schedule (mmdetection style): AdamW lr 1e-4, weight decay 1e-4,
12 epochs with the lr divided by 10 after epochs 8 and 11, 500 linear warm-up iterations from
1e-3 x lr, weight decay on every parameter (timm's multistep schedule and create_optimizer_v2 with
filter_bias_and_bn=False, in the training loop of dgmn_timm.tools.engine), images resized to shorter side 800 / longer side <= 1333, random horizontal flips, batch 16
(set --batch-size / --lr for your hardware; the lr is not rescaled automatically).

    python scripts/train_detection.py --model maskrcnn --backbone dgmn2_tiny --pretrained \\
        --train-images coco/train2017 --train-ann coco/annotations/instances_train2017.json \\
        --val-images coco/val2017 --val-ann coco/annotations/instances_val2017.json \\
        --output-dir output/maskrcnn_dgmn2_tiny

Writes to --output-dir: args.json, metrics.jsonl (one line per epoch: losses, COCO box / mask AP
from pycocotools), last.safetensors / best.safetensors (model weights; best by box AP; the epoch
and the category ids in their metadata), train_state.pt (for --resume) and summary.json. A folder that holds a previous run is refused unless --resume or
--overwrite is given.
Categories are mapped to contiguous labels 1..K (0 is background); predictions are mapped back
to the dataset's category ids for evaluation.
"""
import argparse
import json
import os
import random
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm
from timm.utils import random_seed

from dgmn_timm.errors import DataDirError
from dgmn_timm.tasks.detection import fasterrcnn_dgmn2, maskrcnn_dgmn2, retinanet_dgmn2
from dgmn_timm.tools.cli import (
    HelpFormatter, UsageError, add_run_args, check_input_size, clear_run_files, run_cli, set_threads,
)
from dgmn_timm.tools.engine import (
    DistInfo, Task, add_dense_args, add_train_args, check_checkpoint_classes, check_dense_args,
    evaluate_only, load_model_weights, make_loader, pretrained_name, pretrained_weights, resolve_device, train,
)

BUILDERS = {'retinanet': retinanet_dgmn2, 'fasterrcnn': fasterrcnn_dgmn2, 'maskrcnn': maskrcnn_dgmn2}
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=HelpFormatter,
                                allow_abbrev=False)
    data = p.add_argument_group('data')
    data.add_argument('--train-images', required=True, help='folder of training images')
    data.add_argument('--train-ann', required=True, help='COCO-format annotation JSON of the training images')
    data.add_argument('--val-images', default=None, help='folder of validation images (default: the training folder)')
    data.add_argument('--val-ann', default=None, help='validation annotations (default: the training annotations)')
    model = add_dense_args(p, frozen_bn=True)
    model.add_argument('--model', choices=sorted(BUILDERS), default='retinanet', help='detector')
    model.add_argument('--drop-path', type=float, default=0.0, help='backbone stochastic depth rate')
    model.add_argument('--min-size', type=int, default=800, help='resize: shorter image side')
    model.add_argument('--max-size', type=int, default=1333, help='resize: longest image side cap')
    model.add_argument('--score-thresh', type=float, default=0.05, help='minimum score of a kept detection')
    model.add_argument('--detections-per-img', type=int, default=100, help='most detections kept per image')
    model.add_argument('--detector-kwargs', type=json.loads, default={},
                       help='JSON dict of extra torchvision detector kwargs, e.g. '
                            '\'{"rpn_post_nms_top_n_test": 300, "box_batch_size_per_image": 256}\'')
    train = add_train_args(p, epochs=12, batch_size=2, opt='adamw', lr=1e-4, weight_decay=1e-4,
                           decay_bias_norm=True)
    train.add_argument('--lr-steps', type=int, nargs='*', default=[8, 11], help='epochs after which lr *= 0.1')
    train.add_argument('--warmup-iters', type=int, default=500, help='linear warm-up iterations')
    train.add_argument('--warmup-ratio', type=float, default=1e-3, help='lr factor at the first iteration')
    train.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    add_run_args(p, output_dir='output/train_detection')
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


class CocoDetectionDataset(torch.utils.data.Dataset):
    """ COCO-format images and annotations as torchvision detection targets.

    Targets: boxes (x1, y1, x2, y2), labels (1..K), image_id, and masks (N, H, W) uint8 if
    ``with_masks``. Crowd annotations and degenerate boxes are left out of the targets.
    """

    def __init__(self, image_dir: str, ann_file: str, with_masks: bool = False, train: bool = False,
                 hflip: float = 0.5, cat_ids: Optional[List[int]] = None):
        self.image_dir = image_dir
        self.coco = COCO(ann_file)
        self.with_masks = with_masks
        self.train = train
        self.hflip = hflip
        self.cat_ids = sorted(self.coco.getCatIds()) if cat_ids is None else list(cat_ids)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        ids = sorted(self.coco.getImgIds())
        if train:  # like mmdetection: skip images without usable boxes
            ids = [i for i in ids if any(self._usable(a) for a in self.coco.imgToAnns.get(i, []))]
            if not ids:
                raise DataDirError(f'{ann_file} has no image with a usable (non-crowd) box')
        self.ids = ids

    def _usable(self, ann: Dict[str, Any]) -> bool:
        x, y, w, h = ann['bbox']
        return not ann.get('iscrowd', 0) and w > 1 and h > 1 and ann['category_id'] in self.cat_to_label

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info['file_name'])
        try:
            with Image.open(path) as im:
                image = pil_to_tensor(im.convert('RGB')).float().div_(255)
        except (OSError, ValueError) as e:  # stops the run: one line naming the file
            raise DataDirError(f'cannot read image {path}: {e}') from None
        h, w = image.shape[-2:]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if self._usable(a)]
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        target = {
            'boxes': boxes,
            'labels': torch.tensor([self.cat_to_label[a['category_id']] for a in anns], dtype=torch.int64),
            'image_id': torch.tensor(image_id),
        }
        if self.with_masks:
            masks = [self.coco.annToMask(a) for a in anns]
            target['masks'] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.train and random.random() < self.hflip:
            image = image.flip(-1)
            boxes = target['boxes']
            target['boxes'] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            if self.with_masks:
                target['masks'] = target['masks'].flip(-1)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


def lr_schedule(args: argparse.Namespace) -> Dict[str, Any]:
    """ The paper's schedule as ``engine.create_scheduler`` options: --warmup-iters linear warm-up from
    --warmup-ratio x lr, then x0.1 after each of --lr-steps epochs (timm's multistep, stepped per update). """
    return dict(sched='multistep', decay_milestones=args.lr_steps, decay_rate=0.1,
                warmup_steps=args.warmup_iters, warmup_lr=args.lr * args.warmup_ratio)


def describe(metrics: Dict[str, Any]) -> str:
    """ The AP part of the epoch line: box AP, and mask AP for Mask R-CNN. """
    text = f'box AP {metrics["bbox_AP"]:.4f}'
    if 'segm_AP' in metrics:
        text += f', mask AP {metrics["segm_AP"]:.4f}'
    return text


@torch.no_grad()
def evaluate(model, dataset: CocoDetectionDataset, loader, device, args) -> Dict[str, Dict[str, float]]:
    """ COCO box (and mask) AP with pycocotools. """
    model.eval()
    results: List[Dict[str, Any]] = []
    for images, targets in tqdm(loader, desc='eval', disable=args.no_progress, dynamic_ncols=True):
        outputs = model([im.to(device) for im in images])
        for out, target in zip(outputs, targets):
            image_id = int(target['image_id'])
            boxes = out['boxes'].cpu()
            boxes[:, 2:] -= boxes[:, :2]
            scores = out['scores'].cpu().tolist()
            labels = out['labels'].cpu().tolist()
            rles = None
            if 'masks' in out and len(scores):
                binary = (out['masks'][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for j, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
                if label < 1:  # background index (RetinaNet scores it like a class; never a target)
                    continue
                res = {'image_id': image_id, 'category_id': dataset.cat_ids[label - 1], 'bbox': box, 'score': score}
                if rles is not None:
                    rle = rles[j]
                    rle['counts'] = rle['counts'].decode('ascii')
                    res['segmentation'] = rle
                results.append(res)
    iou_types = ['bbox'] + (['segm'] if dataset.with_masks else [])
    metrics: Dict[str, Dict[str, float]] = {}
    for iou_type in iou_types:
        if not results:
            metrics[iou_type] = {name: 0.0 for name in STAT_NAMES}
            continue
        coco_dt = dataset.coco.loadRes(results)
        ev = COCOeval(dataset.coco, coco_dt, iou_type)
        ev.params.imgIds = list(dataset.ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        # -1 means no ground truth in that category / size range
        metrics[iou_type] = {name: float(max(ev.stats[i], 0.0)) for i, name in enumerate(STAT_NAMES)}
    metrics['num_detections'] = len(results)
    return metrics


def _dataset(image_dir: str, ann_file: str, what: str, **kwargs) -> CocoDetectionDataset:
    if not os.path.isdir(image_dir):
        raise DataDirError(f'The {what} image folder {image_dir} does not exist.')
    if not os.path.isfile(ann_file):
        raise DataDirError(f'The {what} annotation file {ann_file} does not exist.')
    try:
        return CocoDetectionDataset(image_dir, ann_file, **kwargs)
    except DataDirError:
        raise
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not COCO-format
        raise DataDirError(f'{ann_file} is not a COCO-format annotation file ({type(e).__name__}: {e})') from None


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    # every check before anything is built or written
    check_input_size(args.backbone, '--min-size', args.min_size)
    if args.max_size < args.min_size:
        raise UsageError(f'--max-size {args.max_size} is below --min-size {args.min_size}')
    previous, state, weights = check_dense_args(args)
    pretrained = pretrained_weights(args.backbone, args.pretrained) if state is None else None
    with_masks = args.model == 'maskrcnn'
    train_set = _dataset(args.train_images, args.train_ann, 'training', with_masks=with_masks, train=True,
                         hflip=args.hflip)
    val_set = _dataset(args.val_images or args.train_images, args.val_ann or args.train_ann, 'validation',
                       with_masks=with_masks, cat_ids=train_set.cat_ids)
    num_classes = len(train_set.cat_ids) + 1
    check_checkpoint_classes(args.checkpoint, num_classes)
    device = resolve_device(args.device)
    set_threads(args.threads, args.workers)
    random_seed(args.seed)  # the model's initialisation
    model = BUILDERS[args.model](
        backbone=pretrained_name(args.backbone, args.pretrained),
        num_classes=num_classes,
        pretrained_file=args.pretrained_file or pretrained,
        backbone_checkpoint=args.backbone_checkpoint,
        frozen_bn=args.frozen_bn,
        frozen_stages=args.frozen_stages,
        min_size=args.min_size,
        max_size=args.max_size,
        backbone_kwargs=dict(drop_path_rate=args.drop_path) if args.drop_path else None,
        **({'score_thresh': args.score_thresh} if args.model == 'retinanet'
           else {'box_score_thresh': args.score_thresh}),
        **({'detections_per_img': args.detections_per_img} if args.model == 'retinanet'
           else {'box_detections_per_img': args.detections_per_img}),
        **args.detector_kwargs,
    )
    if weights is not None:
        load_model_weights(model, weights, args.checkpoint)
    if args.overwrite:
        clear_run_files(args.output_dir, previous)
    model.to(device)
    train_loader = make_loader(train_set, args.batch_size, args.workers, shuffle=True, seed=args.seed,
                               collate_fn=collate)
    val_loader = make_loader(val_set, args.batch_size, args.workers, collate_fn=collate)

    def forward(model, batch):
        images, targets = batch
        parts = model([im.to(device) for im in images], [{k: v.to(device) for k, v in t.items()} for t in targets])
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}, len(images), []

    meta = {'model': args.model, 'backbone': args.backbone, 'num_classes': num_classes, 'cat_ids': train_set.cat_ids}
    task = Task(forward=forward, evaluate=lambda m, desc: evaluate(m, val_set, val_loader, device, args),
                score='bbox_AP', describe=describe, meta=meta,
                summary=dict(meta, train_images=len(train_set), val_images=len(val_set)))
    run_info = dict(num_classes=num_classes, cat_ids=train_set.cat_ids)
    if args.eval_only:
        return evaluate_only(args, model, task, run_info)
    return train(args, model, train_loader, task, lr_schedule(args), DistInfo(device), state=state, run_info=run_info)


if __name__ == '__main__':
    sys.exit(run_cli(main))
