""" Semantic segmentation on timm backbones (DGMN2 by default).

- ``SemanticFPNHead``: the semantic branch of Panoptic FPN (Kirillov et al., 2019), the head of
  the DGMN2 paper's Cityscapes results: an FPN (256 channels) over the 4-level pyramid, then per
  level a stack of 3x3 conv-GroupNorm-ReLU + 2x bilinear upsampling (128 channels) down to
  stride 4, the stacks summed, a 1x1 classifier.
- ``FCNHead``: a simple single-level head (3x3 conv-norm-ReLU stack, 1x1 classifier), for
  dilated backbones (``output_stride=8``).
- ``SegmentationModel``: backbone + head, returning logits at the input resolution (any size).
- ``CDGCNet`` (Hu et al., ECCV 2020): ASPP, coarse logits, the class-wise dynamic graph
  convolution ``dgmn_timm.layers.CDGC`` and refined logits, an auxiliary FCN head; trained with
  ``CDGCLoss`` through ``training_loss`` (``cdgcnet``, ``cdgcnet_resnet101``; ``HEADS['cdgc']``).

    >>> import dgmn_timm
    >>> from dgmn_timm.tasks.segmentation import semantic_fpn_dgmn2, fcn_dgmn2
    >>> model = semantic_fpn_dgmn2('dgmn2_tiny', num_classes=19)   # Cityscapes classes
    >>> model = fcn_dgmn2('dgmn2_small', num_classes=19, pretrained=True)  # output stride 8

The models expect images normalised with the backbone's mean / std (``model.pretrained_cfg``).
Paper Cityscapes val mIoU, Semantic FPN 40k iterations: 78.09 / 80.65 / 80.60 / 81.75 (T/S/M/L).
"""
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.ops import FeaturePyramidNetwork

from .detection import FeatureBackbone, create_feature_backbone
from ..layers.cdgc import CDGC
from ..layers.repgraph import RepGraph

__all__ = [
    'SemanticFPNHead', 'FCNHead', 'SegmentationModel', 'create_segmentation_model',
    'semantic_fpn_dgmn2', 'fcn_dgmn2', 'HEADS', 'HEAD_DEFAULTS',
    'CDGCHead', 'CDGCLoss', 'CDGCNet', 'ohem_cross_entropy', 'cdgcnet', 'cdgcnet_resnet101',
    'RGNetHead', 'RGNet', 'rgnet', 'AuxHeadSegmentationModel',
]


def _conv_norm_act(in_chs: int, out_chs: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
        nn.GroupNorm(math.gcd(num_groups, out_chs), out_chs),
        nn.ReLU(inplace=True),
    )


def _conv_bn_relu(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
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


class AuxHeadSegmentationModel(SegmentationModel):
    """ Backbone with two levels (auxiliary, main), a head on the main level, ``aux_head`` on the auxiliary one.

    The auxiliary head is used by ``training_loss`` only; ``forward`` is the main head's logits.
    """

    def __init__(self, backbone: FeatureBackbone, head: nn.Module, aux_head: nn.Module, align_corners: bool = False):
        super().__init__(backbone, head, align_corners=align_corners)
        if len(backbone.channels) != 2:
            raise ValueError(
                f'{type(self).__name__} takes two backbone levels (auxiliary, main), got {len(backbone.channels)}')
        self.aux_head = aux_head


def _two_level_backbone(
        model_name: str,
        backbone: str,
        output_stride: Optional[int],
        out_indices: Optional[Sequence[int]],
        backbone_kwargs: Optional[Dict[str, Any]],
        **create_kwargs,
) -> FeatureBackbone:
    """ The backbone of an ``AuxHeadSegmentationModel``: output stride 8 unless given, the levels
    ``out_indices`` (two: auxiliary, main; default the last two). ``create_kwargs`` go to
    ``create_feature_backbone`` (pretrained, frozen_bn, ...), ``backbone_kwargs`` to ``timm.create_model``.
    """
    if output_stride is None:
        output_stride = 8
    out_indices = tuple(out_indices) if out_indices is not None else (-2, -1)
    if len(out_indices) != 2:
        raise ValueError(f'{model_name} takes two backbone levels (auxiliary, main), got out_indices={out_indices}')
    kwargs = dict(backbone_kwargs or {})
    if output_stride != 32:
        kwargs['output_stride'] = output_stride
    return create_feature_backbone(backbone, out_indices=out_indices, **create_kwargs, **kwargs)


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
        out_indices: backbone levels; default for ``'fpn'`` the levels of strides 4-32, for ``'fcn'``
            the deepest level (by stride in the backbone's ``feature_info``, the deepest where levels
            share a stride; see ``dgmn_timm.tasks.detection.feature_levels``).
        pretrained, pretrained_file, backbone_checkpoint, frozen_bn, frozen_stages: see
            ``dgmn_timm.tasks.detection.create_feature_backbone``.
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
    strides = (4, 8, 16, 32) if head == 'fpn' else (output_stride,)
    kwargs = dict(backbone_kwargs or {})
    if output_stride != 32:
        kwargs['output_stride'] = output_stride
    body = create_feature_backbone(
        backbone, out_indices=out_indices, strides=strides, pretrained=pretrained, pretrained_file=pretrained_file,
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


# --------------------------------------------------------------------------------------------
# CDGCNet (Hu et al., ECCV 2020): class-wise dynamic graph convolution
# --------------------------------------------------------------------------------------------

def ohem_cross_entropy(
        logits: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int = 255,
        thresh: float = 0.7,
        min_kept: int = 100000,
) -> torch.Tensor:
    """ Cross-entropy over the hard pixels: those whose probability of the true class is below
    ``thresh``, or the ``min_kept`` pixels of highest loss if fewer are (all labelled pixels if
    there are fewer than ``min_kept``). Zero (with a gradient) if no pixel is labelled.
    """
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction='none')
    losses = losses[target != ignore_index]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    hard = losses[losses > -math.log(thresh)]
    keep = min(min_kept, losses.numel())
    if hard.numel() < keep:
        hard = losses.topk(keep).values
    return hard.mean()


class CDGCLoss(nn.Module):
    """ CDGCNet's objective: ``0.6 CE(coarse) + 0.7 OHEM-CE(refined) + 0.4 CE(aux)``.

    Logits of any resolution are upsampled (bilinear) to the target's size first.
    """

    def __init__(
            self,
            coarse_weight: float = 0.6,
            refined_weight: float = 0.7,
            aux_weight: float = 0.4,
            ohem_thresh: float = 0.7,
            ohem_min_kept: int = 100000,
            align_corners: bool = False,
    ):
        super().__init__()
        if not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f'ohem_thresh must be in (0, 1], got {ohem_thresh}')
        self.coarse_weight = coarse_weight
        self.refined_weight = refined_weight
        self.aux_weight = aux_weight
        self.ohem_thresh = ohem_thresh
        self.ohem_min_kept = ohem_min_kept
        self.align_corners = align_corners

    def _up(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[-2:] != target.shape[-2:]:
            logits = F.interpolate(logits, size=target.shape[-2:], mode='bilinear', align_corners=self.align_corners)
        return logits.float()

    def forward(
            self,
            coarse: torch.Tensor,
            refined: torch.Tensor,
            aux: torch.Tensor,
            target: torch.Tensor,
            ignore_index: int = 255,
    ) -> torch.Tensor:
        """ The weighted sum for logits (B, M, h, w) and labels ``target`` (B, H, W). """
        def ce(logits: torch.Tensor) -> torch.Tensor:
            valid = target != ignore_index
            if not bool(valid.any()):
                return logits.sum() * 0.0
            return F.cross_entropy(self._up(logits, target), target, ignore_index=ignore_index)

        refined_loss = ohem_cross_entropy(
            self._up(refined, target), target, ignore_index, self.ohem_thresh, self.ohem_min_kept)
        return self.coarse_weight * ce(coarse) + self.refined_weight * refined_loss + self.aux_weight * ce(aux)


class CDGCHead(nn.Module):
    """ ASPP, a 3x3 reduce conv, a coarse classifier and a CDGC layer giving the refined logits. """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            channels: int = 512,
            aspp_channels: int = 256,
            atrous_rates: Sequence[int] = (12, 24, 36),
            fusion: str = 'concat',
            ratio: float = 1.0,
            dropout: float = 0.1,
    ):
        """
        Args:
            in_channels: channels of the backbone's last level.
            num_classes: output classes.
            channels: width C of the reduced features the graph runs on.
            aspp_channels: width of torchvision's ASPP.
            atrous_rates: ASPP rates (DeepLab's 12, 24, 36 at output stride 8).
            fusion, ratio: see ``dgmn_timm.layers.CDGC``.
            dropout: dropout before the coarse classifier.
        """
        super().__init__()
        self.num_classes = num_classes
        self.aspp = ASPP(in_channels, list(atrous_rates), aspp_channels)
        self.reduce = _conv_bn_relu(aspp_channels, channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.coarse = nn.Conv2d(channels, num_classes, 1)
        self.cdgc = CDGC(channels, num_classes, fusion=fusion, ratio=ratio)

    def forward(
            self,
            x: torch.Tensor,
            target: Optional[torch.Tensor] = None,
            ignore_index: int = 255,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """ (coarse, refined) logits at the resolution of ``x``; ``target`` switches on the dynamic sampling. """
        features = self.reduce(self.aspp(x))
        coarse = self.coarse(self.dropout(features))
        return coarse, self.cdgc(features, coarse, target, ignore_index)


class CDGCNet(AuxHeadSegmentationModel):
    """ CDGCNet: a dilated backbone, ``CDGCHead`` on its last level, an auxiliary FCN head on the level before.

    ``forward`` returns the refined logits at input size; ``training_loss`` runs the head with
    the ground truth (dynamic sampling) and returns ``CDGCLoss`` of the coarse, refined and
    auxiliary logits.
    """

    def __init__(
            self,
            backbone: FeatureBackbone,
            head: CDGCHead,
            aux_head: nn.Module,
            criterion: Optional[CDGCLoss] = None,
            align_corners: bool = False,
    ):
        super().__init__(backbone, head, aux_head, align_corners=align_corners)
        self.criterion = criterion if criterion is not None else CDGCLoss(align_corners=align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, refined = self.head(self.backbone(x)[-1])
        return F.interpolate(refined, size=x.shape[-2:], mode='bilinear', align_corners=self.align_corners)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """ ``CDGCLoss`` for images ``x`` and label maps ``target`` (B, H, W) of the same size. """
        if target.shape != (x.shape[0],) + tuple(x.shape[-2:]):
            raise ValueError(f'target must be {(x.shape[0],) + tuple(x.shape[-2:])}, got {tuple(target.shape)}')
        if self.training and x.shape[0] < 2:
            raise ValueError('CDGCNet trains on batches of 2 or more: the image-pooling branch of the ASPP '
                             'normalises 1x1 maps with BatchNorm')
        aux_features, features = self.backbone(x)
        coarse, refined = self.head(features, target, ignore_index)
        aux = self.aux_head([aux_features])
        return self.criterion(coarse, refined, aux, target, ignore_index)


def cdgcnet(
        backbone: str = 'resnet101',
        num_classes: int = 19,
        output_stride: Optional[int] = None,
        out_indices: Optional[Sequence[int]] = None,
        pretrained: bool = False,
        pretrained_file: Optional[str] = None,
        backbone_checkpoint: Optional[str] = None,
        frozen_bn: bool = False,
        frozen_stages: int = -1,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        aux_channels: int = 256,
        **head_kwargs,
) -> CDGCNet:
    """ CDGCNet on any timm backbone with ``features_only`` (DGMN2 included).

    Args:
        backbone: timm model name (tags / ``local-dir:`` allowed).
        num_classes: output classes (19 for Cityscapes).
        output_stride: backbone output stride (default 8, the paper's).
        out_indices: the two levels (auxiliary, main); default the last two (stage 3 and 4).
        pretrained, pretrained_file, backbone_checkpoint, frozen_bn, frozen_stages: see
            ``dgmn_timm.tasks.detection.create_feature_backbone``.
        backbone_kwargs: extra ``timm.create_model`` kwargs.
        aux_channels: width of the auxiliary FCN head (one 3x3 conv).
        **head_kwargs: ``CDGCHead`` options (``channels``, ``fusion``, ``ratio``, ``atrous_rates``, ...).
    """
    body = _two_level_backbone(
        'CDGCNet', backbone, output_stride, out_indices, backbone_kwargs, pretrained=pretrained,
        pretrained_file=pretrained_file, backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn,
        frozen_stages=frozen_stages)
    head = CDGCHead(body.channels[1], num_classes, **head_kwargs)
    aux_head = FCNHead(body.channels[0], num_classes, channels=aux_channels, num_convs=1)
    return CDGCNet(body, head, aux_head)


def cdgcnet_resnet101(num_classes: int = 19, **kwargs) -> CDGCNet:
    """ The paper's CDGCNet: ResNet-101 at output stride 8. See ``cdgcnet``. """
    return cdgcnet('resnet101', num_classes=num_classes, **kwargs)


HEADS['cdgc'] = cdgcnet
# the paper's recipe: SGD with plain momentum (timm's 'momentum'; its 'sgd' is Nesterov), no stochastic depth
HEAD_DEFAULTS['cdgc'] = {
    'opt': 'momentum', 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 5e-4, 'poly_power': 0.9, 'output_stride': 8,
    'drop_path': 0.0}


# --------------------------------------------------------------------------------------------
# RGNet (Yu et al., ECCV 2020): a RepGraph context head
# --------------------------------------------------------------------------------------------

class RGNetHead(nn.Module):
    """ 3x3 conv -> ``channels`` + BN + ReLU, a RepGraph layer (bottleneck, 'concat'), dropout, 1x1 classifier. """

    def __init__(
            self,
            in_channels: int,
            num_classes: int,
            channels: int = 512,
            inner_dim: int = 256,
            num_nodes: int = 9,
            structure: str = 'bottleneck',
            fusion: str = 'concat',
            grid: int = 1,
            groups: int = 1,
            dropout: float = 0.1,
    ):
        """
        Args:
            in_channels: channels of the backbone's last level.
            num_classes: output classes.
            channels: width C of the features the graph runs on (512 in the paper).
            inner_dim, num_nodes, structure, fusion, grid, groups: see ``dgmn_timm.layers.RepGraph``.
            dropout: dropout before the classifier.
        """
        super().__init__()
        self.num_classes = num_classes
        self.conv = _conv_bn_relu(in_channels, channels)
        self.repgraph = RepGraph(channels, inner_dim, num_nodes=num_nodes, structure=structure, fusion=fusion,
                                 grid=grid, groups=groups)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """ Logits at the resolution of the last level of ``features``. """
        return self.classifier(self.dropout(self.repgraph(self.conv(features[-1]))))


class RGNet(AuxHeadSegmentationModel):
    """ RGNet: a dilated backbone, ``RGNetHead`` on its last level, an auxiliary FCN head on the level before.

    ``forward`` returns the main logits at input size; ``training_loss`` is
    ``CE(main) + aux_weight * CE(aux)`` (both upsampled to the labels' size).
    """

    def __init__(
            self,
            backbone: FeatureBackbone,
            head: RGNetHead,
            aux_head: nn.Module,
            aux_weight: float = 0.4,
            align_corners: bool = False,
    ):
        super().__init__(backbone, head, aux_head, align_corners=align_corners)
        self.aux_weight = aux_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x)[-1:])
        return F.interpolate(logits, size=x.shape[-2:], mode='bilinear', align_corners=self.align_corners)

    def training_loss(self, x: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """ ``CE(main) + aux_weight * CE(aux)`` for images ``x`` and label maps ``target`` (B, H, W). """
        aux_features, features = self.backbone(x)
        size = target.shape[-2:]
        main = F.interpolate(self.head([features]), size=size, mode='bilinear', align_corners=self.align_corners)
        aux = F.interpolate(self.aux_head([aux_features]), size=size, mode='bilinear',
                            align_corners=self.align_corners)
        return (F.cross_entropy(main.float(), target, ignore_index=ignore_index)
                + self.aux_weight * F.cross_entropy(aux.float(), target, ignore_index=ignore_index))


def rgnet(
        backbone: str = 'resnet101',
        num_classes: int = 19,
        output_stride: Optional[int] = None,
        out_indices: Optional[Sequence[int]] = None,
        pretrained: bool = False,
        pretrained_file: Optional[str] = None,
        backbone_checkpoint: Optional[str] = None,
        frozen_bn: bool = False,
        frozen_stages: int = -1,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        **head_kwargs,
) -> RGNet:
    """ RGNet on any timm backbone with ``features_only`` (ResNet-50/101, DGMN2, ...).

    Args:
        backbone: timm model name (tags / ``local-dir:`` allowed).
        num_classes: output classes.
        output_stride: backbone output stride (default 8, the paper's dilated setting).
        out_indices: the two levels (auxiliary, main); default the last two (ResNet: res4, res5).
        pretrained, pretrained_file, backbone_checkpoint, frozen_bn, frozen_stages: see
            ``dgmn_timm.tasks.detection.create_feature_backbone``.
        backbone_kwargs: extra ``timm.create_model`` kwargs.
        aux_channels: width of the auxiliary FCN head (one 3x3 conv).
        aux_weight: weight of the auxiliary loss (0.4).
        **head_kwargs: ``RGNetHead`` options (``channels``, ``inner_dim``, ``num_nodes``, ``grid``, ...).
    """
    body = _two_level_backbone(
        'RGNet', backbone, output_stride, out_indices, backbone_kwargs, pretrained=pretrained,
        pretrained_file=pretrained_file, backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn,
        frozen_stages=frozen_stages)
    head = RGNetHead(body.channels[1], num_classes, **head_kwargs)
    aux_head = FCNHead(body.channels[0], num_classes, channels=aux_channels, num_convs=1)
    return RGNet(body, head, aux_head, aux_weight=aux_weight)


HEADS['repgraph'] = rgnet
# the usual dilated-FCN recipe (SGD, poly decay, output stride 8); ResNets have no stochastic depth
HEAD_DEFAULTS['repgraph'] = {
    'opt': 'momentum', 'lr': 0.01, 'momentum': 0.9, 'weight_decay': 1e-4, 'poly_power': 0.9, 'output_stride': 8,
    'drop_path': 0.0}
