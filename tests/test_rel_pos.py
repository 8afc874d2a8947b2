""" The relative-position term against a direct loop over its definition (docs/ARCHITECTURE.md, position term). """
import math

import pytest
import torch

from dgmn_timm.models.dgmn2 import rel_pos_logits

K = 9


def rel_pos_term(q, rel_height, rel_width, released=True):
    """ ``rel_pos_logits`` for channel-first queries (N, c, H, W) -> (N, K, H, W). """
    out = rel_pos_logits(q.permute(0, 2, 3, 1).unsqueeze(3), rel_height, rel_width, released)
    return out.squeeze(3).permute(0, 3, 1, 2)


def _linear_weights(n_in, n_out):
    """ Explicit 1-d resize matrix (n_out, n_in) of bilinear interpolation with align_corners=False. """
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        m[i, lo] += 1 - frac
        m[i, hi] += frac
    return m


def _resize_rows(table, rows):
    return _linear_weights(table.shape[0], rows) @ table


def _resize_image(img, out_h, out_w):
    """ img (..., h, w) -> (..., out_h, out_w), separable bilinear, align_corners=False. """
    mh = _linear_weights(img.shape[-2], out_h)
    mw = _linear_weights(img.shape[-1], out_w)
    return torch.einsum('ih,...hw,jw->...ij', mh, img, mw)


def reference_rel_pos(q, rel_height, rel_width, released=True):
    """ Loops over (y, x, m) with the spec's formulas. q: (N, c, H, W) -> (N, K, H, W). """
    q = q.double()
    N, c, H, W = q.shape
    th = _resize_rows(rel_height.double(), H + K - 1)
    tw = _resize_rows(rel_width.double(), W + K - 1)
    rw = torch.zeros(N, K, H, W, dtype=torch.float64)
    rh_t = torch.zeros(N, K, W, H, dtype=torch.float64)  # Rh'[x, y, m], channels first
    rh = torch.zeros(N, K, H, W, dtype=torch.float64)
    for y in range(H):
        for x in range(W):
            for m in range(K):
                rw[:, m, y, x] = q[:, :, y, x] @ tw[W - 1 - x + m]
                rh_t[:, m, x, y] = q[:, :, y, x] @ th[H - 1 - y + m]
                rh[:, m, y, x] = q[:, :, y, x] @ th[H - 1 - y + m]
    if released:
        # the (W, H, 9) array is resized as an image to (H, W) and added position by position
        rh = _resize_image(rh_t, H, W)
    return rw + rh


def _inputs(N, c, H, W, rows_h, rows_w, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, c, H, W, generator=g, dtype=torch.float64)
    rel_h = torch.randn(rows_h, c, generator=g, dtype=torch.float64)
    rel_w = torch.randn(rows_w, c, generator=g, dtype=torch.float64)
    return q, rel_h, rel_w


@pytest.mark.parametrize('H,W', [(1, 1), (7, 7), (5, 8), (8, 5), (3, 1), (14, 14)])
@pytest.mark.parametrize('released', [True, False])
def test_matches_spec_formulas(H, W, released):
    # tables sized for a 7x7 map (15 rows, stage 4 at 224): resized to H + 8 / W + 8 rows
    q, rel_h, rel_w = _inputs(3, 4, H, W, 15, 15, seed=H * 31 + W)
    out = rel_pos_term(q, rel_h, rel_w, released)
    ref = reference_rel_pos(q, rel_h, rel_w, released)
    assert out.shape == (3, K, H, W)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_float32():
    q, rel_h, rel_w = _inputs(2, 8, 6, 9, 22, 22, seed=4)
    out = rel_pos_term(q.float(), rel_h.float(), rel_w.float())
    torch.testing.assert_close(out.double(), reference_rel_pos(q, rel_h, rel_w), atol=1e-5, rtol=1e-5)


def test_square_map_quirk_is_transposed_query():
    """ For square maps the released height term at (y, x) is <q[x, y], rel_height[H - 1 - x + m]>. """
    H = W = 6
    q, rel_h, rel_w = _inputs(1, 4, H, W, H + 8, W + 8, seed=9)
    zero_w = torch.zeros_like(rel_w)
    out = rel_pos_term(q, rel_h, zero_w, True)
    for y in range(H):
        for x in range(W):
            for m in range(K):
                expected = q[0, :, x, y] @ rel_h[H - 1 - x + m]
                assert out[0, m, y, x].item() == pytest.approx(expected.item(), abs=1e-12)
    # and the clean variant really differs from it
    assert not torch.allclose(out, rel_pos_term(q, rel_h, zero_w, False))


def test_tables_at_native_size_are_not_resized():
    H, W = 7, 7
    q, rel_h, rel_w = _inputs(1, 2, H, W, H + 8, W + 8)
    out = rel_pos_term(q, torch.zeros_like(rel_h), rel_w, True)
    x, y, m = 2, 3, 5
    assert out[0, m, y, x].item() == pytest.approx((q[0, :, y, x] @ rel_w[W - 1 - x + m]).item(), abs=1e-12)
