"""The C++ CPU attention ops — ``torch.ops.turbo.decode_attention`` and ``prefill_attention``,
each on every case — over the packed cache's view, against the pure-PyTorch reference:
ragged batches, INT2/INT4/INT8 heads mixed in one layer, GQA 1/3/8, head_dim 64/128/256, the
INT8 buffer empty and not, several new tokens (chunked prefill), exact and TurboAttention math."""

import pytest
import torch
from turbo_kernels import cpu_ops

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, KVQuantConfig, SASConfig
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.reference import decode_attention_reference
from turbo_core.testing import assert_close

# sas-long-table: 22 table entries, past the 16 that two permutes cover: the gather path
MATHS = {"exact": EXACT, "turbo": TURBO_DEFAULT,
         "sas-quadratic": AttentionMath(sas=SASConfig(degree=2, lut_max=6)),
         "sas-long-table": AttentionMath(sas=SASConfig(lut_max=20))}
# exact: float rounding only; SAS: the polynomial's error under running (per-split) maxima
ATOL = {"exact": 2e-5, "turbo": 6e-3, "sas-quadratic": 2e-2, "sas-long-table": 6e-3}


@pytest.fixture(params=["decode", "prefill"])
def decode(request):
    """Each C++ attention op, called as ``op(q, view, math_cfg=..., count=False)``: the output,
    or with ``count`` also the SAS zeros and the valid positions."""
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    op = cpu_ops.decode_attention if request.param == "decode" else cpu_ops.prefill_attention

    def call(q, view, *, math_cfg, count=False):
        out, dropped, candidates = op(q, view, math_cfg=math_cfg)
        return (out, dropped, candidates) if count else out

    return call


def ragged(bits, lengths, d=64, new=1, cfg=None, seed=0):
    """A cache whose sequence ``i`` holds ``lengths[i]`` tokens, the last ``new`` buffered."""
    gen = torch.Generator().manual_seed(seed)
    cache = QuantizedKVLayer(bits, d, cfg or KVQuantConfig())
    for n in lengths:
        s = cache.add_sequence()
        k, v = (torch.randn(1, len(bits), n, d, generator=gen) for _ in range(2))
        cache.append(k[:, :, : n - new], v[:, :, : n - new], seqs=[s])
        cache.append(k[:, :, n - new:], v[:, :, n - new:], seqs=[s], compress=False)
    return cache


@pytest.mark.parametrize("bits", [[4, 4, 4], [2, 4, 8], [8, 2, 2]])
@pytest.mark.parametrize("lengths", [[300], [64, 1, 200], [128, 130]])  # ragged; buffer 1..≥ chunk
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("name", ["exact", "turbo"])
def test_one_new_token_matches_reference(bits, lengths, group, name, decode):
    cache = ragged(bits, lengths)
    q = torch.randn(len(lengths), 3 * group, 1, 64, generator=torch.Generator().manual_seed(1))
    view = cache.view()
    out = decode(q, view, math_cfg=MATHS[name])
    assert_close(decode_attention_reference(q, view, math_cfg=MATHS[name]).out, out, atol=ATOL[name])


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ["exact", "turbo", "sas-quadratic", "sas-long-table"])
def test_head_dims_groups_and_an_empty_buffer(d, name, decode):
    cfg = KVQuantConfig(chunk=64, k_group=32, v_group=32)
    cache = QuantizedKVLayer([4, 2], d, cfg)
    k, v = (torch.randn(2, 2, 192, d, generator=torch.Generator().manual_seed(d)) for _ in range(2))
    cache.append(k, v)  # 3 full pages per sequence, nothing buffered
    view = cache.view()
    assert view.buffer_len.tolist() == [0, 0]
    q = torch.randn(2, 6, 1, d, generator=torch.Generator().manual_seed(3))
    out = decode(q, view, math_cfg=MATHS[name])
    assert_close(decode_attention_reference(q, view, math_cfg=MATHS[name]).out, out, atol=ATOL[name])


@pytest.mark.parametrize(("d", "chunk"), [(36, 64), (64, 32)])
@pytest.mark.parametrize("name", ["exact", "turbo"])
def test_odd_head_dim_and_another_chunk(d, chunk, name, decode):
    """head_dim 36 (not a multiple of 8: the scalar page pass, the buffer's scalar channel
    tails) and chunk 32 (the vector page pass with the chunk known only at run time), with
    pages, a buffer of several rows, INT2/INT4/INT8 heads and GQA 3."""
    cfg = KVQuantConfig(chunk=chunk, k_group=32, v_group=4)
    cache = ragged([2, 4, 8], [150, 70], d=d, new=3, cfg=cfg)
    view = cache.view()
    assert min(view.n_chunks.tolist()) >= 1 and min(view.buffer_len.tolist()) >= 3
    q = torch.randn(2, 9, 3, d, generator=torch.Generator().manual_seed(d + chunk))
    out = decode(q, view, math_cfg=MATHS[name])
    assert_close(decode_attention_reference(q, view, math_cfg=MATHS[name]).out, out, atol=ATOL[name])


@pytest.mark.parametrize("new", [5, 64, 100])
@pytest.mark.parametrize("name", ["exact", "turbo"])
def test_several_new_tokens_are_causal_among_themselves(new, name, decode):
    cache = ragged([4, 2, 4], [new + 150, new + 64], new=new)
    q = torch.randn(2, 9, new, 64, generator=torch.Generator().manual_seed(4))
    view = cache.view()
    out = decode(q, view, math_cfg=MATHS[name])
    assert_close(decode_attention_reference(q, view, math_cfg=MATHS[name]).out, out, atol=ATOL[name])


def test_sas_zero_counts_follow_the_reference(decode):
    cache = ragged([4, 4, 4], [700])
    q = 4 * torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(5))  # peaky scores
    view = cache.view()
    ref = decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT)
    _, dropped, candidates = decode(q, view, math_cfg=TURBO_DEFAULT, count=True)
    assert candidates == ref.candidates == 9 * 700
    # the kernel cuts against running maxima (never above the final one), so what it zeroes is
    # a subset of what the reference zeroes: a lower bound, here most of it
    assert ref.sas_dropped > 0.1 * candidates
    assert 0.5 * ref.sas_dropped <= dropped <= ref.sas_dropped, (dropped, ref.sas_dropped)


def test_bad_input_is_refused_by_name(decode):
    view = ragged([4, 4], [70]).view()
    with pytest.raises(ValueError, match="multiple"):
        decode(torch.randn(1, 3, 1, 64), view, math_cfg=EXACT)
    with pytest.raises(ValueError, match="query batch 2"):
        decode(torch.randn(2, 2, 1, 64), view, math_cfg=EXACT)
    with pytest.raises(ValueError, match="buffers only 6"):  # 70 = one page + 6 buffered
        decode(torch.randn(1, 2, 7, 64), view, math_cfg=EXACT)
    with pytest.raises(ValueError, match="not top-k sparsity"):
        decode(torch.randn(1, 2, 1, 64), view, math_cfg=AttentionMath(sparse_ratio=0.5))


LEVERS = KVQuantConfig(sinks=16, int2_k_group=32, int2_v_group=16)  # INT2 groups of their own


@pytest.mark.parametrize("lengths", [[10, 300], [80, 16, 17]])  # sinks only; sinks + pages + rows
@pytest.mark.parametrize("new", [1, 7])
@pytest.mark.parametrize("name", ["exact", "turbo"])
def test_sinks_and_int2_groups_match_reference(lengths, new, name, decode):
    lq = min(new, min(lengths))
    cache = ragged([2, 4, 2], lengths, new=lq, cfg=LEVERS)
    view = cache.view()
    assert {g.bits: (g.k_group, g.v_group) for g in view.groups} == {2: (32, 16), 4: (64, 64)}
    # each sequence buffers its 16 first tokens (or all it has), the rest of its first append
    # that fills no chunk, and the new tokens
    assert view.buffer_len.tolist() == [min(n - lq, 16) + max(0, n - lq - 16) % 64 + lq
                                        for n in lengths]
    q = torch.randn(len(lengths), 6, lq, 64, generator=torch.Generator().manual_seed(6))
    out = decode(q, view, math_cfg=MATHS[name])
    assert_close(decode_attention_reference(q, view, math_cfg=MATHS[name]).out, out, atol=ATOL[name])


@pytest.mark.parametrize("op", ["decode_attention", "prefill_attention"])
def test_the_cpp_ops_refuse_malformed_input_by_name(op):
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    call = getattr(cpu_ops, op)
    view = ragged([4, 4], [200]).view()
    q = torch.randn(1, 2, 1, 64)
    bad_table = view.__class__(**{**view.__dict__, "page_table": view.page_table + 1000})
    with pytest.raises(RuntimeError, match="page_table"):
        call(q, bad_table, math_cfg=EXACT)
    wide_table = view.__class__(**{**view.__dict__, "page_table": view.page_table.long()})
    with pytest.raises(ValueError, match=r"page_table must be a CPU torch\.int32"):
        call(q, wide_table, math_cfg=EXACT)
    with pytest.raises(ValueError, match="head_dim 64"):
        call(torch.randn(1, 2, 1, 32), view, math_cfg=EXACT)
    short = view.__class__(**{**view.__dict__, "n_chunks": view.n_chunks + 5})
    with pytest.raises(RuntimeError, match="n_chunks"):
        call(q, short, math_cfg=EXACT)
    strided = torch.randn(1, 2, 1, 128)[..., ::2]  # non-contiguous queries are copied, not refused
    assert_close(decode_attention_reference(strided, view, math_cfg=EXACT).out,
                 call(strided, view, math_cfg=EXACT)[0], atol=2e-5)
    # a direct call of the op (no wrapper) with a wrong buffer shape is refused, not read
    args = cpu_ops._view_args(q, view, EXACT, op)
    args[18] = args[18][:, :1]  # buffer_k with one head fewer than buffer_v
    tail = [cpu_ops.PAGES_PER_SPLIT] if op == "decode_attention" else []
    with pytest.raises(RuntimeError, match="buffer_k"):
        getattr(torch.ops.turbo, op)(*args, *tail, *cpu_ops._softmax_args(q, EXACT, None))
