""" Fast ops of the DGMN models, each with a float64 reference.

- :func:`sampled_attention`: ``torch.ops.dgmn_timm.sampled_attention``, attention over K bilinearly
  sampled key/value nodes per query (gather kernel on CPU, Triton kernel on CUDA).
  :func:`sampled_attention_portable` is the same function as corner gathers and batched
  products in plain ops (TorchScript, FX, ONNX, double backward, attention dropout); :func:`attention_weights` the softmax
  weights of the nodes; :func:`position_logits` the op's optional position term with plain ops.
  The op registers its cost with ``torch.utils.flop_counter`` (``FlopCounterMode`` counts it).
- ``sampling``: the bilinear read's corner indices and weights (``axis_corners``), the 3x3 node
  grid (``node_displacements``, ``NUM_NODES``) and DGMN v1's node sampler (``sample_nodes``).
- ``reference``: the float64 oracles of all of these (:func:`sampled_attention_reference`,
  ``bilinear_reference``, ``position_reference``, ``rel_pos_reference``, ``sample_nodes_reference``).
"""
from .sampled_attention import (
    DOUBLE_BACKWARD_MESSAGE,
    attention_weights,
    position_logits,
    sampled_attention,
    triton_available,
)
from .portable import sampled_attention_portable
from .reference import sampled_attention_reference

__all__ = [
    'sampled_attention', 'sampled_attention_portable', 'sampled_attention_reference', 'attention_weights',
    'position_logits', 'triton_available', 'DOUBLE_BACKWARD_MESSAGE',
]
