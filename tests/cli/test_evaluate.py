"""Calibration and evaluation end to end on a tiny model, through the CLI."""

import json
import math

import pytest
import small
import torch

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import get_variant
from turbo_core.cli import main
from turbo_core.hf import calibrate, data, evaluate, models

SMALL = small.EVAL


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return models.load(tiny_dir)


def test_calibration_is_deterministic_and_valid(lm):
    v = get_variant("turbo-mix")
    a = calibrate.calibrate(lm, v, max_tokens=512, progress=False)
    b = calibrate.calibrate(lm, v, max_tokens=512, progress=False)
    assert a == b
    assert a.selection.int2_heads == round(v.int2_fraction * 4)
    assert a.calibration["tokens"] == 512 and a.calibration["data_sha256"]
    a.check_compatible(lm.shape)
    int4 = calibrate.calibrate(lm, get_variant("turbo-int4"), max_tokens=256, progress=False)
    assert {b for row in int4.bits_grid() for b in row} == {4}
    fp = calibrate.calibrate(lm, get_variant("fp16"), max_tokens=256, progress=False)
    assert {b for row in fp.bits_grid() for b in row} == {16}


def test_a_rotated_cache_gets_the_plain_ranking_and_records_its_layout(lm):
    import dataclasses

    v = get_variant("turbo-mix")
    off = v.with_overrides(kv=dataclasses.replace(v.kv, rotate=False, sinks=0))
    on = v.with_overrides(kv=dataclasses.replace(v.kv, rotate=True, sinks=16))
    plain, rotated = (calibrate.calibrate(lm, x, max_tokens=256, progress=False) for x in (off, on))
    assert plain.bits_grid() == rotated.bits_grid()  # heads ranked on the plain K/V
    assert (plain.layout.rotate, rotated.layout.rotate, rotated.layout.sinks) == (False, True, 16)


def test_baseline_variant_reproduces_the_baseline(lm):
    r = evaluate.evaluate(lm, get_variant("fp16"), data.load_split(), settings=SMALL, progress=False)
    assert abs(r["ppl_delta_pct"]) < 1e-3 and r["top1_agreement"] == 1.0
    # measured from transformers' cache of the float32 tiny model: 4 bytes a value, fp16 has 2
    assert r["kv_compression"] == r["kv_compression_ragged"] == 0.5 and r["eval_tokens"] == 254
    # the float engine against itself: no drift, the same answers to every retrieval prompt
    assert r["kl_mean"] < 1e-9 and r["kl_p99"] < 1e-9
    mine, base = (r["retrieval"][k]["samples"] for k in ("variant", "baseline"))
    assert [x["output"] for x in mine] == [x["output"] for x in base] and r["retrieval_kept"] == 1.0
    assert len(mine) == 2 and {x["task"] for x in mine} == {"passkey", "multikey"}
    assert r["speed_context"] == 64 and r["speed_batch"] == 2 and r["decode_speedup"] > 0


def test_kv_bytes_are_the_layouts_at_the_window_and_half_a_chunk_short_of_it(lm):
    """The measured compression equals what the layout says, from its definition: tokens past
    the 16 sinks fill pages of 64 (INT4 codes, one byte each of scale and offset per group of
    64, two float32 first-level scales), the sinks and the tail are INT8 rows with a float32
    scale; fp16 holds 2 bytes per value."""
    settings = evaluate.EvalSettings(max_tokens=256, window=128, speed=None, retrieval=None)
    r = evaluate.evaluate(lm, get_variant("turbo-int4"), data.load_split(), settings=settings,
                          progress=False)
    s = lm.shape
    page = 2 * (s.head_dim * 64 // 2) + 2 * 2 * s.head_dim + 2 * 4  # K + V codes, groups, firsts
    row = 2 * (s.head_dim + 4)  # K and V INT8 rows with their scales

    def expected(tokens):
        pages = (tokens - 16) // 64
        held = s.num_layers * s.num_kv_heads * (pages * page + (tokens - 64 * pages) * row)
        return 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2 * tokens / held

    assert r["kv_ragged_context_tokens"] == 96
    assert r["kv_compression"] == pytest.approx(expected(128), rel=1e-12)
    assert r["kv_compression_ragged"] == pytest.approx(expected(96), rel=1e-12)


def test_quantized_variant_metrics(lm):
    split = data.load_split()
    v = get_variant("turbo-mix")
    plan = calibrate.calibrate(lm, v, max_tokens=256, progress=False)
    r = evaluate.evaluate(lm, v, split, plan=plan, settings=SMALL, progress=False)
    # the baseline's perplexity, recomputed here from the model's logits on the same windows
    ids = calibrate.token_ids(lm.tokenizer, split.evaluation)
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in evaluate.eval_windows(ids, SMALL):
            logits = lm.model(w.unsqueeze(0), use_cache=False).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits.double(), w[1:], reduction="sum"))
            n += w.numel() - 1
    assert r["eval_tokens"] == n and r["ppl_baseline"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert r["ppl_delta_pct"] == pytest.approx(100 * (r["ppl_variant"] / r["ppl_baseline"] - 1))
    assert r["model"] == lm.name and r["variant"] == "turbo-mix" and r["data_sha256"] == split.sha256
    # 128 tokens: the 16 sinks shift the 64-token grid, one page + 64 INT8 rows per head
    assert r["kv_compression"] > 2.5 and 0.0 <= r["top1_agreement"] <= 1.0
    assert r["int2_heads"] == plan.selection.int2_heads and r["prefill_tokens_per_s"] > 0
    assert 0 < r["kl_mean"] <= r["kl_p99"] and r["decode_tokens_per_s_baseline"] > 0
    for backend in ("quanto", "hqq"):
        peer = evaluate.evaluate_peer(lm, backend, 4, split, settings=SMALL, progress=False)
        assert peer["variant"] == f"hf-{backend}-int4" and peer["kv_compression"] > 1.5
        assert peer["kl_mean"] > 0 and peer["decode_speedup"] > 0 and "retrieval_kept" in peer


def test_cli_calibrate_then_evaluate(tmp_path, tiny_dir, capsys):
    plan_path, out = tmp_path / "plan.json", tmp_path / "eval.json"
    assert main(["calibrate", "--model", str(tiny_dir), "--variant", "turbo-mix",
                 "--out", str(plan_path), "--max-tokens", "256"]) == 0
    BitPlan.load(plan_path)
    assert main(["evaluate", "--model", str(tiny_dir), "--variant", "turbo-mix", "--plan",
                 str(plan_path), *small.EVAL_ARGS, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["variant"] == "turbo-mix" and doc["int2_heads"] == round(
        get_variant("turbo-mix").int2_fraction * 4)  # of the tiny model's 4 KV heads
    assert "turbo-mix" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tiny_dir), "--variant", "turbo-mix", "--int2-scope",
                 "random", *small.EVAL_ARGS, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["int2_scope"] == "random"


def test_cli_bad_input_leaves_no_output(tmp_path, tiny_dir, tiny_factory, capsys):
    out = tmp_path / "eval.json"
    cases = [
        (["evaluate", "--model", str(tmp_path / "missing"), "--variant", "turbo-int4"],
         "not a local directory"),
        (["evaluate", "--model", str(tiny_dir), "--variant", "turbo-int4", "--max-tokens",
          "10000000"], "held-out text has"),
        (["evaluate", "--model", str(tiny_dir), "--variant", "nope"], "unknown variant"),
    ]
    other = tiny_factory(tmp_path / "other", "qwen2")
    plan_path = tmp_path / "other-plan.json"
    assert main(["calibrate", "--model", str(other), "--variant", "turbo-mix", "--out",
                 str(plan_path), "--max-tokens", "256"]) == 0
    cases.append((["evaluate", "--model", str(tiny_dir), "--variant", "turbo-mix", "--plan",
                   str(plan_path), "--max-tokens", "256", "--window", "128"], "bit plan is for model"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--json", str(out)])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "other-plan.json"]


def test_a_result_without_speed_prints_that_it_was_not_measured(capsys):
    from turbo_core.cli.evaluate import _print_result

    _print_result({"variant": "turbo-int4", "ppl_delta_pct": 0.05, "kv_compression": 3.54})
    out = capsys.readouterr().out
    assert "turbo-int4" in out and out.rstrip().endswith("speed: not measured in this run")
