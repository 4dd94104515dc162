"""The packed-cache decode kernel against turbo_core's decode reference."""

import pytest
import torch

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, KVQuantConfig, SASConfig
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.reference import decode_attention_reference
from turbo_core.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled(bits, length, d=64, b=1, seed=0, cfg=None):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(b, len(bits), length, d, generator=gen).to(DEVICE)
    v = torch.randn(b, len(bits), length, d, generator=gen).to(DEVICE)
    cache = QuantizedKVLayer(bits, d, cfg or KVQuantConfig())
    cache.append(k, v)
    return cache


@pytest.mark.parametrize("bits", [[4, 4], [2, 2], [4, 2], [8, 4]])
@pytest.mark.parametrize("length", [64, 150, 300])  # chunks only, chunks + buffer, several splits
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("name", ["exact", "turbo"])
def test_decode_matches_reference(bits, length, group, name):
    from turbo_kernels.decode import decode_attention

    cfg = {"exact": EXACT, "turbo": TURBO_DEFAULT}[name]
    cache = filled(bits, length)
    q = torch.randn(1, len(bits) * group, 1, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = decode_attention(q, cache.view(), math_cfg=cfg, chunks_per_split=2)
    ref = decode_attention_reference(q, cache.view(), math_cfg=cfg).out
    # exact: float rounding only; turbo: SAS polynomial error under per-split running maxima
    assert_close(ref.cpu(), out.cpu(), atol=1e-5 if name == "exact" else 6e-3)


def test_decode_head_dim_128_batch_and_groups():
    from turbo_kernels.decode import decode_attention

    cfg = KVQuantConfig(chunk=64, k_group=32, v_group=64)
    cache = filled([4, 2, 4], 200, d=128, b=2, cfg=cfg)
    q = torch.randn(2, 6, 1, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    math_cfg = AttentionMath(sas=SASConfig(degree=3, lut_max=6), qk_int8=True)
    out = decode_attention(q, cache.view(), math_cfg=math_cfg)
    ref = decode_attention_reference(q, cache.view(), math_cfg=math_cfg).out
    assert_close(ref.cpu(), out.cpu(), atol=6e-3)


@pytest.mark.parametrize("d,group", [(64, 3), (64, 8), (256, 1), (256, 3)])
def test_decode_head_dims_and_gqa_ratios(d, group):
    from turbo_kernels.decode import decode_attention

    cache = filled([4, 8], 100, d=d, seed=d + group)
    q = torch.randn(1, 2 * group, 1, d, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    view = cache.view()
    out = decode_attention(q, view, math_cfg=TURBO_DEFAULT)
    assert_close(decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT).out.cpu(), out.cpu(), atol=6e-3)


def test_decode_ragged_sequences_over_shared_pages():
    """Sequences of different lengths in one cache (page tables of their own), mixed widths."""
    from turbo_kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(7)
    cache = QuantizedKVLayer([4, 2, 8], 64, KVQuantConfig())
    for n in (200, 64, 9):
        s = cache.add_sequence()
        k, v = (torch.randn(1, 3, n, 64, generator=gen).to(DEVICE) for _ in range(2))
        cache.append(k, v, seqs=[s])
    view = cache.view()
    assert view.n_chunks.tolist() == [3, 1, 0] and view.buffer_len.tolist() == [8, 0, 9]
    q = torch.randn(3, 6, 1, 64, generator=gen).to(DEVICE)
    out = decode_attention(q, view, math_cfg=TURBO_DEFAULT, chunks_per_split=2)
    assert_close(decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT).out.cpu(), out.cpu(), atol=6e-3)


@pytest.mark.parametrize("new", [3, 40])
@pytest.mark.parametrize("name", ["exact", "turbo"])
def test_chunked_prefill_new_tokens_are_causal_among_themselves(new, name):
    from turbo_kernels.decode import decode_attention

    cfg = {"exact": EXACT, "turbo": TURBO_DEFAULT}[name]
    gen = torch.Generator().manual_seed(8)
    cache = QuantizedKVLayer([4, 2], 64, KVQuantConfig())
    k, v = (torch.randn(2, 2, 130 + new, 64, generator=gen).to(DEVICE) for _ in range(2))
    cache.append(k[:, :, :130], v[:, :, :130])
    cache.append(k[:, :, 130:], v[:, :, 130:], compress=False)
    q = torch.randn(2, 6, new, 64, generator=gen).to(DEVICE)
    view = cache.view()
    out = decode_attention(q, view, math_cfg=cfg, chunks_per_split=1)
    ref = decode_attention_reference(q, view, math_cfg=cfg).out
    assert_close(ref.cpu(), out.cpu(), atol=1e-5 if name == "exact" else 6e-3)


def test_decode_bad_input():
    from turbo_kernels.decode import decode_attention

    cache = filled([4, 4], 70).view()
    with pytest.raises(ValueError, match="buffers only 6"):  # 70 tokens = one page + 6 buffered
        decode_attention(torch.randn(1, 2, 7, 64, device=DEVICE), cache, math_cfg=EXACT)
    with pytest.raises(ValueError, match="at most 256"):
        decode_attention(torch.randn(1, 2 * 257, 1, 64, device=DEVICE), cache, math_cfg=EXACT)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(1, 3, 1, 64, device=DEVICE), cache, math_cfg=EXACT)
    with pytest.raises(ValueError, match="query batch 2"):
        decode_attention(torch.randn(2, 2, 1, 64, device=DEVICE), cache, math_cfg=EXACT)
    with pytest.raises(ValueError, match="not top-k sparsity"):
        decode_attention(torch.randn(1, 2, 1, 64, device=DEVICE), cache,
                         math_cfg=AttentionMath(sparse_ratio=0.5))


@pytest.mark.parametrize("length", [12, 230])  # the sinks only; sinks + pages + recent rows
def test_decode_over_sinks_and_int2_groups(length):
    from turbo_kernels.decode import decode_attention

    cfg = KVQuantConfig(sinks=16, int2_k_group=32, int2_v_group=16)
    cache = filled([2, 4], length, cfg=cfg)
    view = cache.view()
    assert int(view.buffer_len[0]) == min(length, 16) + max(0, length - 16) % 64
    q = torch.randn(1, 4, 1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = decode_attention(q, view, math_cfg=TURBO_DEFAULT)
    assert_close(decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT).out.cpu(), out.cpu(),
                 atol=6e-3)
