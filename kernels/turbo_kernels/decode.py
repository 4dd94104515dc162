"""Decode attention over the packed KV cache (flash-decoding): the new query tokens of each
sequence (one when decoding, a prompt chunk in chunked prefill) against its INT4/INT2/INT8
pages plus the INT8 recent-token buffer, through the view's page tables.

Codes are unpacked and decompressed to INT8 in registers (``q8 = clamp(code·S + lo)``, integer
only); no dequantized copy of the cache is written. The context is split across programs; each
split keeps its own running max, and the partial results are merged with exact rescaling.
Query heads sharing a KV head (GQA), times the new tokens, are the rows of one ``tl.dot``; the
buffer kernel masks causally among the new tokens. A sliding window (``PackedKV.window``) masks
each key by its token position (page ``c`` of the held ones starts at ``first_pos + c·CHUNK``;
buffer row ``t`` sits at ``t`` below ``SINKS``, else at ``tail_shift + t``).

Reference: ``turbo_core.attention.reference.decode_attention_reference``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.packed import PackedKV, check_query
from turbo_core.attention.sas import kernel_args
from turbo_kernels.softmax import merge_partials, online_softmax_step

MAX_ROWS = 256  # query rows per KV head in one tile (query heads per KV head x new tokens)


@triton.jit
def _update(q, q_scale, k8, k_scale_row, v, valid, m_i, l_i, acc, sm_scale, lut_ptr,
            C0, C1, C2, C3, LUT_MAX: tl.constexpr, DEGREE: tl.constexpr,
            USE_SAS: tl.constexpr, QK_INT8: tl.constexpr):
    """One tile of keys: ``q (G, D)``, ``k8 (D, N)`` int8 codes with per-key float scale
    ``k_scale_row (N,)``, ``v (N, D)`` float; ``valid (G, N)`` or ``(1, N)``."""
    if QK_INT8:
        s = tl.dot(q, k8.to(tl.int8), out_dtype=tl.int32).to(tl.float32)
        s = s * q_scale[:, None] * k_scale_row[None, :]
    else:
        s = tl.dot(q, k8.to(tl.float32) * k_scale_row[None, :], input_precision="ieee")
    s = tl.where(valid, s * sm_scale, float("-inf"))
    p, alpha, m_new = online_softmax_step(s, m_i, lut_ptr, C0, C1, C2, C3, LUT_MAX, DEGREE, USE_SAS)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    l_i = l_i * alpha + tl.sum(p, axis=1)
    return m_new, l_i, acc


@triton.jit
def _query_rows(q_ptr, qs_ptr, b, hk, stride_qb, stride_qh, stride_qd, stride_qsb, stride_qsh,
                GROUP, HEAD_DIM, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The ``GROUP`` query heads of KV head ``hk`` as the rows of a ``(BLOCK_G, BLOCK_D)`` tile."""
    rows = tl.arange(0, BLOCK_G)
    r_ok = rows < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    hq = hk * GROUP + rows
    q = tl.load(q_ptr + b * stride_qb + hq[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=r_ok[:, None] & d_ok[None, :], other=0)
    q_scale = tl.load(qs_ptr + b * stride_qsb + hq * stride_qsh, mask=r_ok, other=0.0)
    return q, q_scale, hq, r_ok, offs_d, d_ok


@triton.jit
def _store_partial(m_ptr, l_ptr, acc_ptr, b, hq, slot, m_i, l_i, acc, r_ok, offs_d, d_ok,
                   stride_mb, stride_mh, stride_ms, stride_ab, stride_ah, stride_as, stride_ad):
    base = b * stride_mb + hq * stride_mh + slot * stride_ms
    tl.store(m_ptr + base, m_i, mask=r_ok)
    tl.store(l_ptr + base, l_i, mask=r_ok)
    tl.store(acc_ptr + b * stride_ab + hq[:, None] * stride_ah + slot * stride_as
             + offs_d[None, :] * stride_ad, acc, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_chunks_kernel(
    q_ptr, qs_ptr, heads_ptr, pt_ptr, nc_ptr, fp_ptr, qp_ptr,
    kp_ptr, ksc_ptr, klo_ptr, kf_ptr, vp_ptr, vsc_ptr, vlo_ptr, vf_ptr,
    lut_ptr, m_ptr, l_ptr, acc_ptr,
    stride_qb, stride_qh, stride_qd, stride_qsb, stride_qsh, stride_ptb, stride_ptc,
    stride_kpp, stride_kph, stride_kpd, stride_kpt,
    stride_kscp, stride_ksch, stride_kscd, stride_ksct,
    stride_kfp, stride_kfh,
    stride_vpp, stride_vph, stride_vpd, stride_vpt,
    stride_vscp, stride_vsch, stride_vscg, stride_vsct,
    stride_vfp, stride_vfh,
    stride_mb, stride_mh, stride_ms, stride_ab, stride_ah, stride_as, stride_ad,
    N_HEADS, GROUP, HEAD_DIM, CHUNKS_PER_SPLIT, LQ, WINDOW, sm_scale, C0, C1, C2, C3,
    BITS: tl.constexpr, CHUNK: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    LUT_MAX: tl.constexpr, DEGREE: tl.constexpr, USE_SAS: tl.constexpr, QK_INT8: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(n_splits, B * N_HEADS)``: split ``s`` of sequence ``b``'s pages
    (``pt_ptr[b, :nc_ptr[b]]``) for one KV head (``heads_ptr[i]``, row ``i`` of the pool).
    ``fp_ptr[b]``: position of held page 0's first key; ``qp_ptr[b]``: position of new token 0
    (row ``r`` is new token ``r % LQ``); ``WINDOW`` 0 = no sliding window.
    Writes partial ``m, l (B, H_q, S)``, ``acc (B, H_q, S, D)``."""
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // N_HEADS
    i = pid % N_HEADS
    hk = tl.load(heads_ptr + i)
    q, q_scale, hq, r_ok, offs_d, d_ok = _query_rows(
        q_ptr, qs_ptr, b, hk, stride_qb, stride_qh, stride_qd, stride_qsb, stride_qsh,
        GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    PER: tl.constexpr = 8 // BITS
    M_BYTES: tl.constexpr = CHUNK // PER
    MASK: tl.constexpr = (1 << BITS) - 1
    t = tl.arange(0, CHUNK)
    j = t % M_BYTES
    sh = (t // M_BYTES) * BITS
    first_pos = tl.load(fp_ptr + b)
    # oldest key position each row sees (-1: all of them)
    oldest = tl.load(qp_ptr + b) + tl.arange(0, BLOCK_G) % LQ - WINDOW + 1
    oldest = tl.where(WINDOW > 0, oldest, -1)
    c_lo = split * CHUNKS_PER_SPLIT
    c_hi = tl.minimum(c_lo + CHUNKS_PER_SPLIT, tl.load(nc_ptr + b))
    for c in range(c_lo, c_hi):
        page = tl.load(pt_ptr + b * stride_ptb + c * stride_ptc).to(tl.int64)
        # K tile (D, CHUNK): bytes hold tokens j, j + M_BYTES, ... (planar packing)
        kb = tl.load(kp_ptr + page * stride_kpp + i * stride_kph + offs_d[:, None] * stride_kpd
                     + j[None, :] * stride_kpt, mask=d_ok[:, None], other=0)
        kb = kb.to(tl.int32)
        vb = tl.load(vp_ptr + page * stride_vpp + i * stride_vph + offs_d[None, :] * stride_vpd
                     + j[:, None] * stride_vpt, mask=d_ok[None, :], other=0)
        vb = vb.to(tl.int32)
        if BITS == 8:
            k8 = tl.where(kb > 127, kb - 256, kb)
            v8 = tl.where(vb > 127, vb - 256, vb)
        else:
            kg = (t // K_GROUP)[None, :]
            k_s = tl.load(ksc_ptr + page * stride_kscp + i * stride_ksch + offs_d[:, None] * stride_kscd
                          + kg * stride_ksct, mask=d_ok[:, None], other=0).to(tl.int32)
            k_lo = tl.load(klo_ptr + page * stride_kscp + i * stride_ksch + offs_d[:, None] * stride_kscd
                           + kg * stride_ksct, mask=d_ok[:, None], other=0).to(tl.int32)
            k8 = ((kb >> sh[None, :]) & MASK) * k_s + k_lo
            k8 = tl.minimum(tl.maximum(k8, -127), 127)
            vg = (offs_d // V_GROUP)[None, :]
            vt = t[:, None]
            v_s = tl.load(vsc_ptr + page * stride_vscp + i * stride_vsch + vg * stride_vscg
                          + vt * stride_vsct, mask=d_ok[None, :], other=0).to(tl.int32)
            v_lo = tl.load(vlo_ptr + page * stride_vscp + i * stride_vsch + vg * stride_vscg
                           + vt * stride_vsct, mask=d_ok[None, :], other=0).to(tl.int32)
            v8 = ((vb >> sh[:, None]) & MASK) * v_s + v_lo
            v8 = tl.minimum(tl.maximum(v8, -127), 127)
        k_first = tl.load(kf_ptr + page * stride_kfp + i * stride_kfh)
        v_first = tl.load(vf_ptr + page * stride_vfp + i * stride_vfh)
        k_row = tl.zeros([CHUNK], dtype=tl.float32) + k_first
        valid = (first_pos + c * CHUNK + t)[None, :] >= oldest[:, None]
        m_i, l_i, acc = _update(q, q_scale, k8, k_row, v8.to(tl.float32) * v_first, valid,
                                m_i, l_i, acc, sm_scale, lut_ptr, C0, C1, C2, C3,
                                LUT_MAX, DEGREE, USE_SAS, QK_INT8)
    _store_partial(m_ptr, l_ptr, acc_ptr, b, hq, split, m_i, l_i, acc, r_ok, offs_d, d_ok,
                   stride_mb, stride_mh, stride_ms, stride_ab, stride_ah, stride_as, stride_ad)


@triton.jit
def _decode_buffer_kernel(
    q_ptr, qs_ptr, kb_ptr, ksb_ptr, vb_ptr, vsb_ptr, bl_ptr, ts_ptr, qp_ptr, lut_ptr, m_ptr, l_ptr,
    acc_ptr,
    stride_qb, stride_qh, stride_qd, stride_qsb, stride_qsh,
    stride_kb, stride_kh, stride_kt, stride_kd, stride_ksb, stride_ksh, stride_kst,
    stride_vb, stride_vh, stride_vt, stride_vd, stride_vsb, stride_vsh, stride_vst,
    stride_mb, stride_mh, stride_ms, stride_ab, stride_ah, stride_as, stride_ad,
    H_KV, GROUP, HEAD_DIM, SLOT, LQ, SINKS, WINDOW, sm_scale, C0, C1, C2, C3,
    LUT_MAX: tl.constexpr, DEGREE: tl.constexpr, USE_SAS: tl.constexpr, QK_INT8: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid ``(1, B * H_KV)``: the ``bl_ptr[b]`` buffered INT8 rows (per-token scales) of
    sequence ``b`` into partial slot ``SLOT``. Query row ``r`` is new token ``r % LQ``, which
    sees buffered rows ``t <= n_buf - LQ + r % LQ`` (causal among the new tokens) and, with a
    ``WINDOW``, none before position ``qp_ptr[b] + r % LQ - WINDOW + 1`` (row ``t`` sits at
    ``t`` below ``SINKS``, else at ``ts_ptr[b] + t``)."""
    pid = tl.program_id(1)
    b = pid // H_KV
    hk = pid % H_KV
    q, q_scale, hq, r_ok, offs_d, d_ok = _query_rows(
        q_ptr, qs_ptr, b, hk, stride_qb, stride_qh, stride_qd, stride_qsb, stride_qsh,
        GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    t = tl.arange(0, BLOCK_N)
    n_buf = tl.load(bl_ptr + b)
    t_ok = t < n_buf
    k8 = tl.load(kb_ptr + b * stride_kb + hk * stride_kh + t[None, :] * stride_kt
                 + offs_d[:, None] * stride_kd, mask=t_ok[None, :] & d_ok[:, None], other=0)
    k_row = tl.load(ksb_ptr + b * stride_ksb + hk * stride_ksh + t * stride_kst, mask=t_ok, other=0.0)
    v8 = tl.load(vb_ptr + b * stride_vb + hk * stride_vh + t[:, None] * stride_vt
                 + offs_d[None, :] * stride_vd, mask=t_ok[:, None] & d_ok[None, :], other=0)
    v_row = tl.load(vsb_ptr + b * stride_vsb + hk * stride_vsh + t * stride_vst, mask=t_ok, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    causal = t[None, :] <= n_buf - LQ + (tl.arange(0, BLOCK_G) % LQ)[:, None]
    pos = tl.where(t < SINKS, t, tl.load(ts_ptr + b) + t)
    oldest = tl.load(qp_ptr + b) + tl.arange(0, BLOCK_G) % LQ - WINDOW + 1
    causal = causal & ((pos[None, :] >= oldest[:, None]) | (WINDOW == 0))
    m_i, l_i, acc = _update(q, q_scale, k8.to(tl.int32), k_row, v8.to(tl.float32) * v_row[:, None],
                            t_ok[None, :] & causal, m_i, l_i, acc, sm_scale, lut_ptr, C0, C1, C2, C3,
                            LUT_MAX, DEGREE, USE_SAS, QK_INT8)
    _store_partial(m_ptr, l_ptr, acc_ptr, b, hq, SLOT, m_i, l_i, acc, r_ok, offs_d, d_ok,
                   stride_mb, stride_mh, stride_ms, stride_ab, stride_ah, stride_as, stride_ad)


def decode_attention(
    q: torch.Tensor,
    cache: PackedKV,
    *,
    math_cfg: AttentionMath,
    scale: float | None = None,
    chunks_per_split: int = 8,
) -> torch.Tensor:
    """Attention of the ``L_q`` newest tokens of each sequence over ``cache`` (which already holds
    them; with ``L_q > 1`` they are causal among themselves and must all be buffered). The
    ``G · L_q`` query rows of a KV head (``G`` = query heads per KV head) are the rows of one
    tile, at most ``MAX_ROWS``.

    Args:
        q: ``(B, H_q, L_q, D)`` float; ``H_q`` a multiple of the cache's KV heads.
        cache: the tensor-only view of one cache layer (``QuantizedKVLayer.view()``).
        chunks_per_split: compressed chunks per program (the flash-decoding split).
    Returns:
        ``(B, H_q, L_q, D)`` in ``q.dtype``.
    """
    from turbo_kernels.quantize import quantize_int8_blockwise

    check_query(q, cache, math_cfg)
    b, hq, lq, d = q.shape
    hkv = cache.num_heads
    if chunks_per_split < 1:
        raise ValueError(f"chunks_per_split must be >= 1, got {chunks_per_split}")
    if hq // hkv * lq > MAX_ROWS:
        raise ValueError(f"{hq // hkv} query heads per KV head x {lq} new tokens = "
                         f"{hq // hkv * lq} rows; the decode kernel takes at most {MAX_ROWS}")
    group = hq // hkv * lq  # rows per KV head: (query head, new token) flattened
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if math_cfg.qk_int8:
        qi = quantize_int8_blockwise(q, math_cfg.block_size)
        q3, qs = qi.values.reshape(b, hq * lq, d), qi.scale.reshape(b, hq * lq)
    else:
        q3 = q.float().reshape(b, hq * lq, d)
        qs = torch.ones(b, hq * lq, dtype=torch.float32, device=q.device)
    n_splits = max(1, math.ceil(int(cache.n_chunks.max()) / chunks_per_split))
    first_pos, tail_shift = cache.offsets()  # (B,) positions of page 0's key 0; of buffer rows
    qpos0 = torch.tensor(cache.seq_lens, device=q.device) - lq  # (B,) position of new token 0
    window = cache.window or 0
    slots = n_splits + 1  # the last slot is the buffer's
    m = torch.full((b, hq * lq, slots), float("-inf"), dtype=torch.float32, device=q.device)
    l_ = torch.zeros(b, hq * lq, slots, dtype=torch.float32, device=q.device)
    acc = torch.zeros(b, hq * lq, slots, d, dtype=torch.float32, device=q.device)
    sas_cfg = math_cfg.sas
    coeffs, lut = kernel_args(sas_cfg, q.device)
    lut = m if lut is None else lut  # never read without SAS
    common = dict(LUT_MAX=sas_cfg.lut_max if sas_cfg else 0, DEGREE=sas_cfg.degree if sas_cfg else 3,
                  USE_SAS=sas_cfg is not None, QK_INT8=math_cfg.qk_int8,
                  BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(d))
    out_strides = (*m.stride(), *acc.stride())
    for g in cache.groups:
        # 8-bit heads have no second level: any uint8 tensor stands in (never read)
        ks, kl = (g.k_scale, g.k_low) if g.bits != 8 else (g.k_packed, g.k_packed)
        vs, vl = (g.v_scale, g.v_low) if g.bits != 8 else (g.v_packed, g.v_packed)
        n_heads = g.heads.numel()
        _decode_chunks_kernel[(n_splits, b * n_heads)](
            q3, qs, g.heads, cache.page_table, cache.n_chunks, first_pos, qpos0,
            g.k_packed, ks, kl, g.k_first, g.v_packed, vs, vl, g.v_first,
            lut, m, l_, acc,
            *q3.stride(), *qs.stride(), *cache.page_table.stride(),
            *g.k_packed.stride(), *ks.stride(), *g.k_first.stride(),
            *g.v_packed.stride(), *vs.stride(), *g.v_first.stride(),
            *out_strides,
            n_heads, group, d, chunks_per_split, lq, window, scale, *coeffs,
            BITS=g.bits, CHUNK=cache.chunk, K_GROUP=g.k_group, V_GROUP=g.v_group,
            **common,
        )
    rows = int(cache.buffer_len.max())
    if rows:
        kb, vb = cache.buffer_k, cache.buffer_v
        _decode_buffer_kernel[(1, b * hkv)](
            q3, qs, kb.values, kb.scale, vb.values, vb.scale, cache.buffer_len, tail_shift, qpos0,
            lut, m, l_, acc,
            *q3.stride(), *qs.stride(),
            *kb.values.stride(), *kb.scale.stride(), *vb.values.stride(), *vb.scale.stride(),
            *out_strides,
            hkv, group, d, n_splits, lq, cache.sinks, window, scale, *coeffs,
            BLOCK_N=max(16, triton.next_power_of_2(rows)), **common,
        )
    return merge_partials(m, l_, acc).reshape(b, hq, lq, d).to(q.dtype)
