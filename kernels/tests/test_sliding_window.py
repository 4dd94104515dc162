"""Every kernel honours a sliding window, against the pure-PyTorch reference: the CPU decode
and prefill ops (C++) and the Triton decode kernel over windowed
packed stores (pages released, sinks, ragged batches, GQA, one and several new tokens), and the
Triton prefill kernel and SDPA over plain tensors. Windows are shorter than the sequences, so they bind."""

import pytest
import torch
from turbo_kernels import cpu_ops
from turbo_kernels.decode import decode_attention
from turbo_kernels.prefill import prefill_attention

from turbo_core.attention import functional
from turbo_core.attention.config import EXACT, TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.reference import attention_details, decode_attention_reference
from turbo_core.testing import assert_close, grow

MATHS = {"exact": EXACT, "turbo": TURBO_DEFAULT}
ATOL = {"exact": 2e-5, "turbo": 6e-3}  # as the kernels' own tests: running maxima under SAS
CFGS = {"plain": KVQuantConfig(chunk=64), "sinks": KVQuantConfig(chunk=64, sinks=16)}


def windowed(cfg, window, lengths, new, d=64, bits=(4, 2, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    store = QuantizedKVLayer(list(bits), d, cfg, window=window)
    tokens = [tuple(torch.randn(len(bits), n, d, generator=gen) for _ in range(2)) for n in lengths]
    grow(store, tokens, 97, new=new)
    return store


@pytest.mark.parametrize("cfg", list(CFGS), ids=list(CFGS))
@pytest.mark.parametrize("window", [30, 64, 200])
@pytest.mark.parametrize("new", [1, 9])
@pytest.mark.parametrize("name", list(MATHS))
def test_cpu_decode_kernel_honours_the_window(cfg, window, new, name):
    store = windowed(CFGS[cfg], window, [600, 333, 140], new)
    view = store.view()
    assert int(view.chunk_base.max()) > 0  # pages were released
    q = torch.randn(3, 6, new, 64, generator=torch.Generator().manual_seed(1))
    ref = decode_attention_reference(q, view, math_cfg=MATHS[name]).out
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    assert_close(ref, cpu_ops.decode_attention(q, view, math_cfg=MATHS[name])[0], atol=ATOL[name])
    assert_close(ref, cpu_ops.prefill_attention(q, view, math_cfg=MATHS[name])[0], atol=ATOL[name])


@pytest.mark.parametrize("cfg", list(CFGS), ids=list(CFGS))
@pytest.mark.parametrize("window", [30, 300])
@pytest.mark.parametrize("name", list(MATHS))
def test_cpu_prefill_path_honours_the_window(cfg, window, name):
    new = 200
    store = windowed(CFGS[cfg], window, [700, 260], new)
    view = store.view()
    q = torch.randn(2, 6, new, 64, generator=torch.Generator().manual_seed(2))
    ref = decode_attention_reference(q, view, math_cfg=MATHS[name]).out
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    out, _, _ = cpu_ops.prefill_attention(q, view, math_cfg=MATHS[name])
    assert_close(ref, out, atol=ATOL[name])


@pytest.mark.parametrize("cfg", list(CFGS), ids=list(CFGS))
@pytest.mark.parametrize("window", [30, 100])
@pytest.mark.parametrize("new", [1, 5])
@pytest.mark.parametrize("name", list(MATHS))
def test_triton_decode_kernel_honours_the_window(cfg, window, new, name):
    store = windowed(CFGS[cfg], window, [400, 150], new)
    view = store.view()
    q = torch.randn(2, 6, new, 64, generator=torch.Generator().manual_seed(3))
    ref = decode_attention_reference(q, view, math_cfg=MATHS[name]).out
    assert_close(ref, decode_attention(q, view, math_cfg=MATHS[name], chunks_per_split=2),
                 atol=ATOL[name])


@pytest.mark.parametrize("window", [1, 17, 64, 90])
@pytest.mark.parametrize("lq,lk", [(100, 100), (40, 130)])
@pytest.mark.parametrize("name", list(MATHS))
def test_triton_prefill_kernel_honours_the_window(window, lq, lk, name):
    gen = torch.Generator().manual_seed(window)
    q = torch.randn(1, 4, lq, 64, generator=gen)
    k, v = (torch.randn(1, 2, lk, 64, generator=gen) for _ in range(2))
    ref = attention_details(q, k, v, math_cfg=MATHS[name], causal=True, window=window).out
    out = prefill_attention(q, k, v, math_cfg=MATHS[name], causal=True, window=window,
                            block_m=32, block_n=32)
    assert_close(ref, out, atol=ATOL[name])
    with pytest.raises(ValueError, match="sliding window needs causal=True"):
        prefill_attention(q, k, v, math_cfg=EXACT, window=window)


def test_sdpa_path_honours_the_window():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 50, 64, generator=gen)
    k, v = (torch.randn(2, 2, 80, 64, generator=gen) for _ in range(2))
    assert functional.choose_backend(q, k, v, math_cfg=EXACT, causal=True, window=20)[0] == "sdpa"
    ref = attention_details(q, k, v, causal=True, window=20).out
    out = functional.turbo_attention(q, k, v, math_cfg=EXACT, causal=True, window=20).out
    assert_close(ref, out, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_the_window_is_the_stores_whatever_the_backend(monkeypatch, backend):
    """The dispatch reads the window from the store: every backend gives the reference's output,
    and none gives what the same pages give without the window."""
    monkeypatch.setenv(functional.BACKEND_ENV, backend)
    store = windowed(CFGS["sinks"], 50, [300, 210], 1)
    q = torch.randn(2, 6, 1, 64, generator=torch.Generator().manual_seed(6))
    out = functional.turbo_attention(q, None, None, kv_store=store, math_cfg=TURBO_DEFAULT).out
    view = store.view()
    assert_close(decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT).out, out, atol=6e-3)
    unbounded = decode_attention_reference(
        q, view.__class__(**{**view.__dict__, "window": None}), math_cfg=TURBO_DEFAULT).out
    assert (unbounded - out).abs().max() > 0.05
