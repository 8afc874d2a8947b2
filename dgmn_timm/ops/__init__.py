""" Fast ops of the DGMN models, each with a float64 reference.

- :func:`sampled_attention`: ``torch.ops.dgmn_timm.sampled_attention``, attention over K bilinearly
  sampled key/value nodes per query (gather kernel on CPU, Triton kernel on CUDA).
  :func:`sampled_attention_portable` is the same function as corner gathers and batched products in
  plain ops (TorchScript, FX, ONNX, double backward, attention dropout); :func:`sampled_attention_reference`
  the float64 oracle; :func:`attention_weights` the softmax weights of the nodes;
  :func:`position_logits` the op's optional position term with plain ops.
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
