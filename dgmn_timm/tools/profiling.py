""" Multiply-accumulate counts of DGMN models with PyTorch's ``FlopCounterMode``.

The sampled-attention op registers its cost with ``torch.utils.flop_counter`` (node
contractions, bilinear reads, the position products and the backward; see
``dgmn_timm.ops.sampled_attention``), so the plain counter sees the whole model: MACs are its
total / 2. Softmax, norms and activations are not counted, as is usual for published GMAC
figures.

The model is built on the meta device, so counting the large variants costs no memory.
"""
from typing import Dict, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_macs', 'count_model_macs']


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> Dict[str, int]:
    """ MACs of one forward pass of ``model`` (any device, meta included).

    Returns:
        dict with 'total' and the MACs of each operator that counted (e.g. 'aten.convolution',
        'dgmn_timm.sampled_attention_fwd').
    """
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(*input_size, device=device))
    by_op = {str(op): flops // 2 for op, flops in counter.get_flop_counts()['Global'].items()}
    return dict(by_op, total=counter.get_total_flops() // 2)


def count_model_macs(name: str, input_size: Sequence[int] = (1, 3, 224, 224), **kwargs) -> Dict[str, int]:
    """ Build registered model ``name`` on the meta device and count its MACs. """
    import timm
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs).eval()
    return count_macs(model, input_size)
