""" Run by tests/test_perf.py in a subprocess with TRITON_INTERPRET=1 (it must be set before
triton is imported): the Triton sampled-attention kernel on CPU tensors, forward and
gradients, against the float64 reference of test_perf.py. Exit 77 = interpreter unavailable. """
import os
import sys

assert os.environ.get('TRITON_INTERPRET') == '1'
try:
    import triton  # noqa: F401
    from dgmn_timm.kernels.triton_sampled_attention import sampled_attention_triton
except Exception as e:  # pragma: no cover
    print('unavailable:', type(e).__name__, e)
    sys.exit(77)
