""" Fast implementations of DGMN2's sampled attention (sample 9 nodes + attend).

- :func:`sampled_attention` dispatches: a fused Triton kernel on CUDA (when Triton is
  installed), a gather/scatter CPU path (custom autograd) elsewhere, and a portable
  ``grid_sample`` path under ONNX export.
- :func:`sampled_attention_portable` is the portable, TorchScript- and ONNX-friendly
  composition of ``sample_nodes`` (``grid_sample``) and plain tensor ops.

:func:`chunked_mlp` is the transformer MLP computed in row blocks (large CPU maps).

All paths compute the same function (spec sections 2-3); tests compare them to an
independent float64 reference.
"""
from .chunked_mlp import chunked_mlp, use_chunked_mlp
from .sampled_attention import (
    sampled_attention,
    sampled_attention_cpu,
    sampled_attention_portable,
    node_corners,
    attention_weights,
    triton_available,
    uses_gather_path,
)

__all__ = [
    'sampled_attention', 'sampled_attention_cpu', 'sampled_attention_portable', 'node_corners',
    'attention_weights', 'triton_available', 'uses_gather_path', 'chunked_mlp', 'use_chunked_mlp',
]
