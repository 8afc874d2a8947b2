""" Detection on DGMN2 (dgmn_timm.tasks.detection) and the detection training script. """
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torchvision.ops.misc import FrozenBatchNorm2d

import timm
import dgmn_timm  # noqa: F401
from utils import to_released_layout
from dgmn_timm.weights.checkpoints import read_checkpoint
from utils import load_script
from dgmn_timm.errors import CheckpointMismatchError, CheckpointNotFoundError
from dgmn_timm.tasks.detection import (
    create_feature_backbone, fasterrcnn_dgmn2, freeze_batch_norm, maskrcnn_dgmn2, retinanet_dgmn2, timm_fpn_backbone,
)

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
SIZES = [(64, 96), (80, 64)]  # non-square, different aspect ratios in one batch
# small proposal / sampling budgets keep the R-CNN heads cheap on CPU
SMALL_RCNN = dict(
    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64, box_batch_size_per_image=32,
    box_score_thresh=0.0, box_detections_per_img=20)
SMALL_RETINA = dict(score_thresh=0.0, topk_candidates=100, detections_per_img=20)
BUILDERS = {
    'retinanet': (retinanet_dgmn2, SMALL_RETINA),
    'fasterrcnn': (fasterrcnn_dgmn2, SMALL_RCNN),
    'maskrcnn': (maskrcnn_dgmn2, SMALL_RCNN),
}


def _build(kind: str, **kwargs):
    builder, small = BUILDERS[kind]
    return builder(num_classes=NUM_CLASSES, min_size=64, max_size=128, **{**small, **kwargs})


def _batch(with_masks: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i, (h, w) in enumerate(SIZES):
        images.append(torch.rand(3, h, w, generator=g))
        boxes = torch.tensor([[4., 6., 40., 38.], [20., 30., 60., 62.]])
        boxes[:, 0::2].clamp_(max=w - 1)
        boxes[:, 1::2].clamp_(max=h - 1)
        t = {'boxes': boxes, 'labels': torch.tensor([1, 2 - i])}
        if with_masks:
            masks = torch.zeros(2, h, w, dtype=torch.uint8)
            for j, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[j, y1:y2, x1:x2] = 1
            t['masks'] = masks
        targets.append(t)
    return images, targets


def _grad_norm(p: torch.Tensor) -> float:
    return 0.0 if p.grad is None else float(p.grad.abs().sum())


# --------------------------------------------------------------------------------------------
# detectors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['retinanet', 'fasterrcnn', 'maskrcnn'])
def test_detector_train_step_and_predictions(kind):
    torch.manual_seed(0)
    model = _build(kind)
    images, targets = _batch(with_masks=kind == 'maskrcnn')
    model.train()
    losses = model(images, targets)
    expected = {
        'retinanet': {'classification', 'bbox_regression'},
        'fasterrcnn': {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'},
        'maskrcnn': {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'},
    }[kind]
    assert set(losses) == expected
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    body = model.backbone.body.body
    # gradients reach the stem (through frozen BN) and the last stage's attention
    assert _grad_norm(body.stem.conv1.weight) > 0
    assert _grad_norm(body.stages_3.blocks[-1].attn.qkv.weight) > 0
    assert _grad_norm(body.stages_3.blocks[-1].attn.walk.weight) > 0

    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert isinstance(preds, list) and len(preds) == len(images)
    for pred, (h, w) in zip(preds, SIZES):
        keys = {'boxes', 'scores', 'labels'} | ({'masks'} if kind == 'maskrcnn' else set())
        assert set(pred) == keys
        n = pred['boxes'].shape[0]
        assert 0 < n <= 20
        assert pred['boxes'].shape == (n, 4) and pred['scores'].shape == (n,) and pred['labels'].shape == (n,)
        # boxes are in the coordinates of the original (non-square) image
        assert (pred['boxes'][:, 0::2] <= w + 1e-3).all() and (pred['boxes'][:, 1::2] <= h + 1e-3).all()
        assert (pred['boxes'] >= 0).all()
        # R-CNNs never predict background 0; torchvision's RetinaNet scores index 0 like any class
        # (it only never sees it as a target), so an untrained one may
        lowest = 0 if kind == 'retinanet' else 1
        assert ((pred['labels'] >= lowest) & (pred['labels'] < NUM_CLASSES)).all()
        if kind == 'maskrcnn':
            assert pred['masks'].shape == (n, 1, h, w)


@pytest.mark.parametrize('kind,levels,strides', [
    ('retinanet', ['0', '1', '2', 'p6', 'p7'], [8, 16, 32, 64, 128]),
    ('maskrcnn', ['0', '1', '2', '3', 'pool'], [4, 8, 16, 32, 64]),
])
def test_backbone_levels_and_paper_defaults(kind, levels, strides):
    builder = BUILDERS[kind][0]
    model = builder()
    # the paper's 1x recipe
    assert model.transform.min_size == (800,) and model.transform.max_size == 1333
    assert list(model.transform.image_mean) == [0.485, 0.456, 0.406]
    backbone = model.backbone
    assert backbone.out_channels == 256 and backbone.strides == strides
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())  # frozen BN by default
    backbone.eval()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        out = backbone(x)
    assert list(out) == levels
    for f, s in zip(out.values(), strides):
        assert f.shape[:2] == (1, 256)
        assert f.shape[-2:] == (-(-96 // s), -(-128 // s))
    # kwargs override the defaults
    model = builder(min_size=320, max_size=512, num_classes=5)
    assert model.transform.min_size == (320,) and model.transform.max_size == 512


def test_freeze_batch_norm_copies_statistics():
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-3))
    with torch.no_grad():
        bn[1].running_mean.normal_()
        bn[1].running_var.uniform_(0.5, 2.0)
        bn[1].weight.normal_()
        bn[1].bias.normal_()
    x = torch.randn(2, 3, 10, 10)
    ref = bn.eval()(x)
    frozen = freeze_batch_norm(bn)
    assert isinstance(frozen[1], FrozenBatchNorm2d) and frozen[1].eps == 1e-3
    torch.testing.assert_close(frozen.train()(x), ref)


def _bn_state(module: nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if re.search(r'(stem|downsample)\.norm\d?\.', k)}


@pytest.mark.parametrize('frozen_bn', [True, False])
def test_frozen_bn_really_freezes(frozen_bn):
    torch.manual_seed(0)
    model = _build('fasterrcnn', frozen_bn=frozen_bn)
    body = model.backbone.body.body
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    n_frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    if frozen_bn:
        assert not has_bn and n_frozen == 6  # 3 in the stem, one per patch embedding of stages 2-4
    else:
        assert has_bn and n_frozen == 0
    before = _bn_state(body)
    conv_before = body.stem.conv1.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    images, targets = _batch(with_masks=False)
    sum(model(images, targets).values()).backward()
    optimizer.step()
    after = _bn_state(body)
    assert not torch.equal(body.stem.conv1.weight, conv_before)  # the step did train the backbone
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if frozen_bn:
        assert before and not changed
    else:  # unfrozen BN: statistics and affine parameters move
        assert any(k.endswith('running_mean') for k in changed) and any(k.endswith('weight') for k in changed)


def test_frozen_stages():
    torch.manual_seed(0)
    model = _build('retinanet', frozen_stages=2, backbone_kwargs=dict(drop_path_rate=0.2))
    body = model.backbone.body.body
    frozen = [body.stem, body.stages_0, body.stages_1]
    trained = [body.stages_2, body.stages_3]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trained for p in m.parameters())
    model.train()
    assert all(not m.training for f in frozen for m in f.modules())
    assert all(m.training for m in trained)
    snap = {k: v.clone() for k, v in body.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    images, targets = _batch(with_masks=False)
    sum(model(images, targets).values()).backward()
    optimizer.step()
    now = body.state_dict()
    for k in snap:
        same = torch.equal(snap[k], now[k])
        if k.startswith(('stem.', 'stages_0.', 'stages_1.')):
            assert same, k
    assert not torch.equal(snap['stages_2.blocks.0.attn.qkv.weight'], now['stages_2.blocks.0.attn.qkv.weight'])
    with pytest.raises(ValueError, match='frozen_stages'):
        create_feature_backbone('dgmn2_tiny', frozen_stages=7)


# --------------------------------------------------------------------------------------------
# released detection checkpoints
# --------------------------------------------------------------------------------------------

def _to_released_layout(state_dict, prefix='backbone.'):
    """ Our DGMN2 keys -> the authors' released key layout (docs/ARCHITECTURE.md, "Released checkpoint layout"), headless, with a prefix. """
    return {prefix + k: v for k, v in to_released_layout(state_dict).items() if not k.startswith('head.')}


def _reference_model(variant='dgmn2_tiny', seed=1):
    torch.manual_seed(seed)
    model = timm.create_model(variant)
    with torch.no_grad():  # non-trivial BN statistics, so that they must be loaded too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def _write_released_detection_checkpoint(path, model):
    state = _to_released_layout(model.state_dict())
    assert 'backbone.patch_embed1.conv1.weight' in state and 'backbone.block4.1.attn.pos_emb.rel_width' in state
    state['neck.lateral_convs.0.conv.weight'] = torch.randn(256, 128, 1, 1)
    state['bbox_head.retina_cls.weight'] = torch.randn(720, 256, 3, 3)
    torch.save({'meta': {'epoch': 12, 'CLASSES': ('person', 'car')}, 'state_dict': state}, path)


def test_released_detection_checkpoint_loads(tmp_path):
    ref = _reference_model()
    path = tmp_path / 'retinanet_dgmn2_tiny_1x.pth'
    _write_released_detection_checkpoint(path, ref)

    torch.manual_seed(123)
    model = retinanet_dgmn2(backbone_checkpoint=str(path), min_size=64, max_size=128).eval()
    torch.manual_seed(123)
    unloaded = retinanet_dgmn2(min_size=64, max_size=128).eval()
    x = torch.rand(1, 3, 72, 104)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, indices=(1, 2, 3), intermediates_only=True)
        got = model.backbone.body(x)
        other = unloaded.backbone.body(x)
    assert len(got) == 3
    for g, e, o in zip(got, expected, other):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(o, e, atol=1e-3)  # a model that did not load differs

    # all four levels (R-CNN backbone, BN not frozen) load the same way
    backbone = create_feature_backbone('dgmn2_tiny', backbone_checkpoint=str(path)).eval()
    with torch.no_grad():
        for g, e in zip(backbone(x), ref.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_pretrained_file_and_local_dir(tmp_path):
    """ ImageNet weights through timm: a local file (DeiT-style dict) and a local-dir: hub folder. """
    from timm.models import save_for_hf
    ref = _reference_model(seed=2)
    torch.save({'model': ref.state_dict(), 'epoch': 299}, tmp_path / 'dgmn2_tiny.pth')
    save_for_hf(ref, str(tmp_path / 'hub'))
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, intermediates_only=True)
        for model in (
                maskrcnn_dgmn2(pretrained_file=str(tmp_path / 'dgmn2_tiny.pth')),
                maskrcnn_dgmn2('local-dir:' + str(tmp_path / 'hub'), pretrained=True),
        ):
            for g, e in zip(model.backbone.body.eval()(x), expected):
                torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    with pytest.raises(CheckpointNotFoundError, match='does not exist'):
        retinanet_dgmn2(pretrained_file=str(tmp_path / 'nope.pth'))
    with pytest.raises(ValueError, match='give one of'):
        retinanet_dgmn2(pretrained_file=str(tmp_path / 'dgmn2_tiny.pth'), backbone_checkpoint=str(tmp_path / 'x.pth'))


def test_mismatched_detection_checkpoint_raises(tmp_path):
    path = tmp_path / 'small.pth'
    torch.save({'state_dict': _to_released_layout(timm.create_model('dgmn2_small').state_dict())}, path)
    with pytest.raises(CheckpointMismatchError, match='dgmn2_tiny'):
        create_feature_backbone('dgmn2_tiny', backbone_checkpoint=str(path))
    # weights are loaded into the whole model before timm wraps it: a missing stage is missing,
    # even when the feature levels asked for do not reach it
    truncated = {k: v for k, v in read_checkpoint(path)['state_dict'].items() if 'block4' not in k}
    torch.save({'state_dict': truncated}, tmp_path / 'truncated.pth')
    with pytest.raises(CheckpointMismatchError, match=r'truncated.pth: .*dgmn2_small: Missing keys') as e:
        create_feature_backbone('dgmn2_small', out_indices=(0, 1, 2), backbone_checkpoint=str(tmp_path / 'truncated.pth'))
    assert '\n' not in str(e.value)


def test_other_timm_backbone(tmp_path):
    """ The FPN backbone is generic over timm models (here a ResNet with BatchNorm everywhere). """
    torch.manual_seed(0)
    src = timm.create_model('resnet18', features_only=True, out_indices=(2, 3, 4))
    state = {'backbone.' + k: v for k, v in src.state_dict().items()}
    state['roi_head.fc.weight'] = torch.zeros(3)
    torch.save({'state_dict': state}, tmp_path / 'detector.pth')
    backbone = timm_fpn_backbone(
        'resnet18', out_indices=(2, 3, 4), extra_blocks='p6p7', frozen_bn=True, frozen_stages=1,
        backbone_checkpoint=str(tmp_path / 'detector.pth'))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    # stage 1 of a ResNet is layer1 (stride 4), the stem conv1 / bn1
    assert not any(p.requires_grad for p in backbone.body.body.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.body.body.layer1.parameters())
    assert all(p.requires_grad for p in backbone.body.body.layer2.parameters())
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 64, 64))
        torch.testing.assert_close(backbone.body(torch.ones(1, 3, 64, 64))[0], src.eval()(torch.ones(1, 3, 64, 64))[0])
    assert list(out) == ['0', '1', '2', 'p6', 'p7'] and backbone.strides == [8, 16, 32, 64, 128]


# --------------------------------------------------------------------------------------------
# training script
# --------------------------------------------------------------------------------------------

def make_coco_dataset(root: Path, num_images: int = 4):
    """ Synthetic COCO-format data: coloured rectangles (2 categories) on dark noise. """
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / 'images').mkdir(parents=True)
    images, anns = [], []
    for i in range(num_images):
        h, w = SIZES[i % len(SIZES)]
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        for j in range(2):
            bw, bh = int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cat = 3 + 4 * ((i + j) % 2)  # non-contiguous category ids 3 and 7
            img[y:y + bh, x:x + bw] = (200, 40, 40) if cat == 3 else (40, 200, 40)
            anns.append(dict(id=len(anns) + 1, image_id=i + 1, category_id=cat, bbox=[x, y, bw, bh],
                             area=bw * bh, iscrowd=0, segmentation=[[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]))
        Image.fromarray(img).save(root / 'images' / f'{i:03d}.png')
        images.append(dict(id=i + 1, file_name=f'{i:03d}.png', height=h, width=w))
    categories = [dict(id=3, name='red'), dict(id=7, name='green')]
    with open(root / 'instances.json', 'w') as f:
        json.dump(dict(info={}, images=images, annotations=anns, categories=categories), f)
    return root / 'images', root / 'instances.json'


class _Oracle(nn.Module):
    """ Returns given predictions in order, like a detector in eval mode. """

    def __init__(self, outputs):
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_coco_evaluation_maps_categories(tmp_path):
    """ Ground-truth predictions score AP 1 (boxes and masks); shuffled labels do not. """
    script = load_script('train_detection')
    images, ann = make_coco_dataset(tmp_path / 'data', num_images=3)
    dataset = script.CocoDetectionDataset(str(images), str(ann), with_masks=True)
    assert dataset.cat_ids == [3, 7] and len(dataset) == 3
    args = script.parse_args(['--train-images', '.', '--train-ann', '.', '--no-progress'])
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=script.collate)
    targets = [dataset[i][1] for i in range(len(dataset))]

    def predictions(swap: bool):
        return [{'boxes': t['boxes'], 'scores': torch.ones(len(t['labels'])),
                 'labels': (3 - t['labels']) if swap else t['labels'],
                 'masks': t['masks'][:, None].float()} for t in targets]

    metrics = script.evaluate(_Oracle(predictions(False)), dataset, loader, torch.device('cpu'), args)
    assert metrics['bbox']['AP'] == pytest.approx(1.0) and metrics['segm']['AP'] == pytest.approx(1.0)
    metrics = script.evaluate(_Oracle(predictions(True)), dataset, loader, torch.device('cpu'), args)
    assert metrics['bbox']['AP'] == 0.0


def test_train_detection_script(tmp_path):
    images, ann = make_coco_dataset(tmp_path / 'data', num_images=2)
    out = tmp_path / 'run'
    small = {k: v for k, v in SMALL_RCNN.items() if not k.startswith('box_score') and k != 'box_detections_per_img'}
    cmd = [
        sys.executable, str(REPO / 'scripts' / 'train_detection.py'),
        '--train-images', str(images), '--train-ann', str(ann),
        '--model', 'maskrcnn', '--backbone', 'dgmn2_tiny', '--min-size', '64', '--max-size', '96',
        '--epochs', '1', '--batch-size', '2', '--lr', '1e-4', '--warmup-iters', '1', '--workers', '0',
        '--device', 'cpu', '--threads', '1', '--detections-per-img', '10',
        '--detector-kwargs', json.dumps(small), '--output-dir', str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'epoch 1/1' in proc.stderr  # tqdm progress bar
    assert re.search(r'epoch 1/1: loss .*, box AP \d\.\d{4}, mask AP \d\.\d{4}', proc.stdout), proc.stdout[-2000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['num_classes'] == 3 and summary['cat_ids'] == [3, 7]
    (record,) = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert np.isfinite(record['train_loss']) and record['train_samples'] == 2
    assert json.loads((out / 'args.json').read_text())['decay_bias_norm'] is True  # the paper recipe: decay everything
    for iou_type in ('bbox', 'segm'):
        stats = {k: v for k, v in record.items() if k.startswith(f'val_{iou_type}_')}
        assert set(stats) == {f'val_{iou_type}_{k}' for k in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')}
        assert all(0.0 <= v <= 1.0 for v in stats.values())
    assert record['val_num_detections'] > 0
    # the safetensors checkpoint loads into a fresh detector
    from safetensors.torch import load_file
    model = maskrcnn_dgmn2(num_classes=3)
    model.load_state_dict(load_file(str(out / 'last.safetensors')))


def test_training_recipe_on_timm_factories():
    """ The paper's recipe on timm's factories: weight decay on every parameter, 500 warm-up iterations
    from 1e-3 x lr, x0.1 after epochs 8 and 11 (timm steps a milestone one update early). """
    from dgmn_timm.tools.engine import create_optimizer, create_scheduler
    script = load_script('train_detection')
    args = script.parse_args(['--train-images', '.', '--train-ann', '.'])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = create_optimizer(model, args, args.lr)
    assert [g['weight_decay'] for g in optimizer.param_groups] == [1e-4]
    assert sum(len(g['params']) for g in optimizer.param_groups) == 4  # biases and norms decay too
    per_epoch = 100
    scheduler = create_scheduler(optimizer, args.epochs, per_epoch, **script.lr_schedule(args))

    def paper(it):  # the hand-made form
        factor = 0.1 ** sum(it + 1 >= s * per_epoch for s in args.lr_steps)
        return factor * (1e-3 + (1 - 1e-3) * it / 500 if it < 500 else 1.)

    for it in (0, 1, 250, 499, 500, 799, 800, 1099, 1100, 1199):
        scheduler.step_update(it)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-4 * paper(it), rel=1e-6), it


@pytest.mark.slow
def test_detector_learns_synthetic_boxes():
    """ A few dozen steps on one fixed batch: the detection losses fall clearly. """
    torch.manual_seed(0)
    model = _build('fasterrcnn')
    images, targets = _batch(with_masks=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    history = []
    for _ in range(30):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:3])
