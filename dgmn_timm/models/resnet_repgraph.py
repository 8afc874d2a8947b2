""" ResNets with RepGraph (ECCV 2020) layers, and their non-local counterparts

Paper: `Representative Graph Neural Network` - Changqian Yu, Yifan Liu, Changxin Gao,
    Chunhua Shen, Nong Sang (ECCV 2020), arXiv:2008.05202

A context layer (``dgmn_timm.layers.RepGraph``, bottleneck form, 'sum' fusion, S = 9 nodes,
inner width C / 4; or ``NonLocal2d`` with the same inner width) sits before chosen residual
blocks: ``context_layers = (n2, n3, n4, n5)`` layers in res2..res5, placed before the last
block of the stage, then every other block counting back (before blocks L-1, L-3, ... of a
stage of L blocks, the non-local paper's spacing). Registered settings:

- ``*_repgraph``: one layer before the last block of res4 (the paper's Mask R-CNN setting);
- ``*_repgraph_3l``: one before the last block of res3, res4 and res5;
- ``*_repgraph_5l``: 1 in res3, 2 in res4, 2 in res5;
- ``*_nonlocal``: a non-local block where ``*_repgraph`` has its RepGraph.

The models are timm's ``ResNet`` with those blocks swapped for ``GraphBottleneck`` (the layer
runs first, as ``block.context``), so the ResNet keys are unchanged and timm's whole model API
works as for a plain ResNet.

Weights: NO RepGraph / non-local weights exist. ``pretrained=True`` loads timm's ImageNet
weights of the plain ResNet into the ResNet part; the context layers keep their
initialisation, under which each is the identity, so the pretrained network's outputs are
unchanged until it is trained. Their keys are logged. Any other missing or unexpected key
is an error.
"""
import logging
from typing import Any, Dict, List, Mapping, Sequence, Type

import torch

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from ..layers.repgraph import NonLocal2d, RepGraph
from ._resnet import GraphBottleneck, RSB_CFG, resnet_weights_cfg

__all__ = ['ResNetRepGraph', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)

NOT_PRETRAINED = (
    'The RepGraph / non-local layers are NOT pretrained (no such weights were ever released): only the '
    'plain ResNet part loads ImageNet weights; the context layers start as the identity.'
)


def context_block_indices(num_blocks: int, num_layers: int) -> List[int]:
    """ Blocks of a stage that get a context layer: the last, then every other one counting back. """
    if num_layers > (num_blocks + 1) // 2:
        raise ValueError(f'{num_layers} context layers do not fit every other block of a {num_blocks}-block stage')
    return sorted(num_blocks - 1 - 2 * i for i in range(num_layers))


class ResNetRepGraph(ResNet):
    """ timm ResNet with RepGraph (or non-local) layers before chosen bottleneck blocks.

    Args:
        context_layers: layers per stage (res2, res3, res4, res5), e.g. (0, 0, 1, 0).
        context_type: 'repgraph' or 'nonlocal'.
        context_ratio: inner width C' = C * ratio (C: the block's input channels).
        num_nodes, structure, grid, groups: the ``RepGraph`` settings (fusion is 'sum').
        All other arguments are timm's ``ResNet`` ones (``block`` must be Bottleneck).
    """

    def __init__(
            self,
            block: Type[Bottleneck] = Bottleneck,
            layers: Sequence[int] = (3, 4, 6, 3),
            context_layers: Sequence[int] = (0, 0, 1, 0),
            context_type: str = 'repgraph',
            context_ratio: float = 0.25,
            num_nodes: int = 9,
            structure: str = 'bottleneck',
            grid: int = 1,
            groups: int = 1,
            **kwargs,
    ):
        if block is not Bottleneck:
            raise ValueError('ResNetRepGraph is built on bottleneck ResNets (block=Bottleneck)')
        if context_type not in ('repgraph', 'nonlocal'):
            raise ValueError(f"context_type must be 'repgraph' or 'nonlocal', got {context_type!r}")
        context_layers = tuple(int(n) for n in context_layers)
        if len(context_layers) != len(layers):
            raise ValueError(f'context_layers needs one count per stage ({len(layers)}), got {context_layers}')
        where = [context_block_indices(nb, n) for nb, n in zip(layers, context_layers)]
        blocks = tuple(GraphBottleneck if w else Bottleneck for w in where)
        super().__init__(block=blocks, layers=layers, **kwargs)
        self.context_layers = context_layers
        self.context_type = context_type
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        for s, idx in enumerate(where):
            stage = getattr(self, f'layer{s + 1}')
            for i in idx:
                blk = stage[i]
                dim = blk.conv1.in_channels
                inner = max(int(dim * context_ratio), 1)
                if context_type == 'repgraph':
                    blk.context = RepGraph(
                        dim, inner, num_nodes=num_nodes, structure=structure, fusion='sum',
                        grid=grid, groups=groups, **dd)
                else:
                    blk.context = NonLocal2d(dim, inner, fusion='sum', **dd)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        super().init_weights(zero_init_last=zero_init_last)
        # timm's init re-initialises every Conv2d, the context layers' included: back to identity
        for m in self.modules():
            if isinstance(m, (RepGraph, NonLocal2d)):
                m.reset_parameters()

    @torch.jit.ignore
    def context_parameter_names(self) -> List[str]:
        """ Names of the parameters and buffers of the RepGraph / non-local layers. """
        return [k for k in self.state_dict() if _is_context_key(k)]


def _is_context_key(key: str) -> bool:
    return '.context.' in key


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ResNetRepGraph) -> Dict[str, Any]:
    """ Check a plain timm ResNet (or ResNetRepGraph) state dict against ``model``; add the context layers.

    Missing context-layer keys are filled with the model's current (identity) values and
    logged. A missing ResNet key, an unexpected key or a shape mismatch is an error (the
    classifier and first conv are left to timm's ``load_pretrained``).
    """
    own = model.state_dict()
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    head = f"{cfg.get('classifier') or 'fc'}."
    stem = f"{cfg.get('first_conv') or 'conv1'}.weight"
    unexpected = [k for k in state_dict if k not in own and not k.startswith(head)]
    missing = [k for k in own if k not in state_dict]
    bad_missing = [k for k in missing if not _is_context_key(k)]
    mismatched = [
        f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}'
        for k, v in state_dict.items()
        if k in own and not k.startswith(head) and k != stem and v.shape != own[k].shape]
    if unexpected or bad_missing or mismatched:
        lines = ['Checkpoint does not fit the ResNet part of this model (only RepGraph / non-local keys may be missing).']
        for label, keys in (('Missing ResNet keys', bad_missing), ('Unexpected keys', unexpected),
                            ('Shape mismatches', mismatched)):
            if keys:
                lines.append(f'{label} ({len(keys)}): {", ".join(keys[:8])}{" ..." if len(keys) > 8 else ""}')
        raise RuntimeError('\n  '.join(lines))
    out = dict(state_dict)
    for k in missing:
        out[k] = own[k]
    if missing:
        layers = sorted({k.split('.context.')[0] + '.context' for k in missing})
        _logger.warning(f'{len(missing)} tensors of {len(layers)} context layers ({", ".join(layers)}) keep '
                        f'their initialisation: {NOT_PRETRAINED}')
    return out


def _create_resnet_repgraph(variant: str, pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    return build_model_with_cfg(
        ResNetRepGraph, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(hf_hub_id: str, **kwargs) -> Dict[str, Any]:
    return resnet_weights_cfg(
        hf_hub_id, 'arXiv:2008.05202', 'Representative Graph Neural Network', NOT_PRETRAINED, **kwargs)


_TV = dict(license='bsd-3-clause')

default_cfgs = generate_default_cfgs({
    'resnet50_repgraph.a1_in1k': _cfg('timm/resnet50.a1_in1k', **RSB_CFG),
    'resnet50_repgraph.tv_in1k': _cfg('timm/resnet50.tv_in1k', **_TV),
    'resnet50_repgraph_3l.a1_in1k': _cfg('timm/resnet50.a1_in1k', **RSB_CFG),
    'resnet50_repgraph_3l.tv_in1k': _cfg('timm/resnet50.tv_in1k', **_TV),
    'resnet50_repgraph_5l.a1_in1k': _cfg('timm/resnet50.a1_in1k', **RSB_CFG),
    'resnet50_repgraph_5l.tv_in1k': _cfg('timm/resnet50.tv_in1k', **_TV),
    'resnet50_nonlocal.a1_in1k': _cfg('timm/resnet50.a1_in1k', **RSB_CFG),
    'resnet50_nonlocal.tv_in1k': _cfg('timm/resnet50.tv_in1k', **_TV),
    'resnet101_repgraph.a1h_in1k': _cfg('timm/resnet101.a1h_in1k', **RSB_CFG),
    'resnet101_repgraph.tv_in1k': _cfg('timm/resnet101.tv_in1k', **_TV),
    'resnet101_nonlocal.a1h_in1k': _cfg('timm/resnet101.a1h_in1k', **RSB_CFG),
    'resnet101_nonlocal.tv_in1k': _cfg('timm/resnet101.tv_in1k', **_TV),
})


@register_model
def resnet50_repgraph(pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    """ ResNet-50 with one bottleneck RepGraph (S = 9) before the last block of res4.

    ``pretrained=True`` loads timm's ResNet-50 ImageNet weights; the RepGraph layer is NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 6, 3), context_layers=(0, 0, 1, 0))
    return _create_resnet_repgraph('resnet50_repgraph', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_repgraph_3l(pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    """ ResNet-50 with a RepGraph before the last block of res3, res4 and res5.

    ``pretrained=True`` loads timm's ResNet-50 ImageNet weights; the RepGraph layers are NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 6, 3), context_layers=(0, 1, 1, 1))
    return _create_resnet_repgraph('resnet50_repgraph_3l', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_repgraph_5l(pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    """ ResNet-50 with 5 RepGraph layers: 1 in res3, 2 in res4, 2 in res5.

    ``pretrained=True`` loads timm's ResNet-50 ImageNet weights; the RepGraph layers are NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 6, 3), context_layers=(0, 1, 2, 2))
    return _create_resnet_repgraph('resnet50_repgraph_5l', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_nonlocal(pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    """ ResNet-50 with one non-local block (inner width C / 4) before the last block of res4.

    ``pretrained=True`` loads timm's ResNet-50 ImageNet weights; the non-local block is NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 6, 3), context_layers=(0, 0, 1, 0), context_type='nonlocal')
    return _create_resnet_repgraph('resnet50_nonlocal', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_repgraph(pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    """ ResNet-101 with one bottleneck RepGraph (S = 9) before the last block of res4.

    ``pretrained=True`` loads timm's ResNet-101 ImageNet weights; the RepGraph layer is NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 23, 3), context_layers=(0, 0, 1, 0))
    return _create_resnet_repgraph('resnet101_repgraph', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_nonlocal(pretrained: bool = False, **kwargs) -> ResNetRepGraph:
    """ ResNet-101 with one non-local block before the last block of res4.

    ``pretrained=True`` loads timm's ResNet-101 ImageNet weights; the non-local block is NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 23, 3), context_layers=(0, 0, 1, 0), context_type='nonlocal')
    return _create_resnet_repgraph('resnet101_nonlocal', pretrained, **dict(model_args, **kwargs))
