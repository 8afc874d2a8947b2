""" CDGC layer (dgmn_timm.layers.CDGC), its dynamic sampling, and CDGCNet (dgmn_timm.tasks.segmentation). """
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dgmn_timm  # noqa: F401
from dgmn_timm.layers import CDGC, cdgc_class_masks
from dgmn_timm.tasks.segmentation import (
    HEAD_DEFAULTS, HEADS, CDGCLoss, CDGCNet, cdgcnet, cdgcnet_resnet101, create_segmentation_model,
    ohem_cross_entropy,
)

REPO = Path(__file__).resolve().parents[1]


def cdgc_dense_reference(layer: CDGC, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """ Slow float64 CDGC: a dense N x N adjacency per class with the softmax restricted to the
    class's pixels by explicit masks, the full (M * C, H, W) class map, and the layer's convs
    applied as convs. Differentiable in ``x`` and the layer's (float64) parameters.
    """
    batch, dim, height, width = x.shape
    num_classes = layer.num_classes
    q = F.conv2d(x, layer.query.weight).flatten(2)  # (B, C, N)
    k = F.conv2d(x, layer.key.weight).flatten(2)
    v = x.flatten(2)
    flat = masks.flatten(2)  # (B, M, N)
    maps = []
    for b in range(batch):
        per_class = []
        for m in range(num_classes):
            inside = flat[b, m]
            if not inside.any():
                per_class.append(torch.zeros_like(v[b]))
                continue
            logits = q[b].t() @ k[b]  # (N, N): logits[i, j] = (W x_i)^T (W' x_j)
            logits = logits.masked_fill(~inside[None, :], float('-inf'))
            adjacency = torch.softmax(logits, dim=-1) * inside[:, None]  # rows outside the class: 0
            per_class.append(v[b] @ adjacency.t())  # (C, N): y_i = sum_j A_ij x_j
        maps.append(torch.cat(per_class, 0))
    class_map = torch.stack(maps).view(batch, num_classes * dim, height, width)
    z = F.relu(F.conv2d(class_map, layer.class_conv.weight, groups=num_classes))
    z = z * masks.repeat_interleave(dim, dim=1)  # pixels outside a class contribute nothing
    merged = F.conv2d(z, layer.merge.weight, layer.merge.bias)
    fused = torch.cat([x, merged], 1) if layer.fusion == 'concat' else x + merged
    return F.conv2d(fused, layer.classifier.weight, layer.classifier.bias)


def coarse_from_labels(labels: torch.Tensor, num_classes: int, seed: int = 0) -> torch.Tensor:
    """ Random coarse logits whose argmax is ``labels`` (B, H, W). """
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand((labels.shape[0], num_classes) + tuple(labels.shape[1:]), generator=g, dtype=torch.float64)
    return noise + 2.0 * F.one_hot(labels, num_classes).permute(0, 3, 1, 2)


def random_labels(batch, height, width, num_classes, seed=0):
    """ Labels over classes 2.. at random, class 0 empty, class 1 a single pixel (in image 0). """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, num_classes, (batch, height, width), generator=g)
    labels[0, height // 2, width // 2] = 1
    return labels


def check_against_reference(layer, x, coarse, target=None):
    layer = layer.double()
    ref_layer = copy.deepcopy(layer)
    x = x.double().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(3)
    out = layer(x, coarse, target)
    torch.manual_seed(3)  # the same random draw for ratio < 1
    masks = cdgc_class_masks(coarse, target, layer.ratio)
    ref = cdgc_dense_reference(ref_layer, x_ref, masks)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    (ref * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for (name, p), p_ref in zip(layer.named_parameters(), ref_layer.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)
    return masks


@pytest.mark.parametrize('fusion', ['concat', 'sum'])
@pytest.mark.parametrize('size', [(5, 7), (3, 1), (1, 1)])
def test_cdgc_matches_dense_reference(fusion, size):
    torch.manual_seed(0)
    num_classes, dim = 5, 6
    layer = CDGC(dim, num_classes, fusion=fusion)
    labels = random_labels(2, *size, num_classes)
    coarse = coarse_from_labels(labels, num_classes)
    masks = check_against_reference(layer, torch.randn(2, dim, *size), coarse)
    counts = masks.flatten(2).sum(-1)
    assert (counts[:, 0] == 0).all() and counts[0, 1] == 1  # an empty and a single-pixel class
    assert (masks.sum(1) == 1).all()  # without a target the classes partition the pixels


@pytest.mark.parametrize('ratio', [1.0, 0.5, 0.0])
def test_cdgc_with_target_matches_dense_reference(ratio):
    torch.manual_seed(1)
    num_classes, dim = 4, 5
    layer = CDGC(dim, num_classes, fusion='concat', ratio=ratio)
    labels = random_labels(2, 6, 5, num_classes, seed=1)
    coarse = coarse_from_labels(labels, num_classes, seed=1)
    target = torch.randint(1, num_classes, (2, 6, 5), generator=torch.Generator().manual_seed(2))
    target[:, 0] = 255
    masks = check_against_reference(layer, torch.randn(2, dim, 6, 5), coarse, target)
    assert (masks.sum(1) > 1).any()  # a pixel in its coarse class and its true class


def test_cdgc_single_class_map_and_constant_features():
    # every pixel in one class, equal features (a uniform adjacency): finite, and equal to the reference
    layer = CDGC(4, 3, fusion='sum').double()
    x = torch.ones(1, 4, 3, 3, dtype=torch.float64)
    coarse = torch.zeros(1, 3, 3, 3, dtype=torch.float64)
    coarse[:, 2] = 1.0
    out = layer(x, coarse)
    torch.testing.assert_close(out, cdgc_dense_reference(layer, x, cdgc_class_masks(coarse)))


def test_cdgc_float32_matches_float64():
    torch.manual_seed(0)
    layer = CDGC(8, 4)
    x = torch.randn(1, 8, 9, 11)
    coarse = torch.randn(1, 4, 9, 11)
    out = layer(x, coarse)
    ref = copy.deepcopy(layer).double()(x.double(), coarse.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_cdgc_under_autocast():
    torch.manual_seed(0)
    layer = CDGC(16, 4)
    x = torch.randn(2, 16, 9, 7, requires_grad=True)
    coarse = torch.randn(2, 4, 9, 7)
    target = torch.randint(0, 4, (2, 9, 7))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(x, coarse, target)
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.class_conv.weight.grad).all()
    torch.testing.assert_close(out.float(), layer(x, coarse, target), rtol=0.05, atol=0.05)


def test_dynamic_sampling_hand_computed():
    # coarse labels and ground truth on a 2 x 3 map, 3 classes, 255 unlabelled
    coarse_labels = torch.tensor([[[0, 0, 1],
                                   [1, 2, 2]]])
    target = torch.tensor([[[0, 1, 1],
                            [255, 2, 0]]])
    coarse = coarse_from_labels(coarse_labels, 3)
    # without the ground truth: argmax
    expected_coarse = torch.tensor([[[1, 1, 0], [0, 0, 0]],
                                    [[0, 0, 1], [1, 0, 0]],
                                    [[0, 0, 0], [0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(cdgc_class_masks(coarse)[0], expected_coarse)
    # ratio 1: C u G; the unlabelled pixel (1, 0) is only in its coarse class 1
    union = torch.tensor([[[1, 1, 0], [0, 0, 1]],
                          [[0, 1, 1], [1, 0, 0]],
                          [[0, 0, 0], [0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(cdgc_class_masks(coarse, target, ratio=1.0)[0], union)
    # ratio 0: C u G minus all of C n G = the symmetric difference
    sym = torch.tensor([[[0, 1, 0], [0, 0, 1]],
                        [[0, 1, 0], [1, 0, 0]],
                        [[0, 0, 0], [0, 0, 1]]], dtype=torch.bool)
    assert torch.equal(cdgc_class_masks(coarse, target, ratio=0.0)[0], sym)
    # a target at twice the resolution is reduced by nearest neighbour
    big = target.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(cdgc_class_masks(coarse, big, ratio=1.0)[0], union)


def test_dynamic_sampling_drops_a_random_share_of_the_intersection():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 12, 10), generator=g)
    other = torch.randint(0, 3, (2, 12, 10), generator=g)
    target = torch.where(torch.rand(2, 12, 10, generator=g) < 0.8, labels, other)
    target[:, :, 0] = 255
    coarse = coarse_from_labels(labels, 3)
    c = cdgc_class_masks(coarse)
    gt = F.one_hot(torch.where(target == 255, 0, target), 3).permute(0, 3, 1, 2).bool() & (target != 255)[:, None]
    both = c & gt
    for ratio in (0.25, 0.5, 0.9):
        draws = [cdgc_class_masks(coarse, target, ratio, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        for masks in draws:
            assert torch.equal(masks & ~both, (c | gt) & ~both)  # outside the intersection: the union
            dropped = (both & ~masks).flatten(2).sum(-1).double()
            expected = torch.round((1 - ratio) * both.flatten(2).sum(-1).double())
            assert torch.equal(dropped, expected)
        assert not torch.equal(draws[0], draws[1])  # random: two seeds drop different pixels


def test_cdgc_bad_arguments():
    with pytest.raises(ValueError, match='fusion'):
        CDGC(4, 3, fusion='max')
    with pytest.raises(ValueError, match='ratio'):
        CDGC(4, 3, ratio=1.5)
    layer = CDGC(4, 3)
    with pytest.raises(ValueError, match='x must be'):
        layer(torch.randn(1, 5, 3, 3), torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match='coarse logits'):
        layer(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match='labels outside'):
        layer(torch.randn(1, 4, 3, 3), torch.randn(1, 3, 3, 3), torch.full((1, 3, 3), 3))
    with pytest.raises(ValueError, match='target must be'):
        layer(torch.randn(1, 4, 3, 3), torch.randn(1, 3, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------

def test_ohem_cross_entropy_hand_computed():
    # 4 labelled pixels with true-class probabilities 0.9, 0.6, 0.3, 0.5 and one unlabelled pixel
    probs = torch.tensor([0.9, 0.6, 0.3, 0.5, 0.1])
    logits = torch.stack([torch.log(probs), torch.log(1 - probs)]).view(1, 2, 1, 5)
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    nll = -torch.log(probs)
    # below 0.7: 0.6, 0.3, 0.5
    assert ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1).item() == pytest.approx(nll[1:4].mean().item())
    # at least min_kept = 2 pixels: the two hardest when only one is below 0.4
    assert ohem_cross_entropy(logits, target, thresh=0.4, min_kept=2).item() == pytest.approx(nll[[2, 3]].mean().item())
    # min_kept above the labelled count: all labelled pixels
    assert ohem_cross_entropy(logits, target, thresh=0.1, min_kept=100).item() == pytest.approx(nll[:4].mean().item())
    # nothing labelled: zero, with a gradient
    empty = ohem_cross_entropy(logits.requires_grad_(), torch.full_like(target, 255))
    assert empty.item() == 0.0 and empty.requires_grad


def test_cdgc_loss_weights():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 12))
    target[:, 0] = 255
    coarse, refined, aux = (torch.randn(2, 3, 4, 3) for _ in range(3))
    loss = CDGCLoss(ohem_min_kept=10)(coarse, refined, aux, target)

    def up(t):
        return F.interpolate(t, size=(16, 12), mode='bilinear', align_corners=False)
    expected = (0.6 * F.cross_entropy(up(coarse), target, ignore_index=255)
                + 0.7 * ohem_cross_entropy(up(refined), target, 255, 0.7, 10)
                + 0.4 * F.cross_entropy(up(aux), target, ignore_index=255))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match='ohem_thresh'):
        CDGCLoss(ohem_thresh=0.0)


# --------------------------------------------------------------------------------------------
# CDGCNet
# --------------------------------------------------------------------------------------------

SMALL = dict(channels=16, aspp_channels=8, aux_channels=8)


def test_cdgcnet_resnet101_structure():
    model = cdgcnet_resnet101(num_classes=19)
    assert isinstance(model, CDGCNet)
    body = model.backbone
    assert body.reductions == [8, 8] and body.channels == [1024, 2048]  # layer3 (aux) and layer4, dilated
    assert body.body.feature_info.module_name() == ['layer3', 'layer4']
    assert model.head.aspp.convs[0][0].in_channels == 2048
    assert [m[0].dilation for m in model.head.aspp.convs[1:4]] == [(12, 12), (24, 24), (36, 36)]
    cdgc = model.head.cdgc
    assert cdgc.dim == 512 and cdgc.num_classes == 19 and cdgc.fusion == 'concat' and cdgc.ratio == 1.0
    assert cdgc.class_conv.groups == 19 and tuple(cdgc.class_conv.weight.shape) == (19 * 512, 512, 1, 1)
    assert tuple(cdgc.merge.weight.shape) == (512, 19 * 512, 1, 1)
    assert model.aux_head.convs[0][0].in_channels == 1024
    assert HEADS['cdgc'] is cdgcnet
    assert HEAD_DEFAULTS['cdgc'] == dict(opt='momentum', lr=0.01, momentum=0.9, weight_decay=5e-4, poly_power=0.9,
                                         output_stride=8, drop_path=0.0)


def test_cdgcnet_dgmn2_backbone_any_size():
    torch.manual_seed(0)
    model = create_segmentation_model('dgmn2_tiny', num_classes=3, head='cdgc', **SMALL)
    assert isinstance(model, CDGCNet) and model.backbone.reductions == [8, 8]
    assert model.backbone.channels == [320, 512]
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 45, 61))
    assert out.shape == (1, 3, 45, 61) and torch.isfinite(out).all()


def test_cdgcnet_training_loss_uses_the_target():
    torch.manual_seed(0)
    model = cdgcnet('resnet10t', num_classes=3, **SMALL)
    x = torch.rand(2, 3, 48, 40)
    target = torch.randint(0, 3, (2, 48, 40))
    model.train()
    loss = model.training_loss(x, target)
    loss.backward()
    assert torch.isfinite(loss)
    for p in (model.backbone.body.conv1[0].weight, model.head.cdgc.class_conv.weight, model.head.cdgc.query.weight,
              model.head.coarse.weight, model.aux_head.classifier.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='batches of 2'):
        model.training_loss(x[:1], target[:1])
    with pytest.raises(ValueError, match='target must be'):
        model.training_loss(x, target[:, :20])
    with pytest.raises(ValueError, match='two backbone levels'):
        cdgcnet('resnet10t', num_classes=3, out_indices=(4,), **SMALL)


def make_dataset(root: Path, n: int = 4, size: int = 48):
    """ Image / mask folders: a red square (class 1) and a blue band (class 2) on dark noise (class 0),
    the first row unlabelled (255). """
    rng = np.random.default_rng(0)
    (root / 'images').mkdir(parents=True)
    (root / 'masks').mkdir(parents=True)
    for i in range(n):
        image = (rng.random((size, size, 3)) * 50).astype(np.uint8)
        mask = np.zeros((size, size), np.uint8)
        y, x = (int(v) for v in rng.integers(0, size // 2, 2))
        mask[y:y + size // 3, x:x + size // 3] = 1
        mask[-size // 5:] = 2
        image[mask == 1] = (220, 30, 30)
        image[mask == 2] = (30, 30, 220)
        mask[0] = 255
        Image.fromarray(image).save(root / 'images' / f'img{i}.png')
        Image.fromarray(mask).save(root / 'masks' / f'img{i}.png')
    return root / 'images', root / 'masks'


def test_cdgcnet_tiny_training_run_with_the_script(tmp_path):
    """ scripts/train_segmentation.py --head cdgc: the paper's recipe (SGD, momentum 0.9, weight decay
    5e-4, poly 0.9) by default; a larger lr for a 16-step run. The loss falls and mIoU is reported. """
    images, masks = make_dataset(tmp_path / 'data')
    out = tmp_path / 'run'
    cmd = [
        sys.executable, str(REPO / 'scripts' / 'train_segmentation.py'), '--head', 'cdgc', '--backbone', 'resnet10t',
        '--train-images', str(images), '--train-masks', str(masks), '--num-classes', '3',
        '--crop-size', '48', '48', '--scale-range', '1', '1', '--epochs', '8', '--batch-size', '2', '--lr', '0.05',
        '--eval-interval', '8', '--workers', '0', '--device', 'cpu', '--threads', '1', '--no-progress',
        '--output-dir', str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = json.loads((out / 'args.json').read_text())
    assert (used['opt'], used['momentum'], used['weight_decay'], used['poly_power'], used['output_stride']) == (
        'momentum', 0.9, 5e-4, 0.9, 8)
    metrics = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    losses = [e['train_loss'] for e in metrics]
    print(f"CDGCNet tiny run: loss {losses[0]:.3f} -> {losses[-1]:.3f}, mIoU {metrics[-1]['val_mIoU']:.3f}")
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.5 * losses[0]
    # one class everywhere (the untrained model) scores about 0.22 here
    assert 0.3 < metrics[-1]['val_mIoU'] <= 1.0


def test_benchmark_script_peak_memory_below_the_dense_adjacency(capsys):
    """ `python -m dgmn_timm.benchmark cdgc` on a small map: the layer's peak stays far below the M x N x N
    adjacency the dense form would hold (N = 1,600: 41 MB for M = 4), and flat in M. """
    from utils import load_script
    script = load_script('benchmark')
    results = script.main(['cdgc', '--img-size', '40', '40', '--dim', '16', '--classes', '1', '4', '--device', 'cpu'])
    results = results['rows']
    assert [r['classes'] for r in results] == [1, 4]
    for r in results:
        assert 0 < r['peak_mb'] < r['dense_adjacency_mb'] / 2
    assert results[1]['dense_adjacency_mb'] == pytest.approx(4 * 1600 ** 2 * 4 / 2 ** 20)
    assert results[1]['peak_mb'] < 2 * results[0]['peak_mb']
    assert 'peak MB' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(['cdgc', '--img-size', '8', '8', '--dim', '8', '--classes', '2', '--limit-gb', '1e-9',
                     '--device', 'cpu'])


def test_readme_cdgcnet_snippet():
    """ The README's CDGCNet example runs (no download: pretrained=False; 64 px images instead of 256). """
    text = (REPO / 'README.md').read_text()
    start = text.index('### CDGCNet')
    code = text[text.index('```python\n', start) + len('```python\n'):]
    code = code[:code.index('```')]
    assert 'cdgcnet_resnet101(num_classes=19, pretrained=True)' in code and '# refined logits (2, 19, 256, 256)' in code
    code = code.replace('pretrained=True', 'pretrained=False').replace('256, 256', '64, 64')
    scope = {}
    exec(compile(code, 'README.md', 'exec'), scope)
    assert scope['logits'].shape == (2, 19, 64, 64)
    assert torch.isfinite(scope['loss']) and scope['refined'].shape == (1, 19, 33, 33)
