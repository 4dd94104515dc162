"""transformers integration on tiny random models: attention interface and the packed cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.plan import ModelShape
from turbo_core.hf.attention import attention_modules, enable, reset_counters, sas_zero_fraction
from turbo_core.hf.cache import TurboCache
from turbo_core.hf.models import shape_of
from turbo_core.testing import assert_close, assert_cosine


def padded_batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gemma"])
def test_exact_turbo_attention_matches_sdpa(tmp_path, tiny_factory, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory(tmp_path / family, family)).eval()
    ids, mask = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        enable(model, EXACT)
        out = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close(ref[keep], out[keep], atol=1e-4)
    with torch.no_grad():
        enable(model, TURBO_DEFAULT)
        approx = model(ids, attention_mask=mask).logits
    assert_cosine(ref[keep], approx[keep], at_least=0.999)


def _model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def test_turbo_cache_feeds_forward_and_generate(tiny_dir):
    model = _model(tiny_dir)
    shape = shape_of(model.config, "tiny")
    ids, mask = padded_batch(model.config.vocab_size, seed=1)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, cache=DynamicCache(config=model.config)).logits
        enable(model, EXACT)
        cache = TurboCache(shape, 8, KVQuantConfig(chunk=16, k_group=16))
        out = model(ids, attention_mask=mask, cache=cache).logits
        assert cache.get_seq_length() == 24
        assert_cosine(ref[mask.bool()], out[mask.bool()], at_least=0.9999)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, pad_token_id=0,
                             cache=TurboCache(shape, 4, KVQuantConfig(chunk=16, k_group=16)))
        # every generated token is (within the INT4 cache's error) the exact model's greedy
        # choice given what came before: re-scored by one exact forward over the whole output
        full_mask = torch.cat([mask, torch.ones(2, 20, dtype=mask.dtype)], dim=1)
        model.set_attn_implementation("sdpa")
        exact = model(gen, attention_mask=full_mask, use_cache=False).logits[:, 23:-1]
    chosen = exact.gather(-1, gen[:, 24:, None])[..., 0]
    gap = exact.max(-1).values - chosen  # 0 where the exact model picks the same token
    assert gen.shape == (2, 44) and float(gap.max()) < 0.05, gap
    assert float((gap == 0).float().mean()) >= 0.7, gap  # the tiny random model has near-ties


def test_cache_holds_packed_bytes_that_shrink(tiny_dir):
    model = _model(tiny_dir)
    shape = shape_of(model.config, "tiny")
    enable(model, TURBO_DEFAULT)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(2))
    fp16 = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2 * 512
    sizes = {}
    with torch.no_grad():
        for bits in (8, 4, 2):
            cache = TurboCache(shape, bits)
            for s in range(0, 512, 64):
                model(ids[:, s:s + 64], cache=cache)
            assert cache.layers[0].store.buffered == 64  # compressed on the next update ...
            cache.flush()  # ... or now, to measure the state at rest
            assert cache.layers[0].store.buffered == 0
            sizes[bits] = cache.nbytes()
            held = cache.layers[0].store.tensors()
            assert any(t.dtype == torch.uint8 for t in held)
    assert fp16 / sizes[4] >= 3.5 and fp16 / sizes[2] >= 6.5 and sizes[8] < fp16, (fp16, sizes)


def test_sas_zero_fraction_is_counted(tiny_dir):
    model = _model(tiny_dir)
    from turbo_core.attention.config import AttentionMath, SASConfig

    enable(model, AttentionMath(sas=SASConfig(lut_max=1)))
    for m in attention_modules(model):  # random init gives flat attention: sharpen it
        m.q_proj.weight.data *= 200.0
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
    frac = sas_zero_fraction(model)
    assert 0.0 < frac < 1.0
    reset_counters(model)
    assert sas_zero_fraction(model) == 0.0


def test_cache_refuses_misuse(tiny_dir):
    from turbo_core.attention.head_priority import make_plan

    other = ModelShape(name="other", num_layers=3, num_kv_heads=2, head_dim=64)
    acts = [torch.randn(2, 32, 64) for _ in range(3)]
    plan = make_plan(other, acts, acts, int2_count_=1)
    model = _model(tiny_dir)
    with pytest.raises(ValueError, match="bit plan is for model 'other'"):
        TurboCache(shape_of(model.config, "tiny"), plan)
    cache = TurboCache(shape_of(model.config, "tiny"), 4)
    with pytest.raises(ValueError, match="beam search"):
        cache.layers[0].reorder_cache(torch.tensor([0]))
    with pytest.raises(ValueError, match="not supported"):
        attention_modules(torch.nn.Linear(2, 2))
    # TurboCache hands out handles, not the history: another attention must not read them
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, model.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    cache = TurboCache(shape_of(model.config, "tiny"), 4)
    with torch.no_grad(), pytest.raises(ValueError, match="other than 'turbo'"):
        model(ids, cache=cache)  # sdpa reads the handles (wrong), the next step refuses
        model(ids[:, :1], cache=cache)
