"""Adaptive sparsity: top-p keeps exactly the mass asked for, per-head SAS cut-offs apply per
head, and the calibration picks larger cut-offs where the attention needs them."""

import math

import pytest
import torch

from turbo_core.attention import adaptive
from turbo_core.attention.config import AttentionMath, SASConfig
from turbo_core.attention.reference import attention_details, top_p_scores


def test_top_p_keeps_the_smallest_set_holding_the_mass():
    torch.manual_seed(0)
    s = torch.randn(3, 4, 7, 40, dtype=torch.float64) * 2
    for p in (0.3, 0.75, 0.95, 1.0):
        kept = torch.isfinite(top_p_scores(s, p))
        probs = torch.softmax(s, dim=-1)
        mass = (probs * kept).sum(-1)
        assert bool((mass >= p - 1e-12).all()), p  # at least the mass asked for
        # minimal: without its smallest kept key each row falls below p
        smallest = probs.masked_fill(~kept, math.inf).amin(-1)
        assert bool((mass - smallest < p).all()), p


def test_top_p_keeps_ties_and_handles_masked_rows():
    s = torch.tensor([[2.0, 1.0, 1.0, -math.inf], [-math.inf] * 4])
    out = top_p_scores(s, 0.5)
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]
    out = top_p_scores(s, 0.7)  # the two tied keys straddle the boundary: both stay
    assert torch.isfinite(out[0]).tolist() == [True, True, True, False]
    assert not torch.isfinite(out[1]).any()


def test_top_p_attention_matches_renormalised_softmax():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    out = attention_details(q, k, v, math_cfg=AttentionMath(top_p=0.8)).out
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(8)
    kept = torch.isfinite(top_p_scores(s, 0.8))
    probs = torch.softmax(s.masked_fill(~kept, -math.inf), dim=-1)
    torch.testing.assert_close(out, probs @ v, rtol=1e-12, atol=1e-12)


def test_head_cutoffs_apply_per_head():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 3, 20, 16, dtype=torch.float64) * 3 for _ in range(3))
    cuts = (0, 2, 8)
    per_head = attention_details(q, k, v, math_cfg=AttentionMath(sas=SASConfig(head_lut_max=cuts)))
    for h, t in enumerate(cuts):
        alone = attention_details(q, k, v, math_cfg=AttentionMath(sas=SASConfig(lut_max=t)))
        torch.testing.assert_close(per_head.out[:, h], alone.out[:, h], rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 query heads"):
        attention_details(q, k, v, math_cfg=AttentionMath(sas=SASConfig(head_lut_max=(1, 2))))


def test_calibration_gives_flat_heads_more_keys():
    torch.manual_seed(3)
    d = 16
    q = torch.randn(1, 2, 64, d, dtype=torch.float64)
    k = torch.randn(1, 2, 256, d, dtype=torch.float64)
    v = torch.randn(1, 2, 256, d, dtype=torch.float64)
    q[:, 0] *= 0.2  # head 0: flat attention (scores close together)
    q[:, 1] *= 4.0  # head 1: peaked
    report = adaptive.calibrate_cutoffs(q, k, v, tolerance=1e-3)
    cuts = report.cutoffs
    assert len(cuts) == 2 and all(isinstance(t, int) for t in cuts)
    # each head's dropped mass at its cut-off is within the tolerance, and not one step less
    for h, row in enumerate(report.heads):
        assert row["dropped_mass"] <= 1e-3
        assert cuts[h] == 0 or row["dropped_mass_one_less"] > 1e-3
    # the report's zeroed fraction and error are the attention's at those cut-offs
    res = attention_details(q, k, v, math_cfg=AttentionMath(sas=SASConfig(head_lut_max=cuts)))
    exact = attention_details(q, k, v).out
    for h, row in enumerate(report.heads):
        err = ((res.out[:, h] - exact[:, h]).norm() / exact[:, h].norm()).item()
        assert row["rel_error"] == pytest.approx(err, rel=1e-6)
    assert report.heads[0]["zero_fraction"] <= report.heads[1]["zero_fraction"]
