""" CDGC: class-wise dynamic graph convolution, the refining layer of CDGCNet

Paper: `Class-wise Dynamic Graph Convolution for Semantic Segmentation` - Hanzhe Hu, Deyi Ji,
    Weihao Gan, Shuai Bai, Wei Wu, Junjie Yan (ECCV 2020), arXiv:2007.09690

From features X (B, C, H, W) and coarse class logits P (B, M, H, W), the pixels are split by
class: class m holds the pixels whose argmax of P is m (in training, with the ground truth G
given: the dynamic sampling C u G minus a random (1 - ratio) of C n G, see
``cdgc_class_masks``). Each class gets a graph over its own pixels only,

    A_ij = softmax_j((W x_i)^T (W' x_j))    i, j in class m,
    Z_m  = ReLU(A X W_m)                    W_m: the class's C x C weight,

pixels outside the class contribute nothing, the classes are merged by a 1x1 conv
M * C -> C, fused with X (concat or sum), and a 1x1 conv gives the refined logits.

The dense form (an N x N adjacency per class, an (M * C, H, W) class map) would take M * N^2
floats; here each class's pixels are gathered and attend among themselves through
``scaled_dot_product_attention``, and the class map is never formed: the per-class weight
and the merging conv are applied to the gathered pixels and the results are added back at
their positions. Memory is O(C * sum_m n_m) plus what the attention kernel keeps (on CPU a
flash kernel: O(n_m * C) per class).

@inproceedings{hu2020cdgc,
  title={Class-wise Dynamic Graph Convolution for Semantic Segmentation},
  author={Hu, Hanzhe and Ji, Deyi and Gan, Weihao and Bai, Shuai and Wu, Wei and Yan, Junjie},
  booktitle={ECCV},
  year={2020}
}
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CDGC', 'cdgc_class_masks']


def cdgc_class_masks(
        coarse: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        ratio: float = 1.0,
        ignore_index: int = 255,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """ Boolean class masks (B, M, H, W) of the pixels each class's graph is built on.

    Args:
        coarse: coarse logits (B, M, H, W); class m's coarse set C_m = {argmax P == m}.
        target: ground-truth labels (B, H', W') or None. Resized to (H, W) by nearest
            neighbour if its size differs. Pixels equal to ``ignore_index`` belong to no
            ground-truth class.
        ratio: with a target, class m's set is C_m u G_m minus round((1 - ratio) * |C_m n G_m|)
            pixels of the intersection chosen at random (ratio 1: the union; ratio 0: the
            symmetric difference).
        ignore_index: the unlabelled value of ``target``.
        generator: random generator for the dropped intersection pixels.

    Without a target the masks partition the pixels; with one a pixel may be in two classes
    (its coarse class and its true class).
    """
    if coarse.ndim != 4:
        raise ValueError(f'coarse logits must be (B, M, H, W), got shape {tuple(coarse.shape)}')
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f'ratio must be in [0, 1], got {ratio}')
    batch, num_classes, height, width = coarse.shape
    masks = F.one_hot(coarse.argmax(1), num_classes).permute(0, 3, 1, 2).bool()
    if target is None:
        return masks
    if target.ndim != 3 or target.shape[0] != batch:
        raise ValueError(f'target must be (B, H, W) with B = {batch}, got shape {tuple(target.shape)}')
    if target.shape[-2:] != (height, width):
        target = F.interpolate(target[:, None].float(), size=(height, width), mode='nearest')[:, 0]
    target = target.long()
    valid = target != ignore_index
    labels = target[valid]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'target has labels outside 0..{num_classes - 1} and the ignore index {ignore_index}')
    truth = F.one_hot(torch.where(valid, target, 0), num_classes).permute(0, 3, 1, 2).bool() & valid[:, None]
    union = masks | truth
    if ratio == 1.0:
        return union
    both = (masks & truth).flatten(2)
    # rank the intersection pixels of each class in a random order, drop the first n_drop
    scores = torch.rand(both.shape, generator=generator, device=both.device if generator is None else generator.device)
    scores = scores.to(both.device).masked_fill(~both, 2.0)
    rank = scores.argsort(-1).argsort(-1)
    n_drop = torch.round((1.0 - ratio) * both.sum(-1, keepdim=True, dtype=torch.float64))
    drop = both & (rank < n_drop)
    return union & ~drop.view_as(union)


class CDGC(nn.Module):
    """ Class-wise dynamic graph convolution: features + coarse logits -> refined logits. """

    def __init__(self, dim: int, num_classes: int, fusion: str = 'concat', ratio: float = 1.0):
        """
        Args:
            dim: feature channels C.
            num_classes: classes M (of the coarse and refined logits).
            fusion: ``'concat'`` (classifier over [X, merged]) or ``'sum'`` (over X + merged).
            ratio: dynamic sampling ratio, used when a target is given (see ``cdgc_class_masks``).
        """
        super().__init__()
        if fusion not in ('concat', 'sum'):
            raise ValueError(f"fusion must be 'concat' or 'sum', got {fusion!r}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f'ratio must be in [0, 1], got {ratio}')
        self.dim = dim
        self.num_classes = num_classes
        self.fusion = fusion
        self.ratio = ratio
        self.query = nn.Conv2d(dim, dim, 1, bias=False)  # W
        self.key = nn.Conv2d(dim, dim, 1, bias=False)  # W'
        # W_m for every class: a grouped 1x1 conv over the (M * C) class map
        self.class_conv = nn.Conv2d(num_classes * dim, num_classes * dim, 1, groups=num_classes, bias=False)
        self.merge = nn.Conv2d(num_classes * dim, dim, 1)
        self.classifier = nn.Conv2d(2 * dim if fusion == 'concat' else dim, num_classes, 1)

    def class_graph(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """ The merged class-wise graph convolution (B, C, H, W) of ``x`` over boolean ``masks`` (B, M, H, W). """
        batch, dim, height, width = x.shape
        if masks.shape != (batch, self.num_classes, height, width) or masks.dtype != torch.bool:
            raise ValueError(f'masks must be bool {(batch, self.num_classes, height, width)}, '
                             f'got {masks.dtype} {tuple(masks.shape)}')
        n = height * width
        # pixel-major (B * N, C) rows, so that a class's pixels are one gather
        q = self.query(x).flatten(2).transpose(1, 2).reshape(batch * n, dim)
        k = self.key(x).flatten(2).transpose(1, 2).reshape(batch * n, dim)
        v = x.flatten(2).transpose(1, 2).reshape(batch * n, dim)
        w_class = self.class_conv.weight.view(self.num_classes, dim, dim)  # (M, C_out, C_in)
        w_merge = self.merge.weight.view(dim, self.num_classes, dim)  # (C_out, M, C_in)

        flat = masks.flatten(2)
        where = flat.nonzero()  # (K, 3): batch, class, pixel; grouped by (batch, class)
        rows = where[:, 0] * n + where[:, 2]
        counts = flat.sum(-1).flatten().tolist()
        parts, part_rows = [], []
        for group, idx in enumerate(rows.split(counts)):
            if idx.numel() == 0:
                continue  # an empty class contributes nothing
            m = group % self.num_classes
            y = F.scaled_dot_product_attention(q[idx][None, None], k[idx][None, None], v[idx][None, None], scale=1.0)
            z = F.relu(y[0, 0] @ w_class[m].t())
            parts.append(z @ w_merge[:, m].t())
            part_rows.append(idx)
        if parts:
            source = torch.cat(parts)  # in the matmul's dtype (autocast may lower it)
            merged = source.new_zeros(batch * n, dim).index_add(0, torch.cat(part_rows), source)
        else:
            merged = x.new_zeros(batch * n, dim)
        merged = merged.view(batch, height, width, dim).permute(0, 3, 1, 2)
        return merged + self.merge.bias.view(1, dim, 1, 1)

    def forward(
            self,
            x: torch.Tensor,
            coarse: torch.Tensor,
            target: Optional[torch.Tensor] = None,
            ignore_index: int = 255,
    ) -> torch.Tensor:
        """ Refined logits (B, M, H, W).

        Args:
            x: features (B, C, H, W).
            coarse: coarse logits (B, M, H, W).
            target: ground truth (B, H', W') for the dynamic sampling (training), or None to
                take the classes from argmax(coarse) alone.
            ignore_index: the unlabelled value of ``target``.
        """
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f'x must be (B, {self.dim}, H, W), got shape {tuple(x.shape)}')
        if coarse.shape != (x.shape[0], self.num_classes) + tuple(x.shape[-2:]):
            raise ValueError(f'coarse logits must be {(x.shape[0], self.num_classes) + tuple(x.shape[-2:])}, '
                             f'got {tuple(coarse.shape)}')
        masks = cdgc_class_masks(coarse.detach(), target, self.ratio, ignore_index)
        merged = self.class_graph(x, masks)
        fused = torch.cat([x, merged], dim=1) if self.fusion == 'concat' else x + merged
        return self.classifier(fused)
