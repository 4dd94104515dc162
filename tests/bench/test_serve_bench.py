"""The serve benchmark's arithmetic on planted timings (steady-state span, percentiles), its
table, and its refusals."""

import pytest

from turbo_core.bench import serve


def _req(t0, times, status=200):
    return {"t0": t0, "times": times, "status": status,
            "usage": {"prompt_tokens": 10, "completion_tokens": len(times)}}


def test_steady_state_counts_only_the_span_where_every_request_decodes():
    # request A: first token at 1.0, then every 0.5 s to 5.0; B: first at 3.0, to 6.0
    a = _req(0.0, [1.0 + 0.5 * k for k in range(9)])    # 1.0 .. 5.0
    b = _req(0.5, [3.0 + 0.5 * k for k in range(7)])    # 3.0 .. 6.0
    failed = _req(0.2, [], status=500)
    out = serve.summarize("x", {"requests": [a, b, failed], "max_running": 2, "kv_bytes_peak": 7})
    # span (3.0, 5.0]: A's tokens at 3.5, 4.0, 4.5, 5.0 and B's at 3.5 .. 5.0 (B's first excluded)
    assert out["steady_span_s"] == pytest.approx(2.0)
    assert out["decode_tokens_per_s"] == pytest.approx(8 / 2.0)
    assert out["aggregate_tokens_per_s"] == pytest.approx(16 / 6.0)
    assert out["ttft_p50_s"] in (1.0, 2.5) and out["ttft_p95_s"] == pytest.approx(2.5)
    assert out["itl_p50_s"] == pytest.approx(0.5) and out["errors"] == 1
    assert out["generated_tokens"] == 16 and out["max_running"] == 2


def test_no_overlap_means_no_steady_state_not_a_made_up_number():
    a, b = _req(0.0, [1.0, 1.5, 2.0]), _req(0.0, [3.0, 3.5])
    out = serve.summarize("x", {"requests": [a, b], "max_running": 1, "kv_bytes_peak": None})
    assert out["decode_tokens_per_s"] is None and out["steady_span_s"] == 0.0
    doc = {"scenarios": [{"scenario": "s", "results": [out]}]}
    assert "| s | x | n/a |" in serve.table(doc)


def test_full_run_needs_a_plan():
    with pytest.raises(ValueError, match="--plan"):
        serve.run(quick=False)
