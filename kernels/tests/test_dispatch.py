"""Backend dispatch in turbo_core.attention.functional: env override, automatic choice, logging."""

import logging

import pytest
import torch

from turbo_core.attention import functional
from turbo_core.attention.config import TURBO_DEFAULT
from turbo_core.attention.modules import TurboAttention
from turbo_core.testing import assert_close


def test_forced_triton_runs_the_kernel_through_the_module(monkeypatch, caplog):
    torch.manual_seed(0)
    attn = TurboAttention(128, 2, batch_first=True).eval()
    x = torch.randn(1, 40, 128)
    monkeypatch.setenv(functional.BACKEND_ENV, "reference")
    with torch.no_grad():
        ref, _ = attn(x, x, x, need_weights=False, is_causal=True)
    monkeypatch.setenv(functional.BACKEND_ENV, "triton")
    monkeypatch.setattr(functional, "_logged", set())  # each choice is logged once per process
    caplog.set_level(logging.INFO, logger="turbo_core.attention.functional")
    with torch.no_grad():
        out, _ = attn(x, x, x, need_weights=False, is_causal=True)
    assert "TurboAttention backend: triton" in caplog.text
    assert_close(ref, out, atol=6e-3)


def test_choices_and_errors(monkeypatch):
    q = torch.randn(1, 2, 8, 64)
    monkeypatch.delenv(functional.BACKEND_ENV, raising=False)
    assert functional.choose_backend(q, q, q, math_cfg=TURBO_DEFAULT) == ("cpu", "plain tensors on cpu")
    trained = q.clone().requires_grad_()  # the C++ op has no backward: training runs the reference
    assert functional.choose_backend(trained, q, q, math_cfg=TURBO_DEFAULT) == (
        "reference", "gradients (the C++ op has no backward)")
    monkeypatch.setenv(functional.BACKEND_ENV, "triton")
    backend, reason = functional.choose_backend(q, q, q, math_cfg=TURBO_DEFAULT, need_probs=True)
    assert backend == "reference" and "no kernel for: attention weights requested" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device or TRITON_INTERPRET=1"):
        functional.choose_backend(q, q, q, math_cfg=TURBO_DEFAULT)
    monkeypatch.setenv(functional.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="use one of"):
        functional.choose_backend(q, q, q, math_cfg=TURBO_DEFAULT)


def test_hf_generate_reads_the_packed_cache_through_the_decode_kernels(monkeypatch, caplog, tiny_llama):
    """Greedy generation through TurboCache: the prompt (70 tokens, fewer than the CPU kernel's
    128 and Triton's 256 rows per KV head, so no prefill kernel runs) and every decode step read
    the packed cache through the Triton decode kernel (interpreter here) or the CPU decode
    kernel, and the greedy tokens agree with the reference's."""
    from transformers import AutoModelForCausalLM

    from turbo_core.attention.config import KVQuantConfig
    from turbo_core.hf.attention import enable
    from turbo_core.hf.cache import TurboCache
    from turbo_core.hf.models import shape_of

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    shape = shape_of(model.config, "tiny")
    ids = torch.randint(0, model.config.vocab_size, (1, 70), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    enable(model, TURBO_DEFAULT)
    outs = {}
    monkeypatch.setattr(functional, "_logged", set())  # each choice is logged once per process
    caplog.set_level(logging.INFO, logger="turbo_core.attention.functional")
    for backend in ("reference", "triton", "cpu"):
        monkeypatch.setenv(functional.BACKEND_ENV, backend)
        with torch.no_grad():
            outs[backend] = model.generate(ids, cache=TurboCache(shape, 4, KVQuantConfig()), **kw)
    assert torch.equal(outs["reference"], outs["triton"]) and torch.equal(outs["reference"], outs["cpu"])
    assert "TurboAttention backend: triton (TURBO_ATTENTION_BACKEND=triton)" in caplog.text
    assert "TurboAttention backend: cpu (TURBO_ATTENTION_BACKEND=cpu)" in caplog.text
    assert "no kernel for" not in caplog.text  # neither fell back to the reference
