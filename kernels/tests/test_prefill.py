"""The fused prefill kernel against the turbo_core reference (interpreter on CPU)."""

import dataclasses

import pytest
import torch

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, SASConfig
from turbo_core.attention.reference import attention_reference
from turbo_core.testing import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CONFIGS = {
    "exact": EXACT,
    "sas": AttentionMath(sas=SASConfig()),
    "sas+int8qk": TURBO_DEFAULT,
    "sas+int8qk+int8pv": dataclasses.replace(TURBO_DEFAULT, pv_int8=True),
    "int8qk-deg2": AttentionMath(sas=SASConfig(degree=2, lut_max=4), qk_int8=True),
}
# max |kernel - reference| on unit-variance V: the running max (kernel) vs the final max
# (reference) changes SAS inputs by a constant per row, so the SAS polynomial error (≤ 1e-3
# cubic, 1.3e-2 quadratic) and INT8 P rounding at a different scale show up; exact math ~1e-6.
ATOL = {"exact": 2e-5, "sas": 6e-3, "sas+int8qk": 6e-3, "sas+int8qk+int8pv": 3e-2,
        "int8qk-deg2": 4e-2}


def qkv(seed, b, hq, hkv, lq, lk, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    return (t.to(dtype).to(DEVICE) for t in (q, k, v))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize(
    ("hq", "hkv", "lq", "lk", "d", "causal"),
    [
        (2, 2, 64, 64, 64, False),
        (4, 2, 100, 100, 64, True),  # GQA 2, ragged length
        (4, 1, 37, 90, 128, True),  # MQA, L_q < L_k (bottom-right causal), head_dim 128
        (2, 2, 70, 70, 96, False),  # head_dim 96 padded to 128
    ],
)
def test_prefill_matches_reference(name, hq, hkv, lq, lk, d, causal):
    from turbo_kernels.prefill import prefill_attention

    cfg = CONFIGS[name]
    q, k, v = qkv(0, 1, hq, hkv, lq, lk, d, torch.float32)
    out = prefill_attention(q, k, v, math_cfg=cfg, causal=causal)
    ref = attention_reference(q.cpu(), k.cpu(), v.cpu(), math_cfg=cfg, causal=causal)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert_close(ref, out.cpu(), atol=ATOL[name])


def test_prefill_fp16():
    from turbo_kernels.prefill import prefill_attention

    q, k, v = qkv(1, 1, 2, 2, 64, 64, 64, torch.float16)
    out = prefill_attention(q, k, v, math_cfg=TURBO_DEFAULT, causal=True)
    ref = attention_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(),
                              math_cfg=TURBO_DEFAULT, causal=True)
    assert out.dtype == torch.float16
    assert_close(ref, out.cpu().float(), atol=1e-2)


def test_non_contiguous_inputs():
    from turbo_kernels.prefill import prefill_attention

    gen = torch.Generator().manual_seed(2)
    base = torch.randn(1, 64, 2, 3, 64, generator=gen).to(DEVICE)  # (B, L, H, qkv, D)
    q, k, v = (base[:, :, :, i].transpose(1, 2) for i in range(3))  # strided views
    out = prefill_attention(q, k, v, math_cfg=TURBO_DEFAULT, causal=True)
    ref = attention_reference(q.contiguous().cpu(), k.contiguous().cpu(), v.contiguous().cpu(),
                              math_cfg=TURBO_DEFAULT, causal=True)
    assert_close(ref, out.cpu(), atol=6e-3)


def test_bad_input_raises_before_launch():
    from turbo_kernels.prefill import prefill_attention

    q, k, v = qkv(3, 1, 4, 2, 16, 16, 64, torch.float32)
    with pytest.raises(ValueError, match="rank 4"):
        prefill_attention(q[0], k, v, math_cfg=EXACT)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_attention(q[:, :3], k, v, math_cfg=EXACT)
    with pytest.raises(ValueError, match="unsupported head_dim 300"):
        big = torch.randn(1, 1, 4, 300, device=DEVICE)
        prefill_attention(big, big, big, math_cfg=EXACT)
    with pytest.raises(ValueError, match=r"dtype torch\.int32"):
        prefill_attention(q.to(torch.int32), k, v, math_cfg=EXACT)
    with pytest.raises(ValueError, match="top-k"):
        prefill_attention(q, k, v, math_cfg=AttentionMath(sparse_ratio=0.5))
    with pytest.raises(ValueError, match="multiple of the key tile"):
        prefill_attention(q, k, v, math_cfg=AttentionMath(pv_int8=True, block_size=32))
