"""Sliding-window layers over the packed and float stores: what is held, where each row sits,
what the reference reads, and what a sequence costs.

Every test uses a window shorter than its sequences, so the window binds."""

import pytest
import torch

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.floatcache import FloatKVLayer
from turbo_core.attention.functional import turbo_attention
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.packed import float_rows, positions
from turbo_core.attention.reference import decode_attention_reference
from turbo_core.testing import assert_close, grow

D = 64
CFG = KVQuantConfig(chunk=16, k_group=16, v_group=16)
SINKS = KVQuantConfig(chunk=16, k_group=16, v_group=16, sinks=4)


def tagged(n, heads=2):
    """K row ``t`` is one-hot at channel ``t % D``, V row ``t`` at ``t // D``: both survive
    quantization (a group of zeros and one value) and name the token they came from."""
    k, v = torch.zeros(heads, n, D), torch.zeros(heads, n, D)
    t = torch.arange(n)
    k[:, t, t % D] = 3.0
    v[:, t, t // D] = 3.0
    return k, v


@pytest.mark.parametrize("cfg", [CFG, SINKS], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("window", [5, 16, 40])
@pytest.mark.parametrize("pieces", [1, 7, 50])
def test_held_rows_are_the_tokens_positions_says_and_all_the_window_needs(cfg, window, pieces):
    store = QuantizedKVLayer([8, 4], D, cfg, window=window)
    n = 230
    (s,) = grow(store, [tagged(n)], pieces)
    view = store.view([s])
    k, v = float_rows(view, 0)
    tokens = k[0].argmax(-1) + D * v[0].argmax(-1)  # head 0 at INT8, head 1 at INT4
    assert torch.equal(tokens, positions(view, 0))
    assert torch.equal(k[1].argmax(-1) + D * v[1].argmax(-1), tokens)
    held = set(tokens.tolist())
    # the newest token (position n - 1) sees n - window ... n - 1: all held
    assert set(range(n - window, n)) <= held
    # released: whole pages that end before the window of the last appended piece
    c = cfg.chunk
    assert len(held) <= cfg.sinks + window + pieces + 2 * c, sorted(held)
    assert store.seq_lens([s]) == [n]


def _token_order_mask(n, lq, window):
    """(1, 1, lq, n) bool: new token i (position n - lq + i) sees j with p - window < j <= p."""
    p = torch.arange(n - lq, n)[:, None]
    j = torch.arange(n)[None, :]
    return ((j <= p) & (j > p - window))[None, None]


@pytest.mark.parametrize("cfg", [CFG, SINKS], ids=["no-sinks", "sinks"])
@pytest.mark.parametrize("window", [9, 16, 70])
@pytest.mark.parametrize("lq", [1, 6])
@pytest.mark.parametrize("math_cfg", [EXACT, TURBO_DEFAULT], ids=["exact", "turbo"])
def test_windowed_store_reads_as_the_full_store_under_transformers_mask(cfg, window, lq, math_cfg):
    """A windowed store (pages released) must give exactly what the same tokens in a store
    without a window give under a token-order sliding mask built here by hand."""
    gen = torch.Generator().manual_seed(window + lq)
    lengths = [150, 95]  # ragged
    tokens = [tuple(torch.randn(2, n, D, generator=gen) for _ in range(2)) for n in lengths]
    q = torch.randn(2, 6, lq, D, generator=gen)  # GQA 3
    windowed = QuantizedKVLayer([4, 2], D, cfg, window=window)
    full = QuantizedKVLayer([4, 2], D, cfg)
    grow(windowed, tokens, 23, new=lq)
    grow(full, tokens, 23, new=lq)
    assert windowed.nbytes() < full.nbytes()
    out = decode_attention_reference(q, windowed.view(), math_cfg=math_cfg).out
    for b, n in enumerate(lengths):
        ref = decode_attention_reference(q[b: b + 1], full.view([b]), math_cfg=math_cfg,
                                         mask=_token_order_mask(n, lq, window)).out
        assert_close(ref, out[b: b + 1], atol=1e-6)


def test_released_pages_are_reused_and_bytes_for_is_the_most_held_at_rest():
    window = 40
    store = QuantizedKVLayer([4, 2], D, SINKS, window=window)
    s = store.add_sequence()
    gen = torch.Generator().manual_seed(0)
    most, capacity = 0, []
    for step in range(400):
        k, v = (torch.randn(1, 2, 1, D, generator=gen) for _ in range(2))
        store.compress_full_chunks([s])
        store.append(k, v, compress=False, seqs=[s])
        store.compress_full_chunks([s])  # at rest between steps, as the runner flushes
        most = max(most, store.nbytes())
        assert store.nbytes() <= store.bytes_for(step + 1), step
        capacity.append(store.capacity_nbytes())
    row = 2 * 2 * (D + 4)  # K and V, 2 heads, INT8 codes + a float scale
    assert most <= store.bytes_for(400) <= most + row  # a bound, tight to one buffered row
    assert capacity[100] == capacity[-1]  # after the window binds the pool stops growing
    unbounded = QuantizedKVLayer([4, 2], D, SINKS)
    assert store.bytes_for(400) < unbounded.bytes_for(400) / 4
    assert store.bytes_for(4000) == store.bytes_for(400)


def test_float_store_holds_the_window_and_reads_it_by_position():
    window, n = 30, 300
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, n, D, generator=gen) for _ in range(2))
    store = FloatKVLayer(2, D, window=window)
    s = store.add_sequence()
    for t in range(n):
        store.append(k[None, :, t: t + 1], v[None, :, t: t + 1], seqs=[s])
        assert store.nbytes() <= store.bytes_for(t + 1)
    pos = store.positions(s)
    assert pos.tolist() == list(range(n - window, n))
    held_k, held_v = store.keys_values(s)
    assert torch.equal(held_k, k[:, n - window:]) and torch.equal(held_v, v[:, n - window:])
    assert store.bytes_for(n) == window * 2 * 2 * D * 4
    q = torch.randn(1, 4, 1, D, generator=gen)
    out = turbo_attention(q, None, None, kv_store=store, math_cfg=EXACT).out
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k[None, :, n - window:], v[None, :, n - window:], enable_gqa=True)
    assert_close(ref, out, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_window_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="sliding window must be a positive int"):
        QuantizedKVLayer([4], D, CFG, window=bad)
    with pytest.raises(ValueError, match="sliding window must be a positive int"):
        FloatKVLayer(1, D, window=bad)
