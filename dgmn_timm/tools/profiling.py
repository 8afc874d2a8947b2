""" Multiply-accumulate counts of DGMN models.

Matrix work (convolutions, linear layers, the position-term products) is counted by
PyTorch's ``FlopCounterMode``. The sampled attention's work is added analytically from
the map size each attention layer sees, since ``FlopCounterMode`` does not see it:

- the two contractions over the K = 9 nodes (q . k_k for the logits and sum_k p_k v_k
  for the output): 2 * K * C MACs per token;
- bilinear sampling of keys and values: each of the 2 * C * K sampled values is a
  weighted sum of 4 corners, 8 * K * C MACs per token;
- the position term, where the op computes it (the default, fused path): a product of the
  query with one height-table row and one width-table row per node, 2 * K * C MACs per
  token (on the portable path ``FlopCounterMode`` sees these products in the model).

Softmax, norms and activations are not counted, as is usual for published GMAC figures.

The model is built on the meta device, so counting the large variants costs no memory.
"""
from typing import Dict, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ..ops.sampling import NUM_NODES

__all__ = ['count_macs', 'count_model_macs']


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> Dict[str, int]:
    """ MACs of one forward pass of ``model`` (any device, meta included).

    Returns:
        dict with 'matmul' (FlopCounterMode, plus the op's position term), 'attention' (analytic node contractions),
        'sampling' (analytic bilinear reads) and 'total'.
    """
    from ..models.dgmn2 import DynamicGraphAttention

    attention = [0]
    position = [0]

    def hook(module, args):
        B, H, W, C = args[0].shape
        attention[0] += NUM_NODES * C * H * W * B
        if module.fused_attn:
            position[0] += 2 * NUM_NODES * C * H * W * B

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, DynamicGraphAttention)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(*input_size, device=device))
    finally:
        for h in handles:
            h.remove()
    matmul = counter.get_total_flops() // 2 + position[0]
    contractions = 2 * attention[0]
    sampling = 8 * attention[0]
    return dict(matmul=matmul, attention=contractions, sampling=sampling, total=matmul + contractions + sampling)


def count_model_macs(name: str, input_size: Sequence[int] = (1, 3, 224, 224), **kwargs) -> Dict[str, int]:
    """ Build registered model ``name`` on the meta device and count its MACs. """
    import timm
    with torch.device('meta'):
        model = timm.create_model(name, **kwargs).eval()
    return count_macs(model, input_size)
