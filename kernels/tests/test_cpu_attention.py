"""``torch.ops.turbo.attention`` — TurboAttention over plain float K/V on CPU (the drop-in
module's path) — against the pure-PyTorch reference: GQA, non-causal, causal with more keys
than queries (bottom-right), sliding windows, head_dim 64/128, exact / SAS / SAS + INT8 Q·Kᵀ
(with smooth_k), and through ``TurboAttention`` in eval mode."""

import pytest
import torch
from turbo_kernels import cpu_ops

from turbo_core.attention import functional
from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, SASConfig
from turbo_core.attention.reference import attention_details
from turbo_core.testing import assert_close

MATHS = {"exact": EXACT, "sas": AttentionMath(sas=SASConfig()), "turbo": TURBO_DEFAULT}


def atol(math_cfg: AttentionMath) -> float:
    """The op takes the reference's row max (two passes): float rounding only, and under SAS
    one weight's LUT step where rounding moves a score across an integer."""
    return 2e-5 if math_cfg.sas is None else 1e-4


@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "d"),
                         [(2, 8, 8, 300, 300, 64), (1, 9, 3, 100, 700, 64), (2, 4, 2, 129, 129, 128)])
@pytest.mark.parametrize(("causal", "window"), [(False, None), (True, None), (True, 50)])
@pytest.mark.parametrize("name", list(MATHS))
def test_attention_op_matches_reference(b, hq, hkv, lq, lk, d, causal, window, name):
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    gen = torch.Generator().manual_seed(lq + lk)
    q = 2 * torch.randn(b, hq, lq, d, generator=gen)  # spread scores: SAS cuts some weights
    k, v = (torch.randn(b, hkv, lk, d, generator=gen) for _ in range(2))
    ref = attention_details(q, k, v, math_cfg=MATHS[name], causal=causal, window=window)
    k_before = k.clone()
    out, dropped, valid = cpu_ops.attention(q, k, v, math_cfg=MATHS[name], causal=causal, window=window)
    assert torch.equal(k, k_before)  # smooth_k centres a copy, never the caller's K
    assert_close(ref.out, out, atol=atol(MATHS[name]))
    assert valid == ref.candidates
    assert abs(dropped - ref.sas_dropped) <= 1e-5 * valid  # the reference's cut, but for rounding


def test_attention_op_refuses_what_it_does_not_compute():
    assert cpu_ops.load()
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="INT8 P·V"):
        cpu_ops.attention(q, q, q, math_cfg=AttentionMath(pv_int8=True))
    with pytest.raises(ValueError, match="needs causal"):
        cpu_ops.attention(q, q, q, math_cfg=EXACT, window=4)
    with pytest.raises(RuntimeError, match="H_q a multiple"):
        cpu_ops.attention(torch.randn(1, 3, 8, 64), q, q, math_cfg=EXACT)
    with pytest.raises(RuntimeError, match="L_q <= L_k"):
        cpu_ops.attention(torch.randn(1, 2, 9, 64), q, q, math_cfg=EXACT, causal=True)


def test_the_module_runs_the_op_in_eval_and_exact_sdpa_in_training(monkeypatch, caplog):
    import logging

    from turbo_core.attention.modules import TurboAttention

    torch.manual_seed(0)
    attn = TurboAttention(256, 4, math_cfg=TURBO_DEFAULT, batch_first=True).eval()
    x = torch.randn(2, 200, 256)
    monkeypatch.setattr(functional, "_logged", set())
    caplog.set_level(logging.INFO, logger="turbo_core.attention.functional")
    with torch.no_grad():
        out, _ = attn(x, x, x, need_weights=False, is_causal=True)
        monkeypatch.setenv(functional.BACKEND_ENV, "reference")
        ref, _ = attn(x, x, x, need_weights=False, is_causal=True)
    assert "TurboAttention backend: cpu (plain tensors on cpu)" in caplog.text
    assert_close(ref, out, atol=atol(TURBO_DEFAULT))
    monkeypatch.delenv(functional.BACKEND_ENV)
    attn.train()
    out, _ = attn(x, x, x, need_weights=False, is_causal=True)  # training: exact math (module doc)
    out.sum().backward()
    assert "TurboAttention backend: sdpa (exact math)" in caplog.text
    assert attn.in_proj_weight.grad is not None


def test_scores_recomputed_when_they_do_not_fit_between_passes():
    """A job keeps its first pass's scores for the second only up to 8M floats (256 query rows
    x 32k keys); past that it computes them again — the same result."""
    assert cpu_ops.load()
    gen = torch.Generator().manual_seed(9)
    q = 2 * torch.randn(1, 1, 256, 64, generator=gen)
    k, v = (torch.randn(1, 1, 33_000, 64, generator=gen) for _ in range(2))
    ref = attention_details(q, k, v, math_cfg=TURBO_DEFAULT)
    out, dropped, valid = cpu_ops.attention(q, k, v, math_cfg=TURBO_DEFAULT)
    assert_close(ref.out, out, atol=atol(TURBO_DEFAULT))
    assert valid == ref.candidates == 256 * 33_000
    assert abs(dropped - ref.sas_dropped) <= 1e-5 * valid
