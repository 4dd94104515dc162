"""Prompt chunks over the packed cache on CPU: BLAS for the two products, one fused numba
pass for the softmax.

A prompt chunk has hundreds of query rows per KV head — GEMM sizes, where BLAS beats the decode
kernel's loops. Per sequence the history is decompressed to INT8 rows (integer only, as the
reference does) and put in token order, so the keys a new token sees — causal, and inside a
sliding window — are one range of rows; ``Q·Kᵀ`` runs on the INT8 codes held in float (exact:
the sums stay below 2^24), then :func:`_softmax_rows` applies the causal limit, the row max, SAS (LUT ·
polynomial, zero past the LUT) or ``exp``, and the normalisation in one parallel pass, and
``P·V`` is a second GEMM. The same math as the reference, in fewer passes over the scores.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import njit, prange

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.packed import PackedKV, check_query, int8_rows, positions
from turbo_core.attention.quant import Int8Rows, quantize_int8_blockwise
from turbo_core.attention.sas import kernel_args
from turbo_kernels.cpu_rows import _FAST, NEG, row_weights


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def _softmax_rows(s, lo_of, hi_of, use_sas, lut, c0, c1, c2, c3, lut_max, counts):
    """``s (R, L_k)`` scores in place -> normalised weights. Row ``r`` is new token
    ``i = r % len(lo_of)``: it sees keys ``lo_of[i] <= t < hi_of[i]`` (causal and windowed)."""
    rows, lk = s.shape
    lq = lo_of.shape[0]
    for r in prange(rows):
        lo, hi = lo_of[r % lq], hi_of[r % lq]
        mx = np.float32(NEG)
        for t in range(lo, hi):
            mx = max(mx, s[r, t])
        total, zeros = row_weights(s, r, lo, hi, mx, use_sas, lut, c0, c1, c2, c3, lut_max)
        inv = np.float32(1.0) / total
        for t in range(lo, hi):
            s[r, t] *= inv
        for t in range(hi, lk):
            s[r, t] = 0.0
        counts[r, 0] = zeros
        counts[r, 1] = hi - lo


def prefill_attention_cpu(q: torch.Tensor, cache: PackedKV, *, math_cfg: AttentionMath,
                          scale: float | None = None) -> tuple[torch.Tensor, int, int]:
    """Attention of the ``L_q`` newest tokens of each sequence (causal among themselves) over
    ``cache``, which holds them. ``q (B, H_q, L_q, D)`` float CPU. Returns the output and the
    weights SAS zeroed and the valid positions (as the reference counts them)."""
    check_query(q, cache, math_cfg)
    if math_cfg.pv_int8:
        raise ValueError("prefill_attention_cpu does not implement INT8 P·V; use the reference")
    b, hq, lq, d = q.shape
    hkv = cache.num_heads
    g = hq // hkv
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    sas = math_cfg.sas
    if sas is not None:
        coeffs, lut = kernel_args(sas, torch.device("cpu"))
        lut_np = np.append(lut.numpy(), np.float32(0.0))
    else:
        coeffs, lut_np = [0.0] * 4, np.zeros(1, np.float32)
    c0, c1, c2, c3 = (np.float32(c) for c in coeffs)
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    outs, dropped, total = [], 0, 0
    for i in range(b):
        k8, v8 = int8_rows(cache, i)  # (H_kv, L, D) int8 codes, (H_kv, L) scales
        pos, order = positions(cache, i).sort()
        k8, v8 = (Int8Rows(r.values.index_select(1, order), r.scale.index_select(1, order))
                  for r in (k8, v8))
        newest = pos[-1] - lq + 1 + torch.arange(lq)
        hi = torch.searchsorted(pos, newest, right=True)
        lo = torch.zeros_like(hi) if cache.window is None else \
            torch.searchsorted(pos, newest - cache.window + 1)
        qi = q[i: i + 1]
        if math_cfg.qk_int8:
            qq = quantize_int8_blockwise(qi, math_cfg.block_size)
            qv = qq.values.float().reshape(hkv, g * lq, d)
            s = torch.bmm(qv, k8.values.float().transpose(1, 2))  # exact integer sums
            s = s * qq.scale.reshape(hkv, g * lq, 1) * k8.scale.unsqueeze(1)
        else:
            kf = k8.dequantize()
            s = torch.bmm(qi.float().reshape(hkv, g * lq, d), kf.transpose(1, 2))
        s = (s * sm_scale).reshape(hkv * g * lq, -1).contiguous()
        counts = np.zeros((s.shape[0], 2), np.int64)
        _softmax_rows(s.numpy(), lo.numpy(), hi.numpy(), sas is not None, lut_np, c0, c1, c2, c3,
                      float(sas.lut_max) if sas else 0.0, counts)
        out = torch.bmm(s.reshape(hkv, g * lq, -1), v8.dequantize())
        outs.append(out.reshape(1, hq, lq, d))
        dropped, total = dropped + int(counts[:, 0].sum()), total + int(counts[:, 1].sum())
    return torch.cat(outs).to(q.dtype), dropped, total
