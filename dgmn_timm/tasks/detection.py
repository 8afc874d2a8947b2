""" Object detection on timm backbones (DGMN2 by default) with torchvision's detection stack.

Any registered timm model that supports ``features_only`` becomes a torchvision-compatible
backbone with an FPN (an ``out_channels`` attribute and an ordered dict of levels), and three
builders give the detectors of the DGMN2 paper's COCO experiments on torchvision heads:

    >>> import dgmn_timm
    >>> from dgmn_timm.tasks.detection import retinanet_dgmn2, maskrcnn_dgmn2
    >>> model = retinanet_dgmn2('dgmn2_tiny', num_classes=91)           # random init
    >>> model = maskrcnn_dgmn2('dgmn2_small', pretrained=True)           # ImageNet backbone
    >>> model = retinanet_dgmn2(backbone_checkpoint='retinanet_dgmn2_tiny.pth')  # released backbone

The recipe defaults follow the paper's 1x schedule models (mmdetection style):

- RetinaNet: FPN over C3-C5 (strides 8, 16, 32), P6/P7 from C5 ("on input"), anchors of
  octave base scale 4 with 3 scales per octave and ratios 0.5, 1, 2.
- Faster / Mask R-CNN: FPN over C2-C5 (strides 4-32) plus a max-pooled P6 for the RPN,
  one anchor size of 8 x stride per level, ratios 0.5, 1, 2.
- The levels are found by stride in the backbone's ``feature_info`` (for a ResNet C2-C5 are
  ``layer1``-``layer4``, for DGMN2 its four stages); where levels share a stride (a dilated
  backbone) the deepest is taken. A backbone with graph modules (DGMN, DGMN2 attention,
  RepGraph, non-local) is refused if the levels would leave all of them out.
- Images resized to a shorter side of 800 and a longer side of at most 1333.
- BatchNorm layers of the backbone (the DGMN2 stem and patch embeddings) frozen
  (``FrozenBatchNorm2d`` with the running statistics copied), all stages trained.

Only the backbone of the authors' mmdetection checkpoints can be loaded (their necks and heads
use mmdetection's layout, not torchvision's): ``backbone_checkpoint=PATH`` reads the
``'backbone.'`` entries of such a file with ``dgmn_timm.weights.checkpoints`` (``torch.load(weights_only=True)``)
and loads them into the model before timm wraps it as a feature pyramid.
"""
import logging
import os
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from ..layers import DGMN, NonLocal2d, RepGraph
from ..models.dgmn2 import DynamicGraphAttention
from ..weights.checkpoints import create_with_weights

__all__ = [
    'FeatureBackbone', 'TimmBackboneWithFPN', 'create_feature_backbone', 'feature_levels', 'timm_fpn_backbone',
    'freeze_batch_norm',
    'retinanet_dgmn2', 'fasterrcnn_dgmn2', 'maskrcnn_dgmn2',
]

_logger = logging.getLogger(__name__)

# The paper's 1x-schedule image size (mmdetection's (1333, 800)).
DEFAULT_MIN_SIZE = 800
DEFAULT_MAX_SIZE = 1333

# the modules a backbone is chosen for: a feature selection must keep at least one of them
GRAPH_MODULES = (DGMN, DynamicGraphAttention, RepGraph, NonLocal2d)


# --------------------------------------------------------------------------------------------
# Batch norm freezing
# --------------------------------------------------------------------------------------------

def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """ Replace every ``BatchNorm2d`` / ``SyncBatchNorm`` in ``module`` by ``FrozenBatchNorm2d``.

    The affine parameters, running statistics and eps are copied, so the frozen layer computes
    what the original one computed in eval mode. timm's ``BatchNormAct2d`` family (a norm with a
    fused activation) is converted by timm's own ``freeze_batch_norm_2d`` so that the activation
    is kept. Returns the converted module (a new object if ``module`` itself is a BatchNorm).
    """
    from timm.layers import BatchNormAct2d, SyncBatchNormAct, freeze_batch_norm_2d

    if isinstance(module, (BatchNormAct2d, SyncBatchNormAct)):
        return freeze_batch_norm_2d(module)
    if isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if module.running_mean is None:
            raise ValueError('Cannot freeze a BatchNorm layer that tracks no running statistics.')
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps).to(module.running_mean.device)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        new_child = freeze_batch_norm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


# --------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------

class FeatureBackbone(nn.Module):
    """ A timm ``features_only`` model with frozen-stage handling.

    ``forward`` returns the list of feature maps of ``out_indices`` (finest first). Modules of
    frozen stages have ``requires_grad=False`` and stay in eval mode (no dropout / drop-path, no
    BatchNorm statistic updates) when the model is put in train mode.
    """

    def __init__(self, body: nn.Module, frozen_stages: int = -1):
        """
        Args:
            body: a timm features model (``timm.create_model(..., features_only=True)``).
            frozen_stages: -1 trains everything; 0 freezes the stem; n > 0 freezes the stem
                and the first n stages. Stages are the model's feature levels of stride 4 and
                more, counted over all its levels (not only ``out_indices``); the stem is
                everything before the first of them (for DGMN2 the three-conv stem, for a
                ResNet conv1 / bn1, with stage 1 = layer1, as in mmdetection).
        """
        super().__init__()
        self.body = body
        info = body.feature_info
        self.channels: List[int] = list(info.channels())
        self.reductions: List[int] = list(info.reduction())
        self.pretrained_cfg: Dict[str, Any] = dict(getattr(body, 'pretrained_cfg', None) or {})
        self.frozen_stages = -1
        self._frozen: List[str] = []
        self.freeze_stages(frozen_stages)

    def _stage_children(self) -> List[str]:
        return [name for name, _ in self.body.named_children()]

    def freeze_stages(self, frozen_stages: int):
        """ Freeze the stem and the first ``frozen_stages`` stages (see ``__init__``). """
        all_levels = [info for info in self.body.feature_info.info if info['reduction'] >= 4]
        if not all_levels:
            raise ValueError('The backbone has no feature level of stride 4 or more.')
        if frozen_stages < -1 or frozen_stages > len(all_levels):
            raise ValueError(f'frozen_stages must be between -1 and {len(all_levels)}, got {frozen_stages}')
        for name in self._frozen:  # undo a previous freeze
            for p in getattr(self.body, name).parameters():
                p.requires_grad_(True)
        self._frozen = []
        self.frozen_stages = frozen_stages
        if frozen_stages < 0:
            return
        children = self._stage_children()
        if frozen_stages == 0:
            first = all_levels[0]['module'].replace('.', '_')
            if first not in children:
                raise ValueError(f'Cannot locate the first stage ({first}) in {children}')
            end = children.index(first)  # exclusive: the stem only
        else:
            last = all_levels[frozen_stages - 1]['module'].replace('.', '_')
            if last not in children:
                raise ValueError(
                    f'Stage {frozen_stages} ({last}) is not computed by this feature model; '
                    f'raise out_indices or lower frozen_stages.')
            end = children.index(last) + 1
        self._frozen = children[:end]
        for name in self._frozen:
            for p in getattr(self.body, name).parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for name in self._frozen:
                getattr(self.body, name).eval()
        return self

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.body(x))


def feature_levels(
        model_name: str,
        out_indices: Optional[Sequence[int]] = None,
        strides: Sequence[int] = (4, 8, 16, 32),
        **kwargs,
) -> Tuple[int, ...]:
    """ The feature levels (``out_indices``) of a timm model, read from its ``feature_info``.

    The model is built on the meta device (no memory, no weights) with ``kwargs`` (``output_stride``
    changes the strides). Without ``out_indices``, each of ``strides`` gives the deepest level of that
    stride; a stride above the model's largest (a dilated backbone) is its largest.

    Raises:
        ValueError: a stride the model has no level of, or levels that leave out every graph module
            (``GRAPH_MODULES``) of a model that has some.
    """
    kwargs = {k: v for k, v in kwargs.items() if k != 'pretrained_cfg_overlay'}
    with torch.device('meta'):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    info = list(model.feature_info)
    have = [f['reduction'] for f in info]
    if out_indices is None:
        picked = []
        for stride in strides:
            stride = min(stride, max(have))
            if stride not in have:
                raise ValueError(f'{model_name} has no feature level of stride {stride} (its strides: '
                                 f'{", ".join(map(str, sorted(set(have))))}); give out_indices')
            level = max(i for i, r in enumerate(have) if r == stride)
            if level not in picked:
                picked.append(level)
        out_indices = picked
    out_indices = tuple(i % len(info) if -len(info) <= i < 0 else i for i in out_indices)
    if any(not 0 <= i < len(info) for i in out_indices):
        raise ValueError(f'{model_name} has feature levels 0..{len(info) - 1}, got out_indices={out_indices}')
    names = [n for n, _ in model.named_modules()]
    graph = [n for n, m in model.named_modules() if isinstance(m, GRAPH_MODULES)]
    last = info[max(out_indices)]['module']
    # a features model computes the modules up to and including the last level's, in definition order
    kept = [g for g in graph if names.index(g) <= names.index(last) or g.startswith(last + '.')]
    if graph and not kept:
        where = [f['module'] for f in info if any(g.startswith(f['module'] + '.') for g in graph)] or graph[:1]
        raise ValueError(
            f'the feature levels {", ".join(info[i]["module"] for i in out_indices)} of {model_name} leave out all '
            f'its graph modules ({type(model.get_submodule(graph[0])).__name__} in {", ".join(where)}); '
            f'give out_indices that reach {where[0]}')
    return out_indices


def create_feature_backbone(
        model_name: str = 'dgmn2_tiny',
        out_indices: Optional[Sequence[int]] = None,
        strides: Sequence[int] = (4, 8, 16, 32),
        pretrained: bool = False,
        pretrained_file: Optional[Union[str, os.PathLike]] = None,
        backbone_checkpoint: Optional[Union[str, os.PathLike]] = None,
        frozen_bn: bool = False,
        frozen_stages: int = -1,
        **kwargs,
) -> FeatureBackbone:
    """ Create a timm feature pyramid by name with the options of the dense-prediction recipes.

    Args:
        model_name: any timm model name, with a pretrained tag (``'dgmn2_tiny.in1k'``) or a source
            prefix (``'hf-hub:...'``, ``'local-dir:/path'``) if wanted.
        out_indices: feature levels to return (0 is the stride-4 level of DGMN2, the stride-2 level of
            a ResNet); default: the levels of ``strides`` (see ``feature_levels``).
        strides: the strides of the default levels.
        pretrained: load timm pretrained weights (the tag / source of ``model_name``, timm's route).
        pretrained_file: a weights file for the whole model (ImageNet weights: a timm or DeiT-style
            checkpoint, the authors' release, a converted folder).
        backbone_checkpoint: a detection / segmentation checkpoint whose backbone (its ``'backbone.'``
            entries) is loaded.
        frozen_bn: replace BatchNorm layers by ``FrozenBatchNorm2d`` (statistics copied).
        frozen_stages: freeze the stem (0) and the first n stages (n > 0); -1 freezes nothing.
        **kwargs: passed to ``timm.create_model`` (``output_stride``, ``drop_path_rate``, ...).

    ``pretrained_file`` and ``backbone_checkpoint`` are read by ``dgmn_timm.weights.checkpoints`` (one clear
    ``CheckpointError`` line per bad file) and loaded strictly into the model before timm wraps it.
    """
    weights = [w for w in (pretrained_file, backbone_checkpoint) if w is not None]
    if len(weights) > 1 or (weights and pretrained):
        raise ValueError('give one of pretrained, pretrained_file and backbone_checkpoint')
    out_indices = feature_levels(model_name, out_indices, strides, **kwargs)
    if weights:
        body = create_with_weights(model_name, weights[0], features_only=True, out_indices=out_indices, **kwargs)
    else:
        body = timm.create_model(model_name, pretrained=pretrained, features_only=True, out_indices=out_indices,
                                 **kwargs)
    if frozen_bn:
        body = freeze_batch_norm(body)
    return FeatureBackbone(body, frozen_stages=frozen_stages)


class TimmBackboneWithFPN(nn.Module):
    """ A feature backbone followed by torchvision's ``FeaturePyramidNetwork``.

    ``forward`` returns an ordered dict ``'0', '1', ...`` (finest first) plus the extra levels
    (``'p6', 'p7'`` for ``LastLevelP6P7``, ``'pool'`` for ``LastLevelMaxPool``), and
    ``out_channels`` is the FPN width: what torchvision's detectors expect of a backbone.
    """

    def __init__(
            self,
            backbone: FeatureBackbone,
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=list(backbone.channels),
            out_channels=out_channels,
            extra_blocks=extra_blocks,
            norm_layer=norm_layer,
        )
        self.out_channels = out_channels
        reductions = list(backbone.reductions)
        if isinstance(extra_blocks, LastLevelP6P7):
            reductions += [reductions[-1] * 2, reductions[-1] * 4]
        elif isinstance(extra_blocks, LastLevelMaxPool):
            reductions += [reductions[-1] * 2]
        # strides of the output levels, in order (used to size anchors)
        self.strides: List[int] = reductions

    @property
    def pretrained_cfg(self) -> Dict[str, Any]:
        return self.body.pretrained_cfg

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


def timm_fpn_backbone(
        model_name: str = 'dgmn2_tiny',
        out_indices: Optional[Sequence[int]] = None,
        fpn_channels: int = 256,
        extra_blocks: Union[str, ExtraFPNBlock, None] = 'pool',
        fpn_norm_layer: Optional[Callable[..., nn.Module]] = None,
        **kwargs,
) -> TimmBackboneWithFPN:
    """ A timm model (by name) as a torchvision detection backbone with FPN.

    Args:
        model_name: timm model name (see ``create_feature_backbone``).
        out_indices: the feature levels that feed the FPN (default: strides 4-32, or ``strides`` in kwargs).
        fpn_channels: FPN width (``out_channels`` of the result).
        extra_blocks: ``'pool'`` (max-pooled P6, R-CNNs), ``'p6p7'`` (P6/P7 convs from the last
            backbone level, RetinaNet), ``'p6p7_from_p5'`` (P6/P7 from the FPN output),
            None, or a torchvision ``ExtraFPNBlock``.
        fpn_norm_layer: optional norm layer of the FPN convs.
        **kwargs: ``create_feature_backbone`` options (``pretrained``, ``pretrained_file``,
            ``backbone_checkpoint``, ``frozen_bn``, ``frozen_stages``) and timm kwargs.
    """
    backbone = create_feature_backbone(model_name, out_indices=out_indices, **kwargs)
    if isinstance(extra_blocks, str):
        if extra_blocks == 'pool':
            extra_blocks = LastLevelMaxPool()
        elif extra_blocks == 'p6p7':
            extra_blocks = LastLevelP6P7(backbone.channels[-1], fpn_channels)
        elif extra_blocks == 'p6p7_from_p5':
            extra_blocks = LastLevelP6P7(fpn_channels, fpn_channels)
        else:
            raise ValueError(f"extra_blocks must be 'pool', 'p6p7', 'p6p7_from_p5', None or a module, "
                             f"got {extra_blocks!r}")
    return TimmBackboneWithFPN(backbone, fpn_channels, extra_blocks=extra_blocks, norm_layer=fpn_norm_layer)


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------

def _image_norm(backbone: TimmBackboneWithFPN, kwargs: Dict[str, Any]):
    cfg = backbone.pretrained_cfg
    kwargs.setdefault('image_mean', list(cfg.get('mean', (0.485, 0.456, 0.406))))
    kwargs.setdefault('image_std', list(cfg.get('std', (0.229, 0.224, 0.225))))


def _backbone_for(
        backbone: str,
        out_indices: Optional[Sequence[int]],
        strides: Sequence[int],
        extra_blocks: str,
        backbone_kwargs: Optional[Dict[str, Any]],
        **options,
) -> TimmBackboneWithFPN:
    options.update(backbone_kwargs or {})
    return timm_fpn_backbone(backbone, out_indices=out_indices, strides=strides, extra_blocks=extra_blocks, **options)


def retinanet_dgmn2(
        backbone: str = 'dgmn2_tiny',
        num_classes: int = 91,
        pretrained: bool = False,
        pretrained_file: Optional[str] = None,
        backbone_checkpoint: Optional[str] = None,
        frozen_bn: bool = True,
        frozen_stages: int = -1,
        out_indices: Optional[Sequence[int]] = None,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> RetinaNet:
    """ RetinaNet (torchvision) on a DGMN2 (or any timm) backbone, the paper's 1x recipe.

    FPN on C3-C5, P6/P7 computed from C5, 9 anchors per location (3 octave scales x 3 ratios,
    base size 4 x stride). Paper COCO val box AP (1x): 39.7 / 42.5 / 43.7 / 44.7 for T/S/M/L.

    Args:
        backbone: timm model name.
        num_classes: classes including background index 0 (91 for torchvision's COCO ids).
        pretrained, pretrained_file: ImageNet weights for the backbone through timm.
        backbone_checkpoint: a released detection checkpoint; its ``'backbone.'`` weights are loaded.
        frozen_bn: freeze the backbone's BatchNorm layers (FrozenBatchNorm2d).
        frozen_stages: -1 none, 0 the stem, n the stem and the first n stages.
        out_indices: backbone levels feeding the FPN (default: the levels of strides 8, 16, 32; for the
            R-CNNs 4-32; see ``feature_levels``).
        min_size, max_size: torchvision's image resize (shorter side / longer-side cap).
        backbone_kwargs: extra ``timm.create_model`` kwargs (e.g. ``drop_path_rate``).
        **kwargs: passed to ``torchvision.models.detection.RetinaNet`` (``score_thresh``,
            ``detections_per_img``, ``anchor_generator``, ``head``, ...).
    """
    body = _backbone_for(
        backbone, out_indices, (8, 16, 32), 'p6p7', backbone_kwargs, pretrained=pretrained,
        pretrained_file=pretrained_file, backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn,
        frozen_stages=frozen_stages)
    if 'anchor_generator' not in kwargs:
        sizes = tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in body.strides)
        kwargs['anchor_generator'] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    _image_norm(body, kwargs)
    return RetinaNet(body, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)


def _rcnn_kwargs(body: TimmBackboneWithFPN, with_masks: bool, kwargs: Dict[str, Any]):
    num_levels = len(body.body.channels)
    names = [str(i) for i in range(num_levels)]
    if 'rpn_anchor_generator' not in kwargs:
        sizes = tuple((8 * s,) for s in body.strides)
        kwargs['rpn_anchor_generator'] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    kwargs.setdefault('box_roi_pool', MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2))
    if with_masks:
        kwargs.setdefault('mask_roi_pool', MultiScaleRoIAlign(featmap_names=names, output_size=14, sampling_ratio=2))
    _image_norm(body, kwargs)


def fasterrcnn_dgmn2(
        backbone: str = 'dgmn2_tiny',
        num_classes: int = 91,
        pretrained: bool = False,
        pretrained_file: Optional[str] = None,
        backbone_checkpoint: Optional[str] = None,
        frozen_bn: bool = True,
        frozen_stages: int = -1,
        out_indices: Optional[Sequence[int]] = None,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> FasterRCNN:
    """ Faster R-CNN (torchvision) with FPN on a DGMN2 (or any timm) backbone, 1x recipe.

    FPN on C2-C5 plus a max-pooled level for the RPN; RoIAlign over the FPN levels. Arguments
    as ``retinanet_dgmn2``; ``**kwargs`` go to ``torchvision.models.detection.FasterRCNN``.
    """
    body = _backbone_for(
        backbone, out_indices, (4, 8, 16, 32), 'pool', backbone_kwargs, pretrained=pretrained,
        pretrained_file=pretrained_file, backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn,
        frozen_stages=frozen_stages)
    _rcnn_kwargs(body, False, kwargs)
    return FasterRCNN(body, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)


def maskrcnn_dgmn2(
        backbone: str = 'dgmn2_tiny',
        num_classes: int = 91,
        pretrained: bool = False,
        pretrained_file: Optional[str] = None,
        backbone_checkpoint: Optional[str] = None,
        frozen_bn: bool = True,
        frozen_stages: int = -1,
        out_indices: Optional[Sequence[int]] = None,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> MaskRCNN:
    """ Mask R-CNN (torchvision) with FPN on a DGMN2 (or any timm) backbone, 1x recipe.

    Paper COCO val box/mask AP (1x): 40.2/37.2, 43.4/39.7, 44.4/40.2, 46.2/41.6 for T/S/M/L.
    Arguments as ``retinanet_dgmn2``; ``**kwargs`` go to ``torchvision.models.detection.MaskRCNN``.
    """
    body = _backbone_for(
        backbone, out_indices, (4, 8, 16, 32), 'pool', backbone_kwargs, pretrained=pretrained,
        pretrained_file=pretrained_file, backbone_checkpoint=backbone_checkpoint, frozen_bn=frozen_bn,
        frozen_stages=frozen_stages)
    _rcnn_kwargs(body, True, kwargs)
    return MaskRCNN(body, num_classes=num_classes, min_size=min_size, max_size=max_size, **kwargs)
