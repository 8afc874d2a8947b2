""" Semantic segmentation on timm backbones (DGMN2 by default).

- ``SemanticFPNHead``: the semantic branch of Panoptic FPN (Kirillov et al., 2019), the head of
  the DGMN2 paper's Cityscapes results: an FPN (256 channels) over the 4-level pyramid, then per
  level a stack of 3x3 conv-GroupNorm-ReLU + 2x bilinear upsampling (128 channels) down to
  stride 4, the stacks summed, a 1x1 classifier.
- ``FCNHead``: a simple single-level head (3x3 conv-norm-ReLU stack, 1x1 classifier), for
  dilated backbones (``output_stride=8``).
- ``SegmentationModel``: backbone + head, returning logits at the input resolution (any size).

    >>> import dgmn_timm
    >>> from dgmn_timm.segmentation import semantic_fpn_dgmn2, fcn_dgmn2
    >>> model = semantic_fpn_dgmn2('dgmn2_tiny', num_classes=19)   # Cityscapes classes
    >>> model = fcn_dgmn2('dgmn2_small', num_classes=19, pretrained=True)  # output stride 8

The models expect images normalised with the backbone's mean / std (``model.pretrained_cfg``).
Paper Cityscapes val mIoU, Semantic FPN 40k iterations: 78.09 / 80.65 / 80.60 / 81.75 (T/S/M/L).
"""
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

from .detection import FeatureBackbone, create_feature_backbone

__all__ = [
    'SemanticFPNHead', 'FCNHead', 'SegmentationModel', 'create_segmentation_model',
    'semantic_fpn_dgmn2', 'fcn_dgmn2', 'HEADS', 'HEAD_DEFAULTS',
]


def _conv_norm_act(in_chs: int, out_chs: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(num_groups, out_chs), out_chs),
        nn.ReLU(inplace=True),
    )


class SemanticFPNHead(nn.Module):
    """ Panoptic FPN semantic branch over a feature pyramid.

    Level i (stride s_i) gets ``max(1, log2(s_i / s_0))`` 3x3 conv-GN-ReLU blocks, each but a
    stride-s_0 level's followed by a 2x bilinear upsampling, so every level reaches the stride of
    the finest one; the maps are summed, passed through dropout and a 1x1 classifier. Odd sizes
    are handled by upsampling to the exact size of the next finer pyramid level.
    """

    def __init__(
            self,
            in_channels: Sequence[int],
            num_classes: int,
            in_strides: Optional[Sequence[int]] = None,
            fpn_channels: int = 256,
            channels: int = 128,
            num_groups: int = 32,
            dropout: float = 0.1,
    ):
        """
        Args:
            in_channels: channels of the input levels, finest first.
            num_classes: output classes.
            in_strides: strides of the input levels (default 4, 8, 16, ...). Equal strides
                (a dilated backbone) are allowed.
            fpn_channels: FPN width.
            channels: width of the upsampling stacks.
            num_groups: GroupNorm groups.
            dropout: dropout before the classifier.
        """
        super().__init__()
        in_channels = list(in_channels)
        if in_strides is None:
            in_strides = [4 * 2 ** i for i in range(len(in_channels))]
        in_strides = list(in_strides)
        if len(in_strides) != len(in_channels):
            raise ValueError(f'{len(in_channels)} input levels but {len(in_strides)} strides')
        self.in_strides = in_strides
        self.num_classes = num_classes
        self.fpn = FeaturePyramidNetwork(in_channels, fpn_channels)
        self.num_upsamples = []
        scale_heads = []
        for stride in in_strides:
            ratio = stride / in_strides[0]
            n_up = int(round(math.log2(ratio))) if ratio >= 1 else -1
            if n_up < 0 or 2 ** n_up != ratio:
                raise ValueError(f'strides {in_strides} must be the finest one times powers of two, finest first')
            self.num_upsamples.append(n_up)
            blocks = [_conv_norm_act(fpn_channels if k == 0 else channels, channels, num_groups)
                      for k in range(max(1, n_up))]
            scale_heads.append(nn.ModuleList(blocks))
        self.scale_heads = nn.ModuleList(scale_heads)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """ Logits at the resolution of ``features[0]``. """
        if len(features) != len(self.scale_heads):
            raise ValueError(f'expected {len(self.scale_heads)} feature levels, got {len(features)}')
        fpn = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        # exact target sizes: the size of the pyramid level at each intermediate stride
        size_at = {}
        for stride, f in zip(self.in_strides, fpn):
            size_at.setdefault(stride, f.shape[-2:])
        out = None
        for i, (x, blocks) in enumerate(zip(fpn, self.scale_heads)):
            stride = self.in_strides[i]
            n_up = self.num_upsamples[i]
            for k, block in enumerate(blocks):
                x = block(x)
                if k < n_up:
                    stride //= 2
                    size = fpn[0].shape[-2:] if k == n_up - 1 else size_at.get(
                        stride, (x.shape[-2] * 2, x.shape[-1] * 2))
                    x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
            if x.shape[-2:] != fpn[0].shape[-2:]:  # equal strides of different size (rounding)
                x = F.interpolate(x, size=fpn[0].shape[-2:], mode='bilinear', align_corners=False)
            out = x if out is None else out + x
        return self.classifier(self.dropout(out))


class FCNHead(nn.Module):
    """ Single-level head: ``num_convs`` 3x3 conv-GN-ReLU, dropout, 1x1 classifier.

    Uses the last feature level given (e.g. stride 8 of an ``output_stride=8`` backbone).
    """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            channels: int = 256,
            num_convs: int = 2,
            num_groups: int = 32,
            dropout: float = 0.1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.convs = nn.Sequential(*[
            _conv_norm_act(in_channels if k == 0 else channels, channels, num_groups) for k in range(num_convs)])
        out_chs = channels if num_convs > 0 else in_channels
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(out_chs, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(features[-1])))


class SegmentationModel(nn.Module):
    """ Backbone + segmentation head; ``forward`` returns logits (B, num_classes, H, W) at input size. """

    def __init__(self, backbone: FeatureBackbone, head: nn.Module, align_corners: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = head.num_classes
        self.align_corners = align_corners

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        return self.backbone.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=self.align_corners)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """ The training objective for images ``x`` and label maps ``target`` (B, H, W).

        Cross-entropy of the logits here; models with auxiliary or coarse branches override it
        (they may need ``target`` inside their forward). Training scripts call this, never the loss
        of a particular head.
        """
        return F.cross_entropy(self(x).float(), target, ignore_index=ignore_index)


def create_segmentation_model(
        backbone: str = 'dgmn2_tiny',
        num_classes: int = 19,
        head: str = 'fpn',
        output_stride: Optional[int] = None,
        out_indices: Optional[Sequence[int]] = None,
        pretrained: bool = False,
        pretrained_file: Optional[str] = None,
        backbone_checkpoint: Optional[str] = None,
        frozen_bn: bool = False,
        frozen_stages: int = -1,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **head_kwargs,
) -> SegmentationModel:
    """ A segmentation model on a timm backbone.

    Args:
        backbone: timm model name (tags / ``local-dir:`` allowed).
        num_classes: output classes (19 for Cityscapes).
        head: ``'fpn'`` (Semantic FPN over all levels) or ``'fcn'`` (single level).
        output_stride: backbone output stride; default 32 for ``'fpn'``, 8 for ``'fcn'``.
        out_indices: backbone levels; default all four for ``'fpn'``, the last for ``'fcn'``.
        pretrained, pretrained_file, backbone_checkpoint, frozen_bn, frozen_stages: see
            ``dgmn_timm.detection.create_feature_backbone``.
        backbone_kwargs: extra ``timm.create_model`` kwargs (e.g. ``drop_path_rate``).
        **head_kwargs: passed to the head (``channels``, ``dropout``, ...).
    """
    if head not in ('fpn', 'fcn'):
        if head in HEADS:
            return HEADS[head](backbone, num_classes=num_classes, output_stride=output_stride, out_indices=out_indices,
                               pretrained=pretrained, pretrained_file=pretrained_file,
                               backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn,
                               frozen_stages=frozen_stages, backbone_kwargs=backbone_kwargs, **head_kwargs)
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {head!r}")
    if output_stride is None:
        output_stride = 32 if head == 'fpn' else 8
    if out_indices is None:
        out_indices = (0, 1, 2, 3) if head == 'fpn' else (3,)
    kwargs = dict(backbone_kwargs or {})
    if output_stride != 32:
        kwargs['output_stride'] = output_stride
    body = create_feature_backbone(
        backbone, out_indices=out_indices, pretrained=pretrained, pretrained_file=pretrained_file,
        backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn, frozen_stages=frozen_stages, **kwargs)
    if head == 'fpn':
        seg_head = SemanticFPNHead(body.channels, num_classes, in_strides=body.reductions, **head_kwargs)
    else:
        seg_head = FCNHead(body.channels[-1], num_classes, **head_kwargs)
    return SegmentationModel(body, seg_head)


def semantic_fpn_dgmn2(backbone: str = 'dgmn2_tiny', num_classes: int = 19, **kwargs) -> SegmentationModel:
    """ Semantic FPN on a DGMN2 backbone (the paper's Cityscapes model). See ``create_segmentation_model``. """
    return create_segmentation_model(backbone, num_classes=num_classes, head='fpn', **kwargs)


def fcn_dgmn2(backbone: str = 'dgmn2_tiny', num_classes: int = 19, **kwargs) -> SegmentationModel:
    """ FCN head on a dilated (output stride 8) DGMN2 backbone. See ``create_segmentation_model``. """
    kwargs.setdefault('output_stride', 8)
    return create_segmentation_model(backbone, num_classes=num_classes, head='fcn', **kwargs)


# head name -> builder(backbone, num_classes=..., **create_segmentation_model kwargs) -> model with
# forward(x) -> logits at input size and training_loss(x, target, ignore_index) -> scalar
HEADS: Dict[str, Any] = {'fpn': semantic_fpn_dgmn2, 'fcn': fcn_dgmn2}
# head name -> training-recipe defaults that scripts/train_segmentation.py applies unless set on its command line
HEAD_DEFAULTS: Dict[str, Dict[str, Any]] = {'fpn': {}, 'fcn': {}}
