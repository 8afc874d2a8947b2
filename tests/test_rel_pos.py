""" The relative-position term against a direct loop over its definition (docs/ARCHITECTURE.md, position term). """
import pytest
import torch

from dgmn_timm.models.dgmn2 import rel_pos_logits
from dgmn_timm.ops.reference import rel_pos_reference
from dgmn_timm.ops.sampling import NUM_NODES as K


def rel_pos_term(q, rel_height, rel_width, released=True):
    """ ``rel_pos_logits`` for channel-first queries (N, c, H, W) -> (N, K, H, W). """
    out = rel_pos_logits(q.permute(0, 2, 3, 1).unsqueeze(3), rel_height, rel_width, released)
    return out.squeeze(3).permute(0, 3, 1, 2)


def reference_rel_pos(q, rel_height, rel_width, released=True):
    """ The float64 oracle (loops over (y, x, m), explicit resize matrices) for channel-first queries
    (N, c, H, W) -> (N, K, H, W). """
    out = rel_pos_reference(q.permute(0, 2, 3, 1).unsqueeze(3), rel_height, rel_width, released)
    return out.squeeze(3).permute(0, 3, 1, 2)


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
