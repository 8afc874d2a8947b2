""" ResNets with DGMN (CVPR 2020) modules after the 3x3 convs of chosen stages

Paper: `Dynamic Graph Message Passing Networks` - Li Zhang, Dan Xu, Anurag Arnab,
    Philip H.S. Torr (CVPR 2020), arXiv:1908.06955

A DGMN module (``dgmn_timm.layers.DGMN``, COCO form: rates (1, 4, 8, 12), 4 groups,
'sum' fusion) follows every 3x3 conv (conv2 -> bn2 -> act, before conv3) of every block
of res5 ('c5') or of res4 and res5 ('c4c5'). The models are timm's ``ResNet`` with those
blocks swapped for ``GraphBottleneck`` (``block.dgmn``), so timm's whole model API works unchanged.

Weights: NO DGMN weights exist (the authors never released any). ``pretrained=True``
loads timm's ImageNet weights of the matching plain ResNet into the ResNet part; the
DGMN modules keep their initialisation (walks zero, i.e. the regular dilated grid), and
their keys are logged. The loader refuses a checkpoint with any other missing or
unexpected key.
"""
import logging
from typing import Any, Dict, List, Mapping, Sequence, Type

import torch

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import Bottleneck, ResNet

from ..layers.dgmn import DGMN
from ..errors import mismatch_error, shape_mismatches
from ._resnet import GraphBottleneck, RSB_CFG, resnet_weights_cfg

__all__ = ['ResNetDGMN', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)

DGMN_NOT_PRETRAINED = (
    'The DGMN modules are NOT pretrained (no DGMN weights were ever released): only the plain '
    'ResNet part loads ImageNet weights, the DGMN parameters keep their initialisation.'
)


class ResNetDGMN(ResNet):
    """ timm ResNet with DGMN modules in the bottlenecks of ``dgmn_stages`` (1..4 = res2..res5).

    Args:
        dgmn_stages: stages whose blocks all get a DGMN, e.g. (4,) for C5, (3, 4) for C4 + C5.
        dgmn_rates, dgmn_groups, dgmn_mode, dgmn_fusion: the ``DGMN`` settings.
        All other arguments are timm's ``ResNet`` ones (``block`` must be a Bottleneck).
    """

    def __init__(
            self,
            block: Type[Bottleneck] = Bottleneck,
            layers: Sequence[int] = (3, 4, 6, 3),
            dgmn_stages: Sequence[int] = (4,),
            dgmn_rates: Sequence[int] = (1, 4, 8, 12),
            dgmn_groups: int = 4,
            dgmn_mode: str = 'full',
            dgmn_fusion: str = 'sum',
            **kwargs,
    ):
        if block is not Bottleneck:
            raise ValueError('ResNetDGMN is built on bottleneck ResNets (block=Bottleneck)')
        num_stages = len(kwargs.get('channels') or (64, 128, 256, 512))
        dgmn_stages = tuple(sorted(set(int(s) for s in dgmn_stages)))
        if any(s < 1 or s > num_stages for s in dgmn_stages):
            raise ValueError(f'dgmn_stages must be in 1..{num_stages}, got {dgmn_stages}')
        blocks = tuple(GraphBottleneck if i + 1 in dgmn_stages else Bottleneck for i in range(num_stages))
        super().__init__(block=blocks, layers=layers, **kwargs)
        self.dgmn_stages = dgmn_stages
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        for s in dgmn_stages:
            for blk in getattr(self, f'layer{s}'):
                blk.dgmn = DGMN(
                    blk.conv2.out_channels,
                    rates=dgmn_rates,
                    groups=dgmn_groups,
                    mode=dgmn_mode,
                    fusion=dgmn_fusion,
                    **dd,
                )

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        super().init_weights(zero_init_last=zero_init_last)
        # timm's init re-initialises every Conv2d, the DGMN walk convs included
        for m in self.modules():
            if isinstance(m, DGMN):
                m.reset_parameters()

    @torch.jit.ignore
    def dgmn_parameter_names(self) -> List[str]:
        """ Names of the parameters and buffers that belong to the DGMN modules. """
        return [k for k in self.state_dict() if _is_dgmn_key(k)]


def _is_dgmn_key(key: str) -> bool:
    return '.dgmn.' in key or key.startswith('dgmn.')


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: ResNetDGMN) -> Dict[str, Any]:
    """ Check a (plain ResNet) checkpoint against ``model`` and complete it with the DGMN part.

    Accepts a plain timm ResNet state dict of the same depth/width (DGMN keys missing) or a
    ResNetDGMN one (``dgmn_timm.weights.checkpoints.read_state_dict`` takes it out of a training checkpoint).
    Any missing key that is not a DGMN key, and any unexpected key, is an error. Missing DGMN keys
    are filled with the model's current (initial) values and logged.
    """
    own = model.state_dict()
    # the classifier is timm's business: dropped by load_pretrained when num_classes differs
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifier = cfg.get('classifier') or 'fc'
    head = tuple(f'{c}.' for c in ((classifier,) if isinstance(classifier, str) else classifier))
    # ...and so is the first conv, adapted by load_pretrained for another in_chans
    first_conv = cfg.get('first_conv') or 'conv1'
    stem = {f'{c}.weight' for c in ((first_conv,) if isinstance(first_conv, str) else first_conv)}
    unexpected = [k for k in state_dict if k not in own and not k.startswith(head)]
    missing = [k for k in own if k not in state_dict]
    bad_missing = [k for k in missing if not _is_dgmn_key(k)]
    mismatched = shape_mismatches(state_dict, own, skip={k for k in own if k.startswith(head)} | stem)
    if unexpected or bad_missing or mismatched:
        raise mismatch_error(
            'Checkpoint does not fit the ResNet part of this DGMN model (only DGMN keys may be missing).',
            bad_missing, unexpected, mismatched, missing_label='Missing non-DGMN keys')
    out = dict(state_dict)
    if missing:
        for k in missing:
            out[k] = own[k]
        num = sum(own[k].numel() for k in missing)
        modules = sorted({k.rsplit('.dgmn.', 1)[0] + '.dgmn' for k in missing}, key=_natural)
        _logger.warning(
            f'{len(missing)} DGMN tensors ({num:,} values) in {len(modules)} modules '
            f'({", ".join(modules)}) are not in the checkpoint and keep their initialisation: '
            f'{DGMN_NOT_PRETRAINED}')
        _logger.info('DGMN keys initialised, not loaded: ' + ', '.join(missing))
    model.pretrained_dgmn_missing_keys = missing
    return out


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in s.replace('.', ' . ').split()]


def _create_resnet_dgmn(variant: str, pretrained: bool = False, **kwargs) -> ResNetDGMN:
    return build_model_with_cfg(
        ResNetDGMN, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _cfg(hf_hub_id: str, **kwargs) -> Dict[str, Any]:
    return resnet_weights_cfg(
        hf_hub_id, 'arXiv:1908.06955', 'Dynamic Graph Message Passing Networks', DGMN_NOT_PRETRAINED, **kwargs)


default_cfgs = generate_default_cfgs({
    'resnet50_dgmn_c5.a1_in1k': _cfg('timm/resnet50.a1_in1k', **RSB_CFG),
    'resnet50_dgmn_c5.tv_in1k': _cfg('timm/resnet50.tv_in1k', license='bsd-3-clause'),
    'resnet50_dgmn_c4c5.a1_in1k': _cfg('timm/resnet50.a1_in1k', **RSB_CFG),
    'resnet50_dgmn_c4c5.tv_in1k': _cfg('timm/resnet50.tv_in1k', license='bsd-3-clause'),
    'resnet101_dgmn_c5.a1h_in1k': _cfg('timm/resnet101.a1h_in1k', **RSB_CFG),
    'resnet101_dgmn_c5.tv_in1k': _cfg('timm/resnet101.tv_in1k', license='bsd-3-clause'),
    'resnext101_32x8d_dgmn_c5.fb_wsl_ig1b_ft_in1k': _cfg(
        'timm/resnext101_32x8d.fb_wsl_ig1b_ft_in1k', license='cc-by-nc-4.0'),
    'resnext101_32x8d_dgmn_c5.tv_in1k': _cfg('timm/resnext101_32x8d.tv_in1k', license='bsd-3-clause'),
})


@register_model
def resnet50_dgmn_c5(pretrained: bool = False, **kwargs) -> ResNetDGMN:
    """ ResNet-50 with DGMN after the 3x3 conv of every res5 block (29,040,692 params).

    ``pretrained=True`` loads timm's ResNet-50 ImageNet weights; the DGMN modules are NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 6, 3), dgmn_stages=(4,))
    return _create_resnet_dgmn('resnet50_dgmn_c5', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_dgmn_c4c5(pretrained: bool = False, **kwargs) -> ResNetDGMN:
    """ ResNet-50 with DGMN after the 3x3 conv of every res4 and res5 block (32,524,364 params).

    ``pretrained=True`` loads timm's ResNet-50 ImageNet weights; the DGMN modules are NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 6, 3), dgmn_stages=(3, 4))
    return _create_resnet_dgmn('resnet50_dgmn_c4c5', pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_dgmn_c5(pretrained: bool = False, **kwargs) -> ResNetDGMN:
    """ ResNet-101 with DGMN after the 3x3 conv of every res5 block.

    ``pretrained=True`` loads timm's ResNet-101 ImageNet weights; the DGMN modules are NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 23, 3), dgmn_stages=(4,))
    return _create_resnet_dgmn('resnet101_dgmn_c5', pretrained, **dict(model_args, **kwargs))


@register_model
def resnext101_32x8d_dgmn_c5(pretrained: bool = False, **kwargs) -> ResNetDGMN:
    """ ResNeXt-101 32x8d with DGMN after the 3x3 conv of every res5 block.

    ``pretrained=True`` loads timm's ResNeXt-101 32x8d weights (default: the Instagram-1B WSL
    fine-tuned ones, CC-BY-NC); the DGMN modules are NOT pretrained.
    """
    model_args = dict(layers=(3, 4, 23, 3), cardinality=32, base_width=8, dgmn_stages=(4,))
    return _create_resnet_dgmn('resnext101_32x8d_dgmn_c5', pretrained, **dict(model_args, **kwargs))
