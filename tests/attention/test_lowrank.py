"""Low-rank (Linformer) attention: exact attention over the projected K and V, trained as
itself through the module, with its limits refused by name."""

import math

import pytest
import torch

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.functional import turbo_attention
from turbo_core.attention.modules import TurboAttention
from turbo_core.attention.reference import attention_exact


def test_equals_softmax_over_projected_rows_with_gradients():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    e, f = (torch.randn(6, 64, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    cfg = AttentionMath(low_rank=6, max_seq_len=64)
    out = turbo_attention(q, k, v, math_cfg=cfg, seq_proj=(e, f)).out
    kk, vv = e[:, :50] @ k, f[:, :50] @ v
    s = q @ kk.transpose(-1, -2) / math.sqrt(8)
    ref = torch.softmax(s, dim=-1) @ vv
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    g1 = torch.autograd.grad((out * w).sum(), (q, k, v, e, f))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v, e, f))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ref, attention_exact(q, kk, vv))


def test_other_math_applies_after_the_projection():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 30, 16, generator=gen) for _ in range(3))
    e, f = (torch.randn(5, 32, generator=gen) for _ in range(2))
    cfg = AttentionMath(low_rank=5, max_seq_len=32, top_p=0.9)
    out = turbo_attention(q, k, v, math_cfg=cfg, seq_proj=(e, f)).out
    ref = turbo_attention(q, e[:, :30] @ k, f[:, :30] @ v, math_cfg=AttentionMath(top_p=0.9)).out
    torch.testing.assert_close(out, ref)


def test_limits_are_refused_by_name():
    q = torch.randn(1, 2, 40, 8)
    proj = (torch.randn(4, 32), torch.randn(4, 32))
    cfg = AttentionMath(low_rank=4, max_seq_len=32)
    with pytest.raises(ValueError, match="max_seq_len 32"):
        turbo_attention(q, q, q, math_cfg=cfg, seq_proj=proj)
    with pytest.raises(ValueError, match="cannot be causal"):
        turbo_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], math_cfg=cfg, seq_proj=proj, causal=True)
    with pytest.raises(ValueError, match="learned projections"):
        turbo_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8], math_cfg=cfg)
    with pytest.raises(ValueError, match="low_rank and max_seq_len"):
        AttentionMath(low_rank=4)
    with pytest.raises(ValueError, match="low_rank must be"):
        AttentionMath(low_rank=40, max_seq_len=32)


def test_module_learns_its_projections_and_pads():
    torch.manual_seed(0)
    mod = TurboAttention(32, 4, batch_first=True, math_cfg=AttentionMath(low_rank=8, max_seq_len=64))
    assert [n for n, _ in mod.named_parameters() if n.startswith("seq_proj")] == ["seq_proj.0", "seq_proj.1"]
    x = torch.randn(2, 40, 32)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 30:] = True
    out, weights = mod(x, x, x, key_padding_mask=pad)
    assert weights.shape == (2, 40, 8)  # over the projected rows
    alone, _ = mod(x[1:, :30], x[1:, :30], x[1:, :30])  # padding = the tokens not there
    torch.testing.assert_close(out[1, :30], alone[0], rtol=1e-5, atol=1e-6)
    out.pow(2).mean().backward()
    assert mod.seq_proj[0].grad.abs().sum() > 0 and mod.seq_proj[1].grad.abs().sum() > 0
