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

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_perf import _grads, _inputs, ref_attention  # noqa: E402

failures = []
for (B, H, W, nh, c, walk) in [(2, 5, 4, 2, 8, 1.5), (1, 1, 1, 1, 16, 1.0), (1, 3, 6, 1, 12, 3.0)]:
    inputs = _inputs(B, H, W, nh, c, walk=walk)
    with torch.no_grad():
        inputs[1][..., :2] += 1e4  # node 0 far outside: zero reads, zero gradient
    f32 = [t.detach().float().requires_grad_() for t in inputs]
    scale = c ** -0.5
    out = sampled_attention_triton(*f32, scale)
    ref = ref_attention(*inputs, scale)
    err = (out.double() - ref).abs().max().item()
    gerr = [(g.double() - r).abs().max().item() for g, r in zip(_grads(out, f32), _grads(ref, inputs))]
    print((B, H, W, nh, c), 'forward', err, 'grads', gerr)
    if err > 1e-5 or max(gerr) > 1e-4:
        failures.append((B, H, W, nh, c))
# reduced precision inputs, float32 math inside
inputs = _inputs(1, 4, 4, 2, 8)
with torch.no_grad():
    inputs[1].copy_(inputs[1].round() + 0.25)
bf = [t.detach().bfloat16().requires_grad_() for t in inputs]
out = sampled_attention_triton(*bf, 8 ** -0.5)
ref = ref_attention(*[t.detach().double() for t in bf], 8 ** -0.5)
err = (out.double() - ref).abs().max().item()
print('bfloat16 forward', err, out.dtype)
out.float().sum().backward()
if err > 3e-2 or out.dtype != torch.bfloat16 or bf[0].grad.dtype != torch.bfloat16:
    failures.append('bf16')
print('FAILED' if failures else 'OK', failures)
sys.exit(1 if failures else 0)
