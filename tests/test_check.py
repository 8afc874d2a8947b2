""" ``python -m dgmn_timm.check``: the machine self-check passes here, fails when the op is wrong, refuses to
overwrite its output. """
import json
import os
import subprocess
import sys

import pytest
import torch

from dgmn_timm.models import dgmn2
from dgmn_timm.tools import check
from dgmn_timm.tools.cli import run_cli


def test_command_writes_json_and_passes(tmp_path):
    """ The command as a user runs it: exit 0, the op's errors against the oracle in the JSON, the timing. """
    out = tmp_path / 'check.json'
    proc = subprocess.run([sys.executable, '-m', 'dgmn_timm.check', '--device', 'cpu', '--threads', '1',
                           '--output', str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'all checks passed' in proc.stdout and 'kernel: gather' in proc.stdout
    report = json.loads(out.read_text())
    assert report['ok'] is True
    assert set(report['versions']) >= {'python', 'torch', 'timm', 'torchvision', 'triton'}
    assert report['devices']['cpu']['kernel'] == 'gather'
    errs = [(r['check'], k, v) for r in report['checks'] for k, v in r.items() if 'err' in k]
    assert len(errs) > 50 and all(r['dtype'] == 'float32' for r in report['checks'])
    assert all(0 <= v < 1e-3 for _, _, v in errs), max(errs, key=lambda e: e[2])
    names = ' '.join(r['check'] for r in report['checks'])
    for part in ('op fused', 'op portable', 'position released', 'position clean', 'RepGraph call', 'K=4',
                 'DGMN2 layer fused', 'DGMN2 layer portable'):
        assert part in names
    keys = {k for r in report['checks'] for k in r}
    assert {'fwd_err', 'grad_qkv_err', 'grad_offset_err', 'grad_bias_err', 'grad_pos_h_err', 'grad_pos_w_err',
            'grad_x_err', 'grad_weights_err'} <= keys
    (timing,) = report['timing']
    for key in ('dgmn2_tiny_infer_s', 'pvt_v2_b1_infer_s', 'dgmn2_tiny_train_s', 'pvt_v2_b1_train_s',
                'infer_ratio', 'train_ratio', 'dgmn2_tiny_infer_peak_mb', 'pvt_v2_b1_train_peak_mb'):
        assert timing[key] > 0, key


def _scaled_grad(factor):
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g * factor
    return Scale.apply


@pytest.mark.parametrize('fault', ['output', 'offset gradient', 'raises'])
def test_wrong_op_fails(fault, tmp_path, monkeypatch, capsys):
    """ An op off by 1 % in its output, or in its offset gradient alone, or one that raises, fails the check:
    exit 1. """
    op = check.sampled_attention
    if fault == 'raises':
        def wrong(*args):
            raise RuntimeError('no kernel image is available for execution on the device')
    elif fault == 'output':
        def wrong(qkv, offset, *args):
            return op(qkv, offset, *args) * 1.01
    else:
        def wrong(qkv, offset, *args):
            return op(qkv, _scaled_grad(1.01)(offset), *args)
    monkeypatch.setattr(check, 'sampled_attention', wrong)
    monkeypatch.setattr(dgmn2, 'sampled_attention', wrong)  # the DGMN2 layer's call
    out = tmp_path / 'check.json'
    assert check.main(['--device', 'cpu', '--no-timing', '--output', str(out)]) == 1
    assert 'SOME CHECKS FAILED' in capsys.readouterr().out
    report = json.loads(out.read_text())
    failed = [r for r in report['checks'] if not r['ok']]
    assert not report['ok'] and failed
    assert all('fused' in r['check'] for r in failed)  # the portable path is still right
    assert any('DGMN2 layer fused' in r['check'] for r in failed)
    if fault == 'raises':
        assert all('no kernel image' in r['error'] for r in failed) and len(failed) == 9
    elif fault == 'output':
        assert all(r['fwd_err'] > r['tol'] for r in failed if 'far offsets' not in r['check'])
    else:  # the forward is right; the op's offset gradient, or the layer's weight gradients, are not
        assert all(r['fwd_err'] <= r['tol'] for r in failed)
        assert any(r.get('grad_offset_err', 0) > r['tol'] for r in failed)
        assert any(r.get('grad_weights_err', 0) > r['tol'] for r in failed)


def test_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / 'check.json'
    out.write_text('{}')
    assert run_cli(check.main, ['--device', 'cpu', '--output', str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith('error: ') and '--overwrite' in line
    assert out.read_text() == '{}'


def test_parser_defaults():
    args = check.build_parser().parse_args([])
    assert (args.device, args.output, args.threads, args.overwrite) == ('auto', None, None, False)
