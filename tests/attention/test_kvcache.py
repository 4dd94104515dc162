"""The packed KV cache layer and decode attention over it."""

import pytest
import torch

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, KVQuantConfig
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.quant import dequantize_lowbit, quantize_int8_blockwise, quantize_lowbit
from turbo_core.attention.reference import attention_exact, decode_attention_reference
from turbo_core.testing import assert_close, assert_cosine, sqnr_db

CFG = KVQuantConfig(chunk=16, k_group=8, v_group=32)


def kv(seed, b=2, h=3, length=53, d=64):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, length, d, generator=gen), torch.randn(b, h, length, d, generator=gen))


def expected_int8(x, bits, side, cfg, d):
    """Independent re-derivation of one chunk's INT8 reconstruction for one head."""
    first = quantize_int8_blockwise(x, block_size=cfg.chunk, qmax=cfg.protect)
    if bits == 8:
        return first
    if side == "k":  # per channel, groups along tokens
        lb = quantize_lowbit(first.values, bits, dim=-2, group=cfg.k_group)
    else:  # per token, groups along channels
        lb = quantize_lowbit(first.values, bits, dim=-1, group=min(cfg.v_group, d))
    return type(first)(dequantize_lowbit(lb), first.scale)


@pytest.mark.parametrize("bits", [[4, 4, 4], [2, 2, 2], [4, 2, 8], [8, 8, 8]])
def test_cache_reconstruction_matches_the_math_exactly(bits):
    k, v = kv(0)
    cache = QuantizedKVLayer(bits, head_dim=64, cfg=CFG)
    cache.append(k[:, :, :20], v[:, :, :20])  # chunk + partial buffer
    cache.append(k[:, :, 20:21], v[:, :, 20:21])  # a decode step
    cache.append(k[:, :, 21:], v[:, :, 21:])
    assert cache.seq_len == 53 and cache.buffered == 53 % 16
    k8, v8 = cache.dequantize_int8()
    assert k8.values.shape == (2, 3, 53, 64) and k8.scale.shape == (2, 3, 53)
    # the buffered tokens went through the same per-token INT8 as on arrival
    n_comp = 48
    for h, b in enumerate(bits):
        for side, x, got in (("k", k, k8), ("v", v, v8)):
            buf = quantize_int8_blockwise(x[:, h:h + 1], block_size=1)
            for c in range(0, n_comp, 16):
                chunk = buf.dequantize()[:, :, c:c + 16]
                exp = expected_int8(chunk, b, side, CFG, 64)
                assert torch.equal(got.values[:, h:h + 1, c:c + 16], exp.values), (h, side, c)
                assert torch.equal(got.scale[:, h:h + 1, c:c + 16], exp.scale)
            assert torch.equal(got.values[:, h:h + 1, n_comp:], buf.values[:, :, n_comp:])


def page_bytes(bits, d=64, c=64, k_group=64, v_group=64):
    """One page of one head, from the layout (docs/design.md §1.2): packed K and V codes, K's integer
    scale + offset per (channel, token group), V's per (token, channel group), two float32
    first-level scales."""
    codes = 2 * d * c * bits // 8
    second = 0 if bits == 8 else 2 * d * (c // k_group) + 2 * (d // v_group) * c
    return codes + second + 2 * 4


def test_bytes_held_really_shrink():
    k, v = kv(1, b=1, h=4, length=1024 + 37, d=64)
    fp16_bytes = 2 * k.numel() * 2
    row = 2 * 4 * (64 + 4)  # a buffered token: K and V, 4 heads, int8 codes + float32 scale
    sizes = {}
    for bits in (8, 4, 2):
        cache = QuantizedKVLayer([bits] * 4, head_dim=64, cfg=KVQuantConfig())
        cache.append(k, v)
        sizes[bits] = cache.nbytes()
        assert sizes[bits] == 16 * 4 * page_bytes(bits) + 37 * row, bits
        assert cache.capacity_nbytes() >= sizes[bits]
    assert fp16_bytes / sizes[4] >= 3.4, sizes
    assert fp16_bytes / sizes[2] >= 5.5, sizes
    assert sizes[8] > sizes[4] > sizes[2]


def test_sequences_are_ragged_and_release_their_pages():
    cache = QuantizedKVLayer([4, 2, 8], head_dim=64, cfg=CFG)
    a, b = cache.add_sequence(), cache.add_sequence()
    k, v = kv(8, b=1, length=53)
    cache.append(k, v, seqs=[a])
    cache.append(k[:, :, :20], v[:, :, :20], seqs=[b])
    assert cache.seq_lens() == [53, 20]
    view = cache.view()
    assert view.n_chunks.tolist() == [3, 1] and view.buffer_len.tolist() == [5, 4]
    # the same tokens give the same INT8 rows whichever sequence and pages hold them
    alone = QuantizedKVLayer([4, 2, 8], head_dim=64, cfg=CFG)
    alone.append(k[:, :, :20], v[:, :, :20])
    got, want = cache.view([b]), alone.view()
    ref = decode_attention_reference(torch.ones(1, 3, 1, 64), want).out
    assert torch.equal(decode_attention_reference(torch.ones(1, 3, 1, 64), got).out, ref)
    used = cache.nbytes()
    cache.release(a)
    assert cache.sequences == [b] and cache.nbytes() < used
    c = cache.add_sequence()  # reuses slot a and its pages: the pool does not grow
    pool_pages = cache.capacity_nbytes()
    cache.append(k, v, seqs=[c])
    assert cache.capacity_nbytes() == pool_pages and cache.seq_lens([c, b]) == [53, 20]
    with pytest.raises(ValueError, match="not open"):
        cache.release(a if a != c else 99)


def test_decode_over_int8_cache_is_close_to_exact():
    k, v = kv(2, length=100)
    q = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(3))
    cache = QuantizedKVLayer([8, 8, 8], head_dim=64, cfg=CFG)
    cache.append(k, v)
    exact = attention_exact(q, k, v, causal=True)
    out = decode_attention_reference(q, cache.view(), math_cfg=EXACT).out
    assert_cosine(exact, out, at_least=0.9995)
    out_turbo = decode_attention_reference(q, cache.view(), math_cfg=TURBO_DEFAULT).out
    assert_cosine(exact, out_turbo, at_least=0.999)


def test_fewer_bits_cost_accuracy_in_order():
    """Improvement test: SQNR ranks INT8 > INT4 > INT2 with clear margins."""
    k, v = kv(4, length=256)
    q = torch.randn(2, 6, 4, 64, generator=torch.Generator().manual_seed(5))
    exact = attention_exact(q, k, v, causal=True)
    sq = {}
    for bits in (8, 4, 2):
        cache = QuantizedKVLayer([bits] * 3, head_dim=64, cfg=KVQuantConfig())
        cache.append(k, v)
        sq[bits] = sqnr_db(exact, decode_attention_reference(q, cache.view()).out)
    assert sq[8] > sq[4] + 10 and sq[4] > sq[2] + 6, sq
    assert sq[4] > 15, sq


def test_buffer_only_cache_uses_per_token_int8():
    k, v = kv(6, length=5)
    cache = QuantizedKVLayer([4, 2, 4], head_dim=64, cfg=CFG)
    cache.append(k, v)
    k8, _ = cache.dequantize_int8()
    err = (k8.dequantize() - k).abs()
    assert bool((err <= k8.scale.unsqueeze(-1) / 2 + 1e-7).all())
    assert_close(k, k8.dequantize(), atol=float(k.abs().max()) / 127)


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported KV bits 3"):
        QuantizedKVLayer([4, 3], head_dim=64)
    cache = QuantizedKVLayer([4, 4], head_dim=64, cfg=CFG)
    with pytest.raises(ValueError, match="empty"):
        cache.dequantize_int8()
    k, v = kv(7, h=3)
    with pytest.raises(ValueError, match="holds 2 heads"):
        cache.append(k, v)
    with pytest.raises(ValueError, match=r"\(B, H_kv, T, D\)"):
        cache.append(k[0, :2], v[0, :2])
    cache.append(k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match="batch size changed"):
        cache.append(k[:1, :2], v[:1, :2])
    with pytest.raises(ValueError, match="v_group"):
        QuantizedKVLayer([4], head_dim=96, cfg=KVQuantConfig(v_group=64))
    with pytest.raises(ValueError, match="k_group"):
        KVQuantConfig(chunk=64, k_group=48)
    with pytest.raises(ValueError, match="queries"):
        small = QuantizedKVLayer([4], head_dim=64, cfg=CFG)
        small.append(k[:, :1, :2], v[:, :1, :2])
        decode_attention_reference(torch.randn(2, 1, 3, 64), small.view(), math_cfg=AttentionMath())
