"""The two cache levers only the reference path reads (``KVQuantConfig.reference_only``): the
per-channel first-level K scale and K stored before RoPE. Each raises the SQNR of attention
outputs against exact attention on the outliers it is meant for; the fused kernels refuse them
by name and the reference serves them; pre-RoPE storage round-trips RoPE exactly; the bytes
and the bit plans account for them."""

import logging

import pytest
import torch

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.functional import BACKEND_ENV, choose_backend, turbo_attention
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.packed import int8_rows
from turbo_core.attention.plan import Layout
from turbo_core.attention.quant import quantize_int8_channels
from turbo_core.attention.reference import attention_exact
from turbo_core.attention.rotation import apply_rope, undo_rope
from turbo_core.testing import assert_close, sqnr_db

B, H, G, D = 2, 3, 3, 64


def rope(positions):
    """Llama's default RoPE (base 10000) by position: cos, sin ``(L, D)``."""
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D)
    angles = positions.float()[:, None] * inv[None]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos(), both.sin()


def queries(lq=1, seed=1):
    return torch.randn(B, H * G, lq, D, generator=torch.Generator().manual_seed(seed))


def sqnr(cfg, bits, k, v, q, math_cfg=EXACT):
    store = QuantizedKVLayer([bits] * H, D, cfg, rope=rope)
    store.append(k, v)
    out = turbo_attention(q, None, None, kv_store=store, math_cfg=math_cfg).out
    return sqnr_db(attention_exact(q, k, v), out)


def test_per_channel_int8_is_within_half_a_step_of_every_channel():
    x = torch.randn(2, 64, D) * torch.logspace(-2, 2, D)  # channels 4 decades apart
    values, scale = quantize_int8_channels(x, qmax=119)
    assert scale.shape == (2, D) and int(values.abs().max()) <= 119
    assert bool(((values.float() * scale[:, None] - x).abs() <= scale[:, None] / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="float"):
        quantize_int8_channels(torch.zeros(4, 4, dtype=torch.int8))


@pytest.mark.parametrize(("bits", "gain_db"), [(8, 0.8), (4, 0.5), (2, 0.5)])
def test_per_channel_k_scale_raises_sqnr_on_a_large_outlier_channel(bits, gain_db):
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, H, 320, D, generator=gen) for _ in range(2))
    k[..., 5] *= 50  # one channel 50x the others takes a per-(chunk, head) scale's levels
    k[..., 17] += 8
    plain = sqnr(KVQuantConfig(), bits, k, v, queries())
    channel = sqnr(KVQuantConfig(k_channel_scale=True), bits, k, v, queries())
    assert channel >= plain + gain_db, (plain, channel)


def pre_rope_keys(length=320, seed=0):
    """K whose outlier channels are steady before RoPE (as in LLMs, KVQuant §3.2): RoPE turns
    each into a pair oscillating along the tokens, so every per-channel group spans it."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, length, D, generator=gen) for _ in range(2))
    k[..., 3] += 10  # offset channels, and one scaled, all steady along the tokens
    k[..., 40] -= 6
    k[..., 20] *= 5
    cos, sin = rope(torch.arange(length))
    return apply_rope(k, cos, sin), v


@pytest.mark.parametrize(("bits", "rotate", "gain_db"), [(4, False, 0.8), (2, True, 2.0)])
def test_pre_rope_k_raises_sqnr_on_steady_outlier_channels(bits, rotate, gain_db):
    k, v = pre_rope_keys()
    plain = sqnr(KVQuantConfig(rotate=rotate), bits, k, v, queries())
    pre = sqnr(KVQuantConfig(rotate=rotate, pre_rope=True), bits, k, v, queries())
    assert pre >= plain + gain_db, (plain, pre)


def test_rope_round_trips_exactly_even_when_the_model_scales_it():
    k, _ = pre_rope_keys(100)
    cos, sin = rope(torch.arange(100))
    for a in (1.0, 1.3):  # YaRN-style attention scaling multiplies cos and sin
        assert_close(k, apply_rope(undo_rope(k, a * cos, a * sin), a * cos, a * sin), atol=1e-4)


@pytest.mark.parametrize("sinks", [0, 16])
@pytest.mark.parametrize("rotate", [False, True])
def test_pre_rope_store_reads_back_the_same_keys_as_quantizing_them_before_rope(rotate, sinks):
    """A pre_rope store holds what a plain store of the un-RoPE'd keys holds, and reads back
    those keys with RoPE re-applied, in token order (sinks included), to float rounding."""
    k, v = pre_rope_keys(200)
    cos, sin = rope(torch.arange(200))
    cfg = KVQuantConfig(rotate=rotate, sinks=sinks)
    pre = QuantizedKVLayer([4, 2, 8], D, KVQuantConfig(rotate=rotate, sinks=sinks, pre_rope=True),
                           rope=rope)
    plain = QuantizedKVLayer([4, 2, 8], D, cfg)
    for at in (0, 150, 199):  # a prefill, then decode steps: positions continue per sequence
        end = {0: 150, 150: 199, 199: 200}[at]
        pre.append(k[:, :, at:end], v[:, :, at:end])
        plain.append(undo_rope(k[:, :, at:end], cos[at:end], sin[at:end]), v[:, :, at:end])
    for seq in range(B):
        k_pre, v_pre = pre.keys_values(seq)
        k_plain, v_plain = plain.keys_values(seq)
        assert_close(apply_rope(k_plain, cos, sin), k_pre, atol=1e-4)
        assert_close(v_plain, v_pre, atol=1e-5)
    # and those keys are the input to the quantization error of the 8-bit head
    k8, _ = pre.keys_values(0)
    assert float((k8[2] - k[0, 2]).abs().max()) < 0.1 * float(k[0, 2].abs().max())


def test_the_kernels_refuse_the_reference_only_levers_by_name(monkeypatch, caplog):
    k, v = pre_rope_keys(130)
    q = queries(lq=2)
    for cfg in (KVQuantConfig(k_channel_scale=True), KVQuantConfig(pre_rope=True, rotate=True)):
        store = QuantizedKVLayer([4] * H, D, cfg, rope=rope)
        store.append(k, v, compress=False)
        monkeypatch.setenv(BACKEND_ENV, "cpu")
        backend, reason = choose_backend(q, None, None, kv_store=store, math_cfg=TURBO_DEFAULT)
        assert backend == "reference" and cfg.reference_only()[0] in reason
        with caplog.at_level(logging.WARNING):
            forced = turbo_attention(q, None, None, kv_store=store, math_cfg=TURBO_DEFAULT).out
        monkeypatch.setenv(BACKEND_ENV, "reference")
        assert_close(forced, turbo_attention(q, None, None, kv_store=store, math_cfg=TURBO_DEFAULT).out,
                     atol=0)
        exact = attention_exact(q, k, v, causal=True)
        assert sqnr_db(exact, forced) > 15.0  # INT4 pages + INT8 buffer + SAS: a sane output
    assert "no kernel for: cache lever" in caplog.text


def test_per_channel_scales_cost_their_bytes_and_have_no_int8_rows_form():
    sizes = {}
    for cfg in (KVQuantConfig(), KVQuantConfig(k_channel_scale=True)):
        store = QuantizedKVLayer([4, 2], D, cfg)
        store.append(*(torch.randn(1, 2, 130, D) for _ in range(2)))
        sizes[cfg.k_channel_scale] = (store.nbytes(), store.bytes_for(130))
        assert store.bytes_for(130) == store.nbytes()
    # two pages of two heads: D float32 scales per (page, head) instead of one
    assert sizes[True][0] - sizes[False][0] == 2 * 2 * (D - 1) * 4
    with pytest.raises(ValueError, match="float_rows"):
        int8_rows(store.view(), 0)


def test_pre_rope_without_the_models_rope_is_refused_and_the_plan_records_both_levers():
    with pytest.raises(ValueError, match="needs the model's RoPE"):
        QuantizedKVLayer([4], D, KVQuantConfig(pre_rope=True))
    store = QuantizedKVLayer([4], D, KVQuantConfig(pre_rope=True),
                             rope=lambda pos: tuple(t[:, : D // 2] for t in rope(pos)))
    with pytest.raises(ValueError, match="partial RoPE"):
        store.append(torch.randn(1, 1, 4, D), torch.randn(1, 1, 4, D))
    with pytest.raises(ValueError, match="pre_rope must be a bool"):
        KVQuantConfig(pre_rope=1)
    levers = KVQuantConfig(k_channel_scale=True, pre_rope=True).levers()
    assert Layout.of(levers).differences(levers) == []
    assert Layout().differences(levers) == ["k_channel_scale=False (cache: True)",
                                            "pre_rope=False (cache: True)"]
