"""Kernel (linear) attention: the prefix-sum causal form equals the quadratic masked form,
FAVOR+ converges to softmax attention as its features grow, gradients match autograd of the
closed form, and the module trains it as itself with features redrawn on schedule."""

import pytest
import torch

from turbo_core.attention import linear
from turbo_core.attention.config import EXACT, AttentionMath, FeatureMap
from turbo_core.attention.functional import turbo_attention
from turbo_core.attention.modules import TurboAttention


def qkv(seed, b=2, hq=4, hkv=2, length=300, d=16, norm=1.0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(b, h, length, d, generator=gen, dtype=torch.float64) * norm  # noqa: E731
    return make(hq), make(hkv), make(hkv)


@pytest.mark.parametrize("kind", list(FeatureMap))
@pytest.mark.parametrize("causal", [False, True])
def test_linear_form_equals_quadratic_form(kind, causal):
    q, k, v = qkv(0)  # 300 tokens: three causal chunks of 128, the last partial; GQA 2
    feats = linear.draw_features(64, 16, generator=torch.Generator().manual_seed(1)).double()
    fast = linear.kernel_attention(q, k, v, kind=kind, features=feats, causal=causal)
    closed = linear.kernel_attention_quadratic(q, k, v, kind=kind, features=feats, causal=causal)
    torch.testing.assert_close(fast, closed, rtol=1e-10, atol=1e-12)


def test_favor_converges_to_softmax_attention():
    q, k, v = qkv(2, length=64, norm=0.4)
    exact = turbo_attention(q, k, v, math_cfg=EXACT).out
    errs = {}
    for m in (16, 256, 16384):
        runs = [turbo_attention(q, k, v, math_cfg=AttentionMath(kernel="favor+", num_features=m),
                                features=linear.draw_features(
                                    m, 16, generator=torch.Generator().manual_seed(s)).double()).out
                for s in range(3)]
        errs[m] = sum(((r - exact).norm() / exact.norm()).item() for r in runs) / len(runs)
    assert errs[16] > errs[256] > errs[16384], errs
    assert errs[16384] < 0.05, errs


def test_favor_features_are_orthogonal_gaussian_rows():
    f = linear.draw_features(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block = f[:16] / f[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    assert f.shape == (32, 16)


@pytest.mark.parametrize("kind", list(FeatureMap))
def test_gradients_match_autograd_of_the_closed_form(kind):
    q, k, v = (t[:, :, :150].clone().requires_grad_() for t in qkv(3, norm=0.5))
    feats = linear.draw_features(32, 16, generator=torch.Generator().manual_seed(4)).double()
    w = torch.randn(2, 4, 150, 16, dtype=torch.float64)
    grads = []
    for fn in (linear.kernel_attention, linear.kernel_attention_quadratic):
        out = fn(q, k, v, kind=kind, features=feats, causal=True)
        grads.append(torch.autograd.grad((out * w).sum(), (q, k, v)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_padding_mask_equals_dropping_the_keys():
    q, k, v = qkv(5, b=1, length=40)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., 30:] = False
    cfg = AttentionMath(kernel="elu")
    padded = turbo_attention(q, k, v, math_cfg=cfg, mask=mask).out
    cut = turbo_attention(q, k[:, :, :30], v[:, :, :30], math_cfg=cfg).out
    torch.testing.assert_close(padded, cut, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="key padding mask"):
        turbo_attention(q, k, v, math_cfg=cfg, mask=torch.ones(40, 40, dtype=torch.bool)[None, None])


def test_kernel_attention_refuses_what_does_not_apply():
    q, k, v = qkv(6, length=8)
    with pytest.raises(ValueError, match="replaces the softmax"):
        AttentionMath(kernel="favor+", qk_int8=True)
    with pytest.raises(ValueError, match="kernel"):
        AttentionMath(kernel="relu")
    with pytest.raises(ValueError, match="as many queries as keys"):
        turbo_attention(q[:, :, :4], k, v, math_cfg=AttentionMath(kernel="elu"), causal=True)
    with pytest.raises(ValueError, match="sliding window"):
        turbo_attention(q, k, v, math_cfg=AttentionMath(kernel="elu"), causal=True, window=4)


def test_module_trains_favor_as_itself_and_redraws_on_schedule():
    torch.manual_seed(0)
    cfg = AttentionMath(kernel="favor+", num_features=32, redraw_every=3)
    mod = TurboAttention(32, 4, batch_first=True, math_cfg=cfg, feature_seed=7)
    x = torch.randn(2, 20, 32, requires_grad=True)
    first = mod.features.clone()
    seen = []
    for _ in range(7):
        out, _ = mod(x, x, x, need_weights=False, is_causal=True)
        seen.append(mod.features.clone())
    # forwards 0-2 use draw 0, 3-5 draw 1, 6 draw 2
    assert torch.equal(seen[2], first) and not torch.equal(seen[3], first)
    assert torch.equal(seen[3], seen[5]) and not torch.equal(seen[6], seen[5])
    # training output is kernel attention itself (not exact attention), gradients flow
    heads = lambda t: t.reshape(2, 20, 4, 8).transpose(1, 2)  # noqa: E731
    qp, kp, vp = (heads(t) for t in mod._project(x, x, x, same=True))
    ref = linear.kernel_attention_quadratic(qp, kp, vp, kind=FeatureMap.FAVOR,
                                            features=mod.features, causal=True)
    ref = mod.out_proj(ref.float().transpose(1, 2).reshape(2, 20, 32))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert mod.in_proj_weight.grad.abs().sum() > 0
    mod.eval()
    with torch.no_grad():
        mod(x, x, x)
    assert torch.equal(mod.features, seen[6])  # fixed in eval
    # reproducible: the same seed draws the same features
    again = TurboAttention(32, 4, batch_first=True, math_cfg=cfg, feature_seed=7)
    assert torch.equal(again.features, first)
