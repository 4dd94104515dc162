"""``turbo bench attention`` rows for the article's other methods and its cross-over sweep, and
``turbo bench train``: what they write, and that the numbers mean what the tables say."""

import json

import pytest

from turbo_core.bench import train
from turbo_core.cli import main


def test_attention_rows_for_every_method_and_the_crossover(tmp_path):
    out = tmp_path / "a.json"
    cases = ["turbo-sas-lut4", "turbo-sas-4pieces", "turbo-top-p0.9", "turbo-sas-head-cutoffs",
             "turbo-favor+", "turbo-elu", "turbo-linformer-256"]
    args = ["bench", "attention", "--quick", "--batch", "2", "--seq", "48", "--embed", "64",
            "--repeats", "1", "--warmup", "0", "--crossover", "16,32", "--json", str(out)]
    assert main(args + [a for c in cases for a in ("--case", c)]) == 0
    doc = json.loads(out.read_text())
    by = {r["name"]: r for r in doc["results"]}
    assert list(by) == ["nn.MultiheadAttention", "sdpa", *cases]
    # the finer exponents are near exact; the structural layers are different layers
    for name in ("turbo-sas-lut4", "turbo-sas-4pieces"):
        assert by[name]["cosine_vs_mha"] > 0.999999 and by[name]["max_abs_error_vs_mha"] < 1e-4
    assert by["turbo-linformer-256"]["cosine_vs_mha"] < 0.99  # untrained projections
    assert all(by[n]["backend"] == "torch" for n in ("turbo-favor+", "turbo-elu", "turbo-linformer-256"))
    # adaptive sparsity reports per head: what it zeroed and what that cost against exact
    for name in ("turbo-top-p0.9", "turbo-sas-head-cutoffs"):
        rows = doc["per_head"][name]
        assert [r["head"] for r in rows] == [0, 1, 2, 3]
        assert all(0.0 <= r["zero_fraction"] <= 1.0 and r["rel_error"] >= 0 for r in rows)
    assert any(r["zero_fraction"] > 0 for r in doc["per_head"]["turbo-top-p0.9"])
    assert all(isinstance(r["cutoff"], int) for r in doc["per_head"]["turbo-sas-head-cutoffs"])
    cross = doc["crossover"]
    assert [r["seq"] for r in cross["rows"]] == [16, 32]
    for name, first in cross["first_win"].items():
        wins = [r["seq"] for r in cross["rows"] if r[f"{name}_ms"] < r["mha_ms"]]
        assert first == (wins[0] if wins else None)


def test_linformer_is_refused_in_a_causal_run():
    with pytest.raises(SystemExit):
        main(["bench", "attention", "--quick", "--causal", "--case", "turbo-linformer-256"])


def test_train_bench_learns_and_reports_each_option(tmp_path):
    setup = train.TrainSetup(steps=12, batch=4, seq=32, embed=32, heads=2, eval_batches=1)
    doc = train.run(setup, log=lambda m: None)
    rows = {r["option"]: r for r in doc["results"]}
    assert set(rows) == set(train.TRAINED) | set(train.APPLIED)
    for name in train.TRAINED:
        losses = rows[name]["losses"]
        assert len(losses) == 12 and losses[-1] < losses[0] < 6.0  # learns from ln 256 = 5.55
    # the approximations reuse the exact run's weights: the cubic SAS is within its error of it
    assert rows["sas (cubic)"]["held_out_loss"] == pytest.approx(rows["exact"]["held_out_loss"], abs=1e-3)
    assert len(rows["per-head cut-offs"]["cutoffs"]) == setup.layers
    assert "linformer" in doc["not_run"]
    png = train.plot(doc, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "held-out loss" in train.table(doc)


def test_sas_forms_table_counts_and_measures():
    from turbo_core.bench import sas_forms

    doc = sas_forms.run(degrees=(3,))
    rows = {(r["pieces"], r["lut_steps"]): r for r in doc["results"]}
    assert rows[(1, 1)]["kernels"] and not rows[(4, 1)]["kernels"]
    # the same sub-interval width gives the same polynomial error, whichever way it is cut
    assert rows[(4, 1)]["max_rel_error"] == pytest.approx(rows[(1, 4)]["max_rel_error"], rel=1e-6)
    assert rows[(1, 4)]["ops_per_weight"] < rows[(4, 1)]["ops_per_weight"]
    assert rows[(1, 2)]["vs_single"] == pytest.approx(
        rows[(1, 1)]["max_rel_error"] / rows[(1, 2)]["max_rel_error"])
    assert "ops/weight" in sas_forms.table(doc)
