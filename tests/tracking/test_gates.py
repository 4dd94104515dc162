"""Gates as data: absolute and champion-relative bounds, missing metrics fail."""

import math

import pytest

from turbo_core.pipeline.params import default_gates
from turbo_core.tracking.gates import Gate, GateSet


def test_absolute_bounds_in_both_directions():
    gates = GateSet((Gate("ppl_delta_pct", threshold=2.0, greater_is_better=False),
                     Gate("kv_compression", threshold=3.5)))
    ok = gates.evaluate({"ppl_delta_pct": 1.55, "kv_compression": 3.76})
    assert ok.passed and ok.reasons == ()
    bad = gates.evaluate({"ppl_delta_pct": 2.5, "kv_compression": 3.2})
    assert not bad.passed
    assert bad.reasons == ("ppl_delta_pct = 2.5, needs <= 2 (misses by 0.5)",
                           "kv_compression = 3.2, needs >= 3.5 (misses by 0.3)")


def test_missing_or_nan_metric_fails():
    d = default_gates().evaluate({"ppl_delta_pct": math.nan, "kv_compression": 4.0})
    assert not d.passed
    assert any("ppl_delta_pct: missing or not a finite number" in r for r in d.reasons)
    assert any("top1_agreement: missing" in r for r in d.reasons)


def test_relative_to_champion():
    gate = GateSet((Gate("kv_compression", min_relative_change=0.05),
                    Gate("ppl_delta_pct", min_absolute_change=-0.5, greater_is_better=False)))
    champion = {"kv_compression": 3.76, "ppl_delta_pct": 1.55}
    assert gate.evaluate({"kv_compression": 4.48, "ppl_delta_pct": 1.9}, champion).passed
    worse = gate.evaluate({"kv_compression": 3.8, "ppl_delta_pct": 2.2}, champion)
    assert not worse.passed and worse.compared_to_champion
    assert "kv_compression changes by +1.06% vs champion" in worse.reasons[0]
    assert "ppl_delta_pct changes by -0.65" in worse.reasons[1]
    # no champion yet: relative bounds cannot apply, absolute ones still do
    assert gate.evaluate({"kv_compression": 1.0, "ppl_delta_pct": 50.0}, None).passed
    assert not gate.evaluate({"kv_compression": 4.0, "ppl_delta_pct": 1.0}, {"x": 1}).passed


def test_markdown_report_and_bad_gates():
    d = default_gates().evaluate({"ppl_delta_pct": 9.0, "top1_agreement": 0.9, "kv_compression": 4})
    md = d.markdown("turbo-mix", {"ppl_delta_pct": 9.0, "top1_agreement": 0.9})
    assert md.startswith("# Gate report: turbo-mix — FAILED") and "| ppl_delta_pct | 9 | <= 8.0 |" in md
    with pytest.raises(ValueError, match="bounds nothing"):
        Gate("x")
    with pytest.raises(ValueError, match="finite"):
        Gate("x", threshold=math.inf)


def test_default_gates_state_the_promise():
    """Not slower than the float baseline, little drift, and nothing the baseline recalls
    shown to be forgotten: the recall gate reads the 95 % upper bound over the prompts, so one
    prompt that flips passes and half of them lost fails, with the share and count beside it."""
    from turbo_core.hf.retrieval import kept

    def recall(base: list[bool], mine: list[bool]) -> dict:
        return kept({"samples": [{"correct": c} for c in base]},
                    {"samples": [{"correct": c} for c in mine]})

    good = {"ppl_delta_pct": 1.9, "top1_agreement": 0.93, "kv_compression": 3.8, "kl_mean": 0.02,
            "decode_speedup": 1.02, "prefill_speedup": 0.6, "retrieval_accuracy": 0.7,
            **recall([True] * 6 + [False] * 2, [True] * 6 + [False, True])}
    assert good["retrieval_kept"] == 1.0 and good["retrieval_known"] == 6
    assert default_gates().evaluate(good).passed
    slow = default_gates().evaluate(good | {"decode_speedup": 0.41})
    assert slow.reasons == ("decode_speedup = 0.41, needs >= 1 (misses by 0.59)",)
    one_flip = recall([True] * 6 + [False] * 2, [True] * 5 + [False] * 3)
    assert one_flip["retrieval_kept"] == pytest.approx(5 / 6)
    assert default_gates().evaluate(good | one_flip).passed  # 0.99: one prompt shows nothing
    # exact: P(X <= 3 | n=6, p) = 0.05 solved for p, the Clopper–Pearson one-sided bound
    half = recall([True] * 6 + [False] * 2, [True] * 3 + [False] * 5)
    p = half["retrieval_kept_upper"]
    assert sum(math.comb(6, i) * p**i * (1 - p) ** (6 - i) for i in range(4)) == pytest.approx(0.05)
    forgets = default_gates().evaluate(good | half | {"kl_mean": 0.3})
    assert forgets.reasons == ("kl_mean = 0.3, needs <= 0.1 (misses by 0.2)",
                               f"retrieval_kept_upper = {p:.6g}, needs >= 0.9 (misses by "
                               f"{0.9 - p:.3g}; retrieval_kept = 0.5; retrieval_known = 6)")
