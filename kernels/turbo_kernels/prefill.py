"""Fused TurboAttention prefill: INT8 Q·Kᵀ (int8 × int8 → int32), SAS exponent (LUT + polynomial,
no hardware exp on the scores) with the sparsity cut-off, online softmax, P·V in fp16/fp32 or
INT8. Causal (bottom-right aligned) or not, GQA, head_dim ≤ 256 (padded to a power of two),
any sequence length (masked tails).

Reference: ``turbo_core.attention.reference.attention_details``. The kernel uses a running row max
(FlashAttention tiling) where the reference uses the final one, so the two differ by the SAS
polynomial's relative error (≤ 2e-3) on rescaled tiles; tests bound that.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.sas import kernel_args
from turbo_kernels.softmax import online_softmax_step


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, lut_ptr, o_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_qsb, stride_qsh, stride_qsm,
    stride_ksb, stride_ksh, stride_ksn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_ob, stride_oh, stride_om, stride_od,
    H_Q, GROUP, L_Q, L_K, HEAD_DIM, WINDOW, sm_scale,
    C0, C1, C2, C3,
    LUT_MAX: tl.constexpr, DEGREE: tl.constexpr, USE_SAS: tl.constexpr,
    QK_INT8: tl.constexpr, PV_INT8: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(cdiv(L_Q, BLOCK_M), B * H_Q)``. Q ``(B, H_Q, L_Q, D)``, K/V ``(B, H_KV, L_K, D)``
    (int8 with per-row float32 scales ``qs/ks/vs (B, H, L)`` when quantized), O like Q.
    ``WINDOW`` > 0 (with ``CAUSAL``): query ``m`` sees keys ``n > m + L_K - L_Q - WINDOW``."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h = pid_bh % H_Q
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L_Q
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :], other=0)
    if QK_INT8:
        q_scale = tl.load(qs_ptr + b * stride_qsb + h * stride_qsh + offs_m * stride_qsm,
                          mask=m_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = L_K - L_Q
    hi = L_K
    lo = 0
    if CAUSAL:
        hi = tl.minimum(L_K, (pid_m + 1) * BLOCK_M + shift)
        if WINDOW > 0:  # the first key tile any row of this block sees
            lo = tl.maximum(0, pid_m * BLOCK_M + shift - WINDOW + 1) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L_K
        k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn
                    + offs_d[:, None] * stride_kd, mask=n_ok[None, :] & d_ok[:, None], other=0)
        if QK_INT8:
            k_scale = tl.load(ks_ptr + b * stride_ksb + hk * stride_ksh + offs_n * stride_ksn,
                              mask=n_ok, other=0.0)
            s = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
            s = s * q_scale[:, None] * k_scale[None, :]
        else:
            s = tl.dot(q, k, input_precision="ieee")
        s = s * sm_scale
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + shift)
            if WINDOW > 0:
                valid = valid & (offs_n[None, :] > offs_m[:, None] + shift - WINDOW)
        s = tl.where(valid, s, float("-inf"))
        p, alpha, m_new = online_softmax_step(s, m_i, lut_ptr, C0, C1, C2, C3,
                                              LUT_MAX, DEGREE, USE_SAS)
        v_ptrs = (v_ptr + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                  + offs_d[None, :] * stride_vd)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0)
        if PV_INT8:
            p_q = tl.floor(p * 127.0 + 0.5)
            v_scale = tl.load(vs_ptr + b * stride_vsb + hk * stride_vsh + start_n * stride_vsn)
            pv = tl.dot(p_q.to(tl.int8), v, out_dtype=tl.int32).to(tl.float32)
            acc = acc * alpha[:, None] + pv * (v_scale / 127.0)
            l_i = l_i * alpha + tl.sum(p_q, axis=1) / 127.0
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, L, D), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} dtype {t.dtype} unsupported; use float16/bfloat16/float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, query on {q.device}")
    b, hq, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or hq % k.shape[1]:
        raise ValueError(f"head/batch mismatch: query {tuple(q.shape)}, key {tuple(k.shape)}, "
                         f"value {tuple(v.shape)} (query heads must be a multiple of KV heads)")
    if k.shape[3] != d or v.shape[3] != d or k.shape[2] != v.shape[2]:
        raise ValueError(f"shape mismatch: query {tuple(q.shape)}, key {tuple(k.shape)}, "
                         f"value {tuple(v.shape)}")
    if not 16 <= d <= 256:
        raise ValueError(f"unsupported head_dim {d}: the prefill kernel handles 16..256")


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    math_cfg: AttentionMath,
    causal: bool = False,
    scale: float | None = None,
    window: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
) -> torch.Tensor:
    """Launch the fused prefill; same contract as ``attention_reference`` (no masks/top-k).

    Args:
        q: ``(B, H_q, L_q, D)``; k, v: ``(B, H_kv, L_k, D)``; any strides.
        window: sliding window (``causal`` only): query ``i`` sees the ``window`` keys ending at
            its own position ``i + L_k - L_q``.
    Returns:
        ``(B, H_q, L_q, D)`` in ``q.dtype``.
    """
    from turbo_kernels.quantize import quantize_int8_blockwise

    _check(q, k, v)
    if window is not None and (not causal or window < 1):
        raise ValueError(f"window={window!r}: a sliding window needs causal=True and window >= 1")
    if math_cfg.sparse_ratio is not None:
        raise ValueError("the prefill kernel does not implement top-k sparsity (sparse_ratio)")
    if math_cfg.pv_int8 and math_cfg.block_size % block_n:
        raise ValueError(f"INT8 P·V needs the V quantization block ({math_cfg.block_size}) to be a "
                         f"multiple of the key tile ({block_n})")
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    out_dtype = q.dtype
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dummy = torch.empty(1, 1, 1, dtype=torch.float32, device=q.device)
    qs = ks = vs = dummy
    if math_cfg.qk_int8:
        if math_cfg.smooth_k:
            k = k - k.float().mean(dim=-2, keepdim=True).to(k.dtype)
        q8 = quantize_int8_blockwise(q, math_cfg.block_size)
        k8 = quantize_int8_blockwise(k, math_cfg.block_size)
        q, qs, k, ks = q8.values, q8.scale, k8.values, k8.scale
    if math_cfg.pv_int8:
        v8 = quantize_int8_blockwise(v, math_cfg.block_size)
        v, vs = v8.values, v8.scale
    elif not math_cfg.qk_int8 and q.dtype != v.dtype:
        raise ValueError(f"query dtype {q.dtype} differs from value dtype {v.dtype}")
    sas_cfg = math_cfg.sas
    coeffs, lut = kernel_args(sas_cfg, q.device)
    lut = dummy if lut is None else lut
    o = torch.empty(b, hq, lq, d, dtype=out_dtype, device=q.device)
    grid = (triton.cdiv(lq, block_m), b * hq)
    _prefill_kernel[grid](
        q, k, v, qs, ks, vs, lut, o,
        *q.stride(), *k.stride(), *v.stride(),
        *qs.stride(), *ks.stride(), *vs.stride(),
        *o.stride(),
        hq, hq // hkv, lq, lk, d, window or 0, scale,
        coeffs[0], coeffs[1], coeffs[2], coeffs[3],
        LUT_MAX=sas_cfg.lut_max if sas_cfg else 0, DEGREE=sas_cfg.degree if sas_cfg else 3,
        USE_SAS=sas_cfg is not None, QK_INT8=math_cfg.qk_int8, PV_INT8=math_cfg.pv_int8,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
    )
    return o
