"""The model report's rendering: every gate metric as a column, the measurement sizes in the
heading, and the two PNGs (from a report's JSON, as `--replot` does)."""

import json

from turbo_core.bench import model
from turbo_core.cli import main


def _row(name, **m):
    base = {"variant": name, "int2_scope": None, "ppl_variant": 14.0, "ppl_baseline": 14.0,
            "ppl_delta_pct": 0.0, "top1_agreement": 1.0, "kv_bytes_per_token": 23040.0,
            "kv_compression": 1.0, "kl_mean": 0.0, "kl_p99": 0.0, "sas_zero_fraction": 0.0,
            "prefill_speedup": 1.0, "decode_speedup": 1.0, "decode_tokens_per_s": 39.0,
            "retrieval_accuracy": 0.75, "retrieval_accuracy_baseline": 0.75, "retrieval_kept": 1.0}
    return base | m


DOC = {"model": "SmolLM2-135M-Instruct", "data_source": "stdlib", "device": {"type": "cpu"},
       "settings": {"max_tokens": 8192, "window": 1024,
                    "speed": {"context": 1024, "batch": 4, "repeats": 5},
                    "retrieval": {"lengths": [1024, 8192], "samples": 1}},
       "results": [_row("fp16"),
                   _row("turbo-int4", ppl_delta_pct=1.9, kl_mean=0.021, kl_p99=0.31,
                        kv_bytes_per_token=6131.0, decode_speedup=0.88, retrieval_kept=0.67),
                   _row("turbo-mix", int2_scope="random", kv_bytes_per_token=5139.0)]}


def test_table_has_every_gate_metric_and_the_sizes():
    text = model.table(DOC, "github")
    for col in ("KL mean", "KL p99", "prefill x", "decode x", "recall", "recall kept"):
        assert col in text
    assert "| turbo-int4 " in text and "0.0210" in text and "0.88" in text and "0.67" in text
    assert "1024 tokens of context, decode batch 4, median of 5" in text
    assert "1024, 8192 tokens, 1 prompts per task and length" in text and "recalls 0.75" in text


def test_replot_writes_table_and_pngs_from_json(tmp_path):
    src, md = tmp_path / "model.json", tmp_path / "model.md"
    src.write_text(json.dumps(DOC))
    assert main(["bench", "model", "--replot", str(src), "--markdown", str(md),
                 "--plots", str(tmp_path / "img")]) == 0
    assert "recall kept" in md.read_text()
    for kind in ("accuracy", "speed"):
        png = tmp_path / "img" / f"model-smollm2-135m-instruct-{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
