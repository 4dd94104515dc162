"""TurboAttention as a drop-in for nn.MultiheadAttention."""

import pytest
import torch
from torch import nn

from turbo_core.attention.config import EXACT, TURBO_DEFAULT
from turbo_core.attention.modules import TransformerBlock, TurboAttention
from turbo_core.testing import assert_close, assert_cosine


def pair(embed=64, heads=4, **kw):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(embed, heads, **kw).eval()
    turbo = TurboAttention(embed, heads, math_cfg=EXACT, **kw).eval()
    turbo.load_state_dict(mha.state_dict())  # same parameter names and shapes
    return mha, turbo


def inputs(batch_first, n=3, length=11, src=13, embed=64, kdim=64, vdim=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, length, embed, generator=gen)
    k = torch.randn(n, src, kdim, generator=gen)
    v = torch.randn(n, src, vdim, generator=gen)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("average", [True, False])
def test_exact_config_equals_mha_with_masks(batch_first, average):
    mha, turbo = pair(batch_first=batch_first)
    q, k, v = inputs(batch_first)
    kpm = torch.zeros(3, 13, dtype=torch.bool)
    kpm[1, 9:] = True
    am = torch.rand(11, 13, generator=torch.Generator().manual_seed(2)) > 0.8
    am[:, 0] = False
    with torch.no_grad():
        a, wa = mha(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
        b, wb = turbo(q, k, v, key_padding_mask=kpm, attn_mask=am, average_attn_weights=average)
    assert_close(a, b, atol=1e-5)
    assert_close(wa, wb, atol=1e-6)


def test_float_masks_3d_masks_and_no_weights():
    mha, turbo = pair(batch_first=True)
    q, k, v = inputs(True)
    gen = torch.Generator().manual_seed(3)
    am = torch.randn(3 * 4, 11, 13, generator=gen)  # per (batch, head) additive bias
    kpm = torch.zeros(3, 13)
    kpm[0, -2:] = float("-inf")
    with torch.no_grad():
        a, _ = mha(q, k, v, key_padding_mask=kpm, attn_mask=am)
        b, w = turbo(q, k, v, key_padding_mask=kpm, attn_mask=am, need_weights=False)
    assert w is None
    assert_close(a, b, atol=1e-5)


def test_causal_and_unbatched_and_kdim_vdim():
    mha, turbo = pair(batch_first=True)
    x, _, _ = inputs(True, src=11)
    causal = torch.triu(torch.ones(11, 11, dtype=torch.bool), 1)
    with torch.no_grad():
        a, _ = mha(x, x, x, attn_mask=causal, is_causal=True)
        b, _ = turbo(x, x, x, is_causal=True)  # is_causal alone applies the causal mask
        assert_close(a, b, atol=1e-5)
        a, wa = mha(x[0], x[0], x[0])
        b, wb = turbo(x[0], x[0], x[0])
    assert b.shape == (11, 64) and wb.shape == (11, 11)
    assert_close(a, b, atol=1e-5)
    assert_close(wa, wb, atol=1e-6)
    mha, turbo = pair(kdim=32, vdim=48)
    q, k, v = inputs(False, kdim=32, vdim=48)
    with torch.no_grad():
        assert_close(mha(q, k, v)[0], turbo(q, k, v)[0], atol=1e-5)


def test_default_turbo_math_is_close_and_sparse_ratio_applies():
    mha, _ = pair(batch_first=True)
    turbo = TurboAttention(64, 4, batch_first=True).eval()
    assert turbo.math_cfg == TURBO_DEFAULT
    turbo.load_state_dict(mha.state_dict())
    x, _, _ = inputs(True, src=11)
    with torch.no_grad():
        assert_cosine(mha(x, x, x)[0], turbo(x, x, x)[0], at_least=0.999)
        sparse = TurboAttention(64, 4, batch_first=True, sparse_ratio=0.1).eval()
        sparse.load_state_dict(mha.state_dict())
        _, w = sparse(x, x, x, average_attn_weights=False)
    assert sparse.math_cfg.sparse_ratio == 0.1
    assert bool(((w > 0).sum(-1) == 2).all())  # ceil(0.1 * 11) keys per query


def test_eval_mode_is_deterministic_and_training_gradients_are_finite():
    torch.manual_seed(4)
    turbo = TurboAttention(64, 4, dropout=0.5, batch_first=True)
    x = torch.randn(2, 9, 64, requires_grad=True)
    turbo.eval()
    with torch.no_grad():
        assert torch.equal(turbo(x, x, x)[0], turbo(x, x, x)[0])
    turbo.train()
    out, _ = turbo(x, x, x)
    out.sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())
    assert turbo.in_proj_weight.grad is not None


def test_transformer_block():
    torch.manual_seed(5)
    block = TransformerBlock(64, 4, ff_dim=128, sparse_ratio=0.5)
    x = torch.randn(2, 10, 64)
    y = block(x, is_causal=True)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    # causal: changing the last token leaves earlier outputs unchanged
    x2 = x.clone()
    x2[:, -1] += 1.0
    assert_close(y[:, :-1], block(x2, is_causal=True)[:, :-1], atol=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="not divisible"):
        TurboAttention(30, 4)
    with pytest.raises(ValueError, match="add_bias_kv"):
        TurboAttention(32, 4, add_bias_kv=True)
    turbo = TurboAttention(32, 4, batch_first=True)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match=r"2-D \(unbatched\) or 3-D"):
        turbo(x[None], x[None], x[None])
    with pytest.raises(ValueError, match="embed dim 16"):
        turbo(x[..., :16], x, x)
    with pytest.raises(ValueError, match="key_padding_mask shape"):
        turbo(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask shape"):
        turbo(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool or float"):
        turbo(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int64))


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_takes_one_fused_projection_and_equals_mha(batch_first, monkeypatch):
    """One tensor passed as query, key and value: one GEMM against the whole in_proj_weight
    (as MHA's fast path); the result equals MHA's and the three-GEMM path's (distinct copies)."""
    mha, turbo = pair(batch_first=batch_first)
    x, _, _ = inputs(batch_first)
    calls = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda inp, w, b=None: calls.append(tuple(w.shape)) or real(inp, w, b))
    with torch.no_grad():
        fused, _ = turbo(x, x, x, need_weights=False)
        assert calls == [(3 * 64, 64), (64, 64)]  # q, k, v in one; then out_proj
        calls.clear()
        apart, _ = turbo(x.clone(), x.clone(), x.clone(), need_weights=False)
        assert calls == [(64, 64)] * 4
        ref, _ = mha(x, x, x, need_weights=False)
    assert_close(fused, apart, atol=1e-6)
    assert_close(ref, fused, atol=1e-5)
