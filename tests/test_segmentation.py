""" Semantic segmentation on DGMN2 (dgmn_timm.tasks.segmentation) and the segmentation training script. """
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import dgmn_timm  # noqa: F401
from utils import load_script
from dgmn_timm.tasks.segmentation import (
    FCNHead, SemanticFPNHead, create_segmentation_model, fcn_dgmn2, semantic_fpn_dgmn2,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def fpn_model():
    torch.manual_seed(0)
    return semantic_fpn_dgmn2(num_classes=5)


@pytest.mark.parametrize('size', [(67, 93), (33, 129), (64, 64)])
def test_semantic_fpn_output_matches_input_size(fpn_model, size):
    fpn_model.eval()
    with torch.no_grad():
        out = fpn_model(torch.rand(2, 3, *size))
    assert out.shape == (2, 5, *size)
    assert torch.isfinite(out).all()


def test_semantic_fpn_head_structure(fpn_model):
    head = fpn_model.head
    assert isinstance(head, SemanticFPNHead)
    assert fpn_model.backbone.reductions == [4, 8, 16, 32] and fpn_model.backbone.channels == [64, 128, 320, 512]
    # FPN 256 channels over the 4 levels
    assert [m.in_channels for m in head.fpn.inner_blocks.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 320, 512]
    assert all(m.out_channels == 256 for m in head.fpn.modules() if isinstance(m, nn.Conv2d))
    # 1, 1, 2, 3 conv-GN-ReLU blocks per level (stride 4, 8, 16, 32 to stride 4), 128 channels
    assert [len(blocks) for blocks in head.scale_heads] == [1, 1, 2, 3]
    assert head.num_upsamples == [0, 1, 2, 3]
    for blocks in head.scale_heads:
        conv, norm, act = blocks[0]
        assert conv.in_channels == 256 and conv.out_channels == 128 and conv.kernel_size == (3, 3)
        assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32 and isinstance(act, nn.ReLU)
        assert all(b[0].in_channels == 128 for b in blocks[1:])
    assert head.classifier.kernel_size == (1, 1) and head.classifier.in_channels == 128
    # the stride-4 logits are upsampled to the input
    feats = fpn_model.backbone(torch.rand(1, 3, 67, 93))
    assert head(feats).shape[-2:] == feats[0].shape[-2:] == (17, 24)


def test_semantic_fpn_trains(fpn_model):
    fpn_model.train()
    x = torch.rand(2, 3, 64, 80)
    target = torch.randint(0, 5, (2, 64, 80))
    target[:, :4] = 255
    loss = nn.functional.cross_entropy(fpn_model(x), target, ignore_index=255)
    fpn_model.zero_grad()
    loss.backward()
    assert torch.isfinite(loss)
    body = fpn_model.backbone.body
    for p in (body.stem.conv1.weight, body.stages_0.blocks[0].attn.qkv.weight, body.stages_3.blocks[-1].mlp.fc2.weight,
              fpn_model.head.scale_heads[3][0][0].weight, fpn_model.head.classifier.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_fcn_head_output_stride_8():
    torch.manual_seed(0)
    model = fcn_dgmn2(num_classes=4)
    assert isinstance(model.head, FCNHead)
    assert model.backbone.reductions == [8] and model.backbone.channels == [512]
    model.eval()
    x = torch.rand(1, 3, 61, 77)
    with torch.no_grad():
        feats = model.backbone(x)
        out = model(x)
    assert feats[0].shape[-2:] == (8, 10)  # stride 8: the stage-3/4 embeddings have stride 1
    assert out.shape == (1, 4, 61, 77)


def test_semantic_fpn_on_output_stride_8_backbone():
    torch.manual_seed(0)
    model = create_segmentation_model('dgmn2_tiny', num_classes=3, head='fpn', output_stride=8).eval()
    assert model.backbone.reductions == [4, 8]  # of the three stride-8 levels, the deepest (stage 4)
    assert model.backbone.body.feature_info.module_name() == ['stages.0', 'stages.3']
    assert [len(b) for b in model.head.scale_heads] == [1, 1]
    with torch.no_grad():
        assert model(torch.rand(1, 3, 45, 71)).shape == (1, 3, 45, 71)


def test_bad_arguments():
    with pytest.raises(ValueError, match='head'):
        create_segmentation_model(head='upernet')
    with pytest.raises(ValueError, match='strides'):
        SemanticFPNHead([64, 128], 3, in_strides=[8, 4])
    with pytest.raises(ValueError, match='strides'):
        SemanticFPNHead([64, 128], 3, in_strides=[4, 12])


# --------------------------------------------------------------------------------------------
# training script
# --------------------------------------------------------------------------------------------

def test_miou_computation():
    script = load_script('train_segmentation')
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = script.confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    assert conf.sum() == 7  # the ignored pixel is left out
    m = script.segmentation_metrics(conf)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 1 -> 2/4; class 2: tp 1, fp 1, fn 1 -> 1/3
    # class 3 is absent from the ground truth: not averaged
    assert m['per_class_iou'][:3] == pytest.approx([1 / 3, 1 / 2, 1 / 3]) and m['per_class_iou'][3] is None
    assert m['mIoU'] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m['aAcc'] == pytest.approx(4 / 7)


def make_segmentation_dataset(root: Path):
    """ Synthetic image / mask folders: a red rectangle (class 1), a blue band (class 2), background 0. """
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir(parents=True)
    for i, (h, w) in enumerate([(64, 80), (67, 93)]):
        img = (rng.random((h, w, 3)) * 50).astype(np.uint8)
        mask = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        mask[y:y + h // 3, x:x + w // 3] = 1
        mask[-10:] = 2
        img[mask == 1] = (220, 30, 30)
        img[mask == 2] = (30, 30, 220)
        mask[0] = 255  # unlabelled
        Image.fromarray(img).save(root / 'images' / f'img{i}.jpg')
        Image.fromarray(mask).save(root / 'masks' / f'img{i}.png')
    return root / 'images', root / 'masks'


def test_training_recipe_on_timm_factories():
    """ The recipe on timm's factories: AdamW, weight decay on every parameter, poly (power 0.9) over all
    iterations, stepped per update. """
    from dgmn_timm.tools.engine import create_optimizer, create_scheduler
    script = load_script('train_segmentation')
    args = script.parse_args(['--train-images', '.', '--train-masks', '.', '--num-classes', '3', '--epochs', '4'])
    optimizer = create_optimizer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), args, args.lr)
    assert type(optimizer).__name__ == 'AdamW' and len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]['weight_decay'] == 1e-4 and len(optimizer.param_groups[0]['params']) == 4
    scheduler = create_scheduler(optimizer, args.epochs, 25, **script.lr_schedule(args))
    for it in (0, 1, 37, 99, 100):
        scheduler.step_update(it)
        assert optimizer.param_groups[0]['lr'] == pytest.approx(1e-4 * (1 - it / 100) ** 0.9, abs=1e-12), it


def test_mask_label_above_num_classes_is_one_line(tmp_path, capsys):
    """ A mask label >= --num-classes stops the run with one line naming the file, also when a loader worker
    finds it, and leaves no folder behind (it failed before its first step). """
    from PIL import Image
    from dgmn_timm.tools.cli import run_cli
    (tmp_path / 'img').mkdir()
    (tmp_path / 'mask').mkdir()
    Image.new('RGB', (40, 40)).save(tmp_path / 'img' / 'a.png')
    Image.fromarray(np.full((40, 40), 5, np.uint8)).save(tmp_path / 'mask' / 'a.png')
    out = tmp_path / 'out'
    assert run_cli(load_script('train_segmentation').main, [
        '--train-images', str(tmp_path / 'img'), '--train-masks', str(tmp_path / 'mask'), '--num-classes', '2',
        '--crop-size', '32', '32', '--batch-size', '1', '--epochs', '1', '--workers', '1', '--no-progress',
        '--output-dir', str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f'error: {tmp_path / "mask" / "a.png"} has labels outside 0..1 (and the ignore index 255); ' \
                   'check --num-classes'
    assert not out.exists()


def read_metrics(out: Path):
    return [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines() if line.strip()]


def test_train_segmentation_script(tmp_path, capsys):
    images, masks = make_segmentation_dataset(tmp_path / 'data')
    out = tmp_path / 'run'
    cmd = [
        sys.executable, str(REPO / 'scripts' / 'train_segmentation.py'),
        '--train-images', str(images), '--train-masks', str(masks), '--num-classes', '3',
        '--backbone', 'dgmn2_tiny', '--crop-size', '64', '64', '--scale-range', '0.75', '1.25',
        '--epochs', '2', '--batch-size', '2', '--lr', '1e-3', '--workers', '0', '--device', 'cpu',
        '--eval-interval', '2', '--threads', '1', '--output-dir', str(out), '--opt', 'momentum', '--momentum', '0.9',
    ]
    # a crop below DGMN2's 32 px: one error line, nothing written; the corrected command below then runs
    script = load_script('train_segmentation')
    from dgmn_timm.tools.cli import UsageError, run_cli
    small = [a if a != '64' else '8' for a in cmd[2:]]
    assert run_cli(script.main, small) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'error: --crop-size 8 8: dgmn2_tiny takes inputs of at least 32 pixels']
    assert not out.exists()

    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'epoch 2/2' in proc.stderr  # tqdm progress bar
    assert 'epoch 2/2: loss' in proc.stdout and 'mIoU' in proc.stdout
    metrics = read_metrics(out)
    assert [e['epoch'] for e in metrics] == [1, 2]
    assert all(np.isfinite(e['train_loss']) for e in metrics)
    assert 'val_mIoU' not in metrics[0]  # --eval-interval 2
    ev = metrics[-1]
    assert 0.0 <= ev['val_mIoU'] <= 1.0 and 0.0 <= ev['val_aAcc'] <= 1.0 and len(ev['val_per_class_iou']) == 3
    assert ev['val_aAcc'] > 0.5  # better than a random guess of 3 classes after two epochs on two easy images
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['val_mIoU'] == ev['val_mIoU'] and summary['best_epoch'] == 2
    from safetensors.torch import load_file
    model = semantic_fpn_dgmn2(num_classes=3)
    model.load_state_dict(load_file(str(out / 'last.safetensors')))

    # the finished run is never overwritten by accident; --resume continues it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match='holds a previous run.*--resume.*--overwrite'):
        script.main(cmd[2:])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    resumed = script.main(cmd[2:] + ['--resume', '--epochs', '3', '--no-progress'])
    assert resumed['epochs'] == 3 and resumed['train_time_s'] > summary['train_time_s']
    assert [e['epoch'] for e in read_metrics(out)] == [1, 2, 3] and read_metrics(out)[:2] == metrics


@pytest.mark.slow
def test_semantic_fpn_overfits_one_batch():
    """ Semantic FPN fits a fixed two-class pattern: pixel accuracy close to 1. """
    torch.manual_seed(0)
    model = semantic_fpn_dgmn2(num_classes=2)
    x = torch.randn(2, 3, 64, 64) * 0.1
    target = torch.zeros(2, 64, 64, dtype=torch.long)
    target[0, 10:40, 20:50] = 1
    target[1, 30:60, 5:30] = 1
    x[target[:, None].expand_as(x) == 1] += 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == target).float().mean()
    assert acc > 0.95
