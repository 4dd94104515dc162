"""``turbo bench agreement`` on a tiny Gemma-3-style model whose sliding window (32 tokens) is
shorter than the prompt: the float cache gives the plain forward's logits, the INT8 cache its
quantization error only (0.06 on logits of about ±1, measured), and the CLI writes the report."""

import json

from turbo_core.bench import agreement
from turbo_core.cli import main


def test_engine_logits_match_the_plain_forward_past_the_window(tmp_path, tiny_factory):
    model = tiny_factory(tmp_path / "g3", "gemma3")
    doc = agreement.run(model=str(model), variants=("fp16", "int8"), prompt=150, chunk=64, decode=4)
    rows = {r["variant"]: r for r in doc["results"]}
    assert doc["sliding_windows"] == [32, None]
    assert rows["fp16"]["positions"] == 3 + 4  # three prompt chunks, four decode steps
    assert rows["fp16"]["max_logit_diff"] < 1e-4 and rows["fp16"]["top1_agreement"] == 1.0
    assert rows["int8"]["max_logit_diff"] < 0.06, rows["int8"]
    out = tmp_path / "agreement.json"
    md = tmp_path / "agreement.md"
    assert main(["bench", "agreement", "--model", str(model), "--variants", "fp16",
                 "--prompt", "100", "--chunk", "40", "--decode", "2", "--json", str(out),
                 "--markdown", str(md)]) == 0
    assert json.loads(out.read_text())["results"][0]["max_logit_diff"] < 1e-4
    assert "sliding windows: [32]" in md.read_text()
