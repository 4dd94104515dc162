"""Sliding-window models through the serving engine's cache (``CacheRunner``), against the plain
model's own forward: tiny random Gemma-3 (sliding and full layers mixed), Qwen2 (sliding from a
layer on) and Mistral (every layer sliding) with GQA 2 and a window shorter than the sequences,
prompts in several chunk sizes, then batched decode steps of two sequences of other lengths.

Tolerances, measured on these models (logits of about ±1.2): the float cache is exact (1e-4);
the INT8 cache 0.06; INT4 0.4 with top-1 >= 0.75; mixed INT4/INT2 0.6 with top-1 >= 0.6. The
same caches with the window ignored are off by ~1.6 with top-1 ~0.13, which each bound refuses.
The kernel backends give the reference backend's logits to 0.02 and 40 dB SQNR.
"""

from pathlib import Path

import pytest
import torch
import transformers as tf

from turbo_core.attention import functional
from turbo_core.attention.config import EXACT
from turbo_core.attention.head_priority import make_plan
from turbo_core.attention.variants import get_variant
from turbo_core.hf.attention import enable
from turbo_core.hf.cache import TurboCache
from turbo_core.hf.calibrate import collect_kv
from turbo_core.hf.features import layer_windows
from turbo_core.hf.models import LoadedModel, shape_of
from turbo_core.hf.runner import CacheRunner
from turbo_core.testing import assert_close, assert_sqnr

WINDOW, VOCAB = 40, 300
COMMON = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=4096, sliding_window=WINDOW)
FAMILIES = {
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **COMMON, query_pre_attn_scalar=64,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, use_sliding_window=True,
                                                        max_window_layers=1)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON)),
}
WINDOWS = {"gemma3": (WINDOW, WINDOW, None), "qwen2": (None, WINDOW, WINDOW),
           "mistral": (WINDOW,) * 3}
# (max |logit error|, least top-1 agreement) against the plain forward, per variant
BOUNDS = {"fp16": (1e-4, 1.0), "sas": (0.03, 0.9), "int8": (0.06, 0.9),
          "turbo-int4": (0.4, 0.75), "turbo-mix": (0.6, 0.6)}
LENGTHS = (230, 173)  # two sequences, decoded together (ragged)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model = FAMILIES[request.param]().eval()
    lm = LoadedModel(model, None, f"tiny-{request.param}", Path("."),
                     shape_of(model.config, f"tiny-{request.param}"))
    return request.param, lm


def _plan(lm, variant):
    if not variant.needs_calibration:
        return None
    ids = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(9))
    keys, values = collect_kv(lm, ids, 256, progress=False)
    return make_plan(lm.shape, keys, values, int2_fraction=variant.int2_fraction,
                     scope=variant.scope, default_bits=variant.kv_bits, layout=variant.kv.levers())


def run_engine(lm, variant_name, piece):
    """Logits at the end of every prompt piece and at each of 6 batched decode steps, with the
    plain forward's logits at the same positions."""
    variant = get_variant(variant_name)
    runner = CacheRunner(lm, variant, _plan(lm, variant), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, VOCAB, (n + 6,), generator=gen) for n in LENGTHS]
    cache = runner.new_cache()
    seqs = [cache.add_sequence() for _ in LENGTHS]
    got, where = [], []
    for s, (seq_ids, n) in enumerate(zip(ids, LENGTHS, strict=True)):
        for start in range(0, n, piece):
            stop = min(n, start + piece)
            got.append(runner.forward(cache, [seqs[s]], [seq_ids[start:stop].tolist()], [start]))
            where.append((s, stop - 1))
    for step in range(6):
        at = [n + step for n in LENGTHS]
        got.append(runner.forward(cache, seqs, [[int(x[p])] for x, p in zip(ids, at, strict=True)], at))
        where += [(0, at[0]), (1, at[1])]
    model = lm.model
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        plain = [model(x[None]).logits[0] for x in ids]
    return torch.cat(got), torch.stack([plain[s][p] for s, p in where]), cache


def test_each_layer_knows_the_window_transformers_gives_it(family):
    name, lm = family
    assert layer_windows(lm.model.config) == WINDOWS[name]
    cache = TurboCache.for_model(lm.model, lm.shape, 4)
    assert cache.windows == WINDOWS[name]
    assert [layer.is_sliding for layer in cache.layers] == [w is not None for w in WINDOWS[name]]


@pytest.mark.parametrize("piece", [17, 64, 250])
@pytest.mark.parametrize("variant", list(BOUNDS))
def test_engine_over_a_sliding_window_model_matches_the_plain_forward(family, variant, piece):
    _, lm = family
    got, want, cache = run_engine(lm, variant, piece)
    err, top1 = BOUNDS[variant]
    if variant == "fp16":
        assert_close(want, got, atol=err)
    else:
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        gap = (got - want).abs().max().item()
        assert gap <= err and agree >= top1, (variant, gap, agree)
    # the local layers hold about a window, the global ones (if any) every token
    held = [layer.store.nbytes() for layer in cache.layers]
    windows = WINDOWS[family[0]]
    if None in windows and variant == "fp16":
        assert max(held[i] for i, w in enumerate(windows) if w) < min(
            held[i] for i, w in enumerate(windows) if w is None) / 3


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_backend_gives_the_reference_backends_logits(family, backend, monkeypatch):
    _, lm = family
    monkeypatch.setenv(functional.BACKEND_ENV, "reference")
    ref, _, _ = run_engine(lm, "turbo-int4", 50)
    monkeypatch.setenv(functional.BACKEND_ENV, backend)
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    got, _, _ = run_engine(lm, "turbo-int4", 50)
    # the kernels' SAS runs on per-split running maxima (6e-3 per attention output, as their
    # own tests bound it), compounded over three layers
    assert_close(ref, got, atol=0.02)
    assert_sqnr(ref, got, at_least_db=40.0)


def test_a_padded_batch_over_a_windowed_cache_matches_the_plain_forward(family):
    """transformers' padding mask reaches the cache readers by token position."""
    _, lm = family
    model = lm.model
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 120), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :30] = 0  # left padding
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        enable(model, EXACT)
        for bits in (None, 8):
            cache = TurboCache.for_model(model, lm.shape, bits)
            got = model(ids, attention_mask=mask, cache=cache).logits
            keep = mask.bool()
            assert_close(want[keep], got[keep], atol=1e-4 if bits is None else 0.06)


def test_a_cache_without_the_models_windows_is_refused(family):
    _, lm = family
    model = lm.model
    enable(model, EXACT)
    with torch.no_grad(), pytest.raises(ValueError, match="sliding window of 40 but its TurboCache"):
        model(torch.zeros(1, 8, dtype=torch.long), cache=TurboCache(lm.shape, 4))


@pytest.mark.parametrize("make,named", [
    (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**COMMON, attn_logit_softcapping=50.0)),
     "soft-capping"),
    (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**COMMON, use_bidirectional_attention=True)),
     "non-causal"),
])
def test_attention_features_the_turbo_path_lacks_are_refused_when_applied(make, named):
    model = make().eval()
    with pytest.raises(ValueError, match=named):
        enable(model, EXACT)


def test_generate_with_left_padding_over_a_windowed_cache_is_transformers_own(family):
    """``generate`` (left padding, 30 new tokens past the window) over the windowed float
    TurboCache picks the very tokens transformers' own generate picks."""
    _, lm = family
    model = lm.model
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (2, 60), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    args = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model.generate(ids, **args)
        enable(model, EXACT)
        got = model.generate(ids, **args, cache=TurboCache.for_model(model, lm.shape, None))
    assert torch.equal(want, got)
