"""Fused attention of new tokens over the packed KV cache on CPU (numba, AVX2 by LLVM).

Programs run in parallel over (sequence, KV head, context split). A program walks its pages:
the planar codes of one page are unpacked into a local ``(D, c)`` tile, the integer second
level is applied (``q8 = clamp(code·S + lo, ±127)``), the scores of every query row of the
GQA group (times the ``L_q`` new tokens) against the page's ``c`` keys are one blocked loop,
then the online softmax (SAS exponent or ``exp``) and P·V against the page's V tile. The INT8
buffer is read row-major in place, with the causal mask among the new tokens. A sliding window
(``PackedKV.window``) masks keys by position: positions rise along a page and along the buffer,
so the keys a row sees in a tile are one range ``[lo, hi)``. Nothing the size of the history is
ever written; per program the locals are two ``(D, c)`` tiles, the scores ``(R, c)`` and the
accumulators ``(R, D)``. Splits are merged exactly (``_merge``).

Why numba: it compiles these loops to vectorized machine code at first use (cached on disk),
ships as a wheel (no compiler in the serving image, unlike a C++ extension), and runs the
GQA rows and the integer decompression in one pass; ``torch.compile`` of unpack + einsum
materializes K and measured slower than SDPA here (docs/design.md §4).

Reference: ``turbo_core.attention.reference.decode_attention_reference`` (same math, final
row max instead of a running one).
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
from numba import njit, prange

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.packed import PackedKV, check_query
from turbo_core.attention.quant import quantize_int8_blockwise
from turbo_core.attention.sas import kernel_args
from turbo_kernels.cpu_rows import _FAST, NEG, row_weights

_IN_ORDER = _FAST - {"reassoc"}
PAGES_PER_SPLIT = 8  # context split = 8 pages (512 tokens at chunk 64), whatever the batch


@njit(fastmath=_FAST, inline="always")
def _softmax_pv(s, nt, valid_from, valid_to, m, l_, acc, v_tile, use_sas, lut, c0, c1, c2, c3,
                lut_max, counts, job):
    """Online-softmax update of rows ``r`` with scores ``s[r, :nt]`` (keys outside
    ``[valid_from[r], valid_to[r])`` masked) and float values ``v_tile (D, nt)``.
    ``counts[job]`` += (SAS zeros, valid keys)."""
    rows, dim = acc.shape
    for r in range(rows):
        lo = max(0, valid_from[r])
        hi = min(nt, valid_to[r])
        if hi <= lo:
            continue
        mx = np.float32(NEG)
        for t in range(lo, hi):
            mx = max(mx, s[r, t])
        m_new = max(m[r], mx)
        alpha = np.float32(math.exp(m[r] - m_new))
        total, zeros = row_weights(s, r, lo, hi, m_new, use_sas, lut, c0, c1, c2, c3, lut_max)
        l_[r] = l_[r] * alpha + total
        counts[job, 0] += zeros
        counts[job, 1] += hi - lo
        for d in range(dim):
            dot = np.float32(0.0)
            for t in range(lo, hi):
                dot += s[r, t] * v_tile[d, t]
            acc[r, d] = acc[r, d] * alpha + dot
        m[r] = m_new


@njit(fastmath=_FAST, inline="always")
def _dequant_row(src, p, i, d, bits, sc, lo, dst):
    """Channel ``d`` of page ``p``, head row ``i``: planar codes ``src[p, i, d]`` uint8
    ``(c·bits/8,)`` -> ``dst[d]`` float32 ``(c,)`` = ``clamp(code·sc + lo, ±127)`` with
    per-token ``sc, lo`` float32 (exact: integers below 2^24); at 8 bits the bytes are the INT8
    codes. Byte j holds tokens j, j + m, ...: one loop per bit plane, each storing a contiguous
    run, is what LLVM vectorizes (one loop storing j and j + m is not)."""
    lo_c, hi_c = np.float32(-127.0), np.float32(127.0)
    m = src.shape[3]
    if bits == 8:
        for j in range(m):
            x = np.int32(src[p, i, d, j])
            dst[d, j] = np.float32(x - 256 if x > 127 else x)
        return
    mask = (1 << bits) - 1
    for plane in range(8 // bits):
        base, shift = plane * m, plane * bits
        for j in range(m):
            code = np.float32((np.int32(src[p, i, d, j]) >> shift) & mask)
            dst[d, base + j] = min(max(code * sc[base + j] + lo[base + j], lo_c), hi_c)


@njit(fastmath=_FAST, inline="always")
def _dequant_k_planes(src, p, i, d, bits, ksc, klo, k_group, dst):
    """Like :func:`_dequant_row` for K when each bit plane lies in one token group (``k_group``
    a multiple of the plane length): one scalar (scale, offset) per plane."""
    lo_c, hi_c = np.float32(-127.0), np.float32(127.0)
    m = src.shape[3]
    mask = (1 << bits) - 1
    for plane in range(8 // bits):
        base, shift = plane * m, plane * bits
        gi = base // k_group
        a, z = np.float32(ksc[p, i, d, gi]), np.float32(klo[p, i, d, gi])
        for j in range(m):
            code = np.float32((np.int32(src[p, i, d, j]) >> shift) & mask)
            dst[d, base + j] = min(max(code * a + z, lo_c), hi_c)


@njit(fastmath=_FAST, inline="always")
def _load_k(kp, ksc, klo, p, i, bits, k_group, planes_in_one_group, sc_t, lo_t, k8):
    """Page ``p``'s K codes of head row ``i`` -> ``k8 (D, c)`` float INT8 values. K's second
    level is one (scale, offset) per channel and group of ``k_group`` tokens."""
    dim, chunk = k8.shape
    if bits != 8 and planes_in_one_group:
        for d in range(dim):
            _dequant_k_planes(kp, p, i, d, bits, ksc, klo, k_group, k8)
    elif bits != 8:
        for d in range(dim):  # groups smaller than a plane: per-token (scale, offset)
            for gi in range(chunk // k_group):
                a, z = np.float32(ksc[p, i, d, gi]), np.float32(klo[p, i, d, gi])
                for t in range(gi * k_group, gi * k_group + k_group):
                    sc_t[t] = a
                    lo_t[t] = z
            _dequant_row(kp, p, i, d, bits, sc_t, lo_t, k8)
    else:
        for d in range(dim):
            _dequant_row(kp, p, i, d, bits, sc_t, lo_t, k8)


@njit(fastmath=_FAST, inline="always")
def _load_v(vp, vsc, vlo, p, i, bits, v_group, sc_t, lo_t, v8):
    """Page ``p``'s V codes of head row ``i`` -> ``v8 (D, c)``; V's second level is one
    (scale, offset) per token and group of ``v_group`` channels."""
    dim, chunk = v8.shape
    for gi in range(dim // v_group):
        if bits != 8:
            for t in range(chunk):
                sc_t[t] = np.float32(vsc[p, i, gi, t])
                lo_t[t] = np.float32(vlo[p, i, gi, t])
        for d in range(gi * v_group, gi * v_group + v_group):
            _dequant_row(vp, p, i, d, bits, sc_t, lo_t, v8)


@njit(fastmath=_FAST, inline="always")
def _program_state(q, qs, b, hk, group):
    """Query rows ``r = g·L_q + i`` of KV head ``hk`` (query head ``hk·G + g``, new token
    ``i``) with their scales, and the running max, sum and accumulator of each row."""
    lq, dim = q.shape[2], q.shape[3]
    rows = group * lq
    qr = np.empty((rows, dim), np.float32)
    qsr = np.empty(rows, np.float32)
    for g in range(group):
        for i in range(lq):
            qr[g * lq + i, :] = q[b, hk * group + g, i, :]
            qsr[g * lq + i] = qs[b, hk * group + g, i]
    return qr, qsr, np.full(rows, NEG, np.float32), np.zeros(rows, np.float32), \
        np.zeros((rows, dim), np.float32)


@njit(fastmath=_FAST, inline="always")
def _store_partial(m_out, l_out, acc_out, b, hk, group, slot, m, l_, acc):
    lq = m_out.shape[2]
    for g in range(group):
        for i in range(lq):
            r = g * lq + i
            m_out[b, hk * group + g, i, slot] = m[r]
            l_out[b, hk * group + g, i, slot] = l_[r]
            acc_out[b, hk * group + g, i, slot, :] = acc[r, :]


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def _pages_pass(q, qs, group, heads, table, n_chunks, splits, step, kp, ksc, klo, kf, vp, vsc,
                vlo, vf, bits, k_group, v_group, sm_scale, use_sas, lut, c0, c1, c2, c3, lut_max,
                m_out, l_out, acc_out, counts, first_pos, qpos0, window):
    """Grid ``B · n · splits``. q ``(B, H_q, L_q, D)`` float32 (INT8 codes when quantized),
    qs ``(B, H_q, L_q)`` row scales; pages as in ``PackedKV``; partials ``(B, H_q, L_q, S+1[, D])``.
    ``first_pos[b]``: position of held page 0's first key; ``qpos0[b]``: position of new token
    0; ``window``: sliding window, 0 for none. Each job is one call of :func:`_pages_job`."""
    nb = q.shape[0]
    n = heads.shape[0]
    for job in prange(nb * n * splits):
        _pages_job(job, q, qs, group, heads, table, n_chunks, splits, step, kp, ksc, klo, kf, vp,
                   vsc, vlo, vf, bits, k_group, v_group, sm_scale, use_sas, lut, c0, c1, c2, c3,
                   lut_max, m_out, l_out, acc_out, counts, first_pos, qpos0, window)


@njit(fastmath=_FAST, cache=True, nogil=True)
def _pages_job(job, q, qs, group, heads, table, n_chunks, splits, step, kp, ksc, klo, kf, vp,
               vsc, vlo, vf, bits, k_group, v_group, sm_scale, use_sas, lut, c0, c1, c2, c3, lut_max,
               m_out, l_out, acc_out, counts, first_pos, qpos0, window):
    """One program: split ``sp`` of sequence ``b``'s pages for head row ``i``."""
    _, _, lq, dim = q.shape
    n = heads.shape[0]
    chunk = kp.shape[3] * 8 // bits
    rows = group * lq
    b = job // (n * splits)
    i = (job // splits) % n
    sp = job % splits
    hk = heads[i]
    nc = n_chunks[b]
    c_lo, c_hi = min(nc, sp * step), min(nc, sp * step + step)
    qr, qsr, m, l_, acc = _program_state(q, qs, b, hk, group)
    k8 = np.empty((dim, chunk), np.float32)
    v8 = np.empty((dim, chunk), np.float32)
    s = np.empty((rows, chunk), np.float32)
    sc_t = np.ones(chunk, np.float32)  # per-token second level of one channel
    lo_t = np.zeros(chunk, np.float32)
    all_valid = np.full(rows, chunk, np.int64)
    valid_from = np.zeros(rows, np.int64)
    planes_in_one_group = k_group % kp.shape[3] == 0
    for c in range(c_lo, c_hi):
        p = table[b, c]
        if window > 0:  # key t of this page sits at first_pos + c·chunk + t
            for r in range(rows):
                valid_from[r] = qpos0[b] + r % lq - window + 1 - (first_pos[b] + c * chunk)
            if valid_from.min() >= chunk:
                continue  # no row of this program sees this page
        # the bit width as a literal in each branch: the plane loops unroll and vectorize
        if bits == 4:
            _load_k(kp, ksc, klo, p, i, 4, k_group, planes_in_one_group, sc_t, lo_t, k8)
        elif bits == 2:
            _load_k(kp, ksc, klo, p, i, 2, k_group, planes_in_one_group, sc_t, lo_t, k8)
        else:
            _load_k(kp, ksc, klo, p, i, 8, k_group, planes_in_one_group, sc_t, lo_t, k8)
        for r in range(rows):
            for t in range(chunk):
                s[r, t] = 0.0
            for d in range(dim):
                qv = qr[r, d]
                for t in range(chunk):
                    s[r, t] += qv * k8[d, t]
            f = np.float32(qsr[r] * kf[p, i] * sm_scale)
            for t in range(chunk):
                s[r, t] *= f
        if bits == 4:
            _load_v(vp, vsc, vlo, p, i, 4, v_group, sc_t, lo_t, v8)
        elif bits == 2:
            _load_v(vp, vsc, vlo, p, i, 2, v_group, sc_t, lo_t, v8)
        else:
            _load_v(vp, vsc, vlo, p, i, 8, v_group, sc_t, lo_t, v8)
        vscale = vf[p, i]
        for d in range(dim):
            for t in range(chunk):
                v8[d, t] *= vscale
        _softmax_pv(s, chunk, valid_from, all_valid, m, l_, acc, v8, use_sas, lut, c0, c1, c2, c3,
                    lut_max, counts, job)
    _store_partial(m_out, l_out, acc_out, b, hk, group, sp, m, l_, acc)


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def _buffer_pass(q, qs, group, bk, bks, bv, bvs, blen, slot, sm_scale, use_sas, lut, c0, c1, c2,
                 c3, lut_max, m_out, l_out, acc_out, counts, sinks, tail_shift, qpos0, window):
    """Grid ``B · H_kv``: the buffered INT8 rows ``bk/bv (B, H_kv, rows, D)``, scales
    ``(B, H_kv, rows)``, ``blen[b]`` of them; query ``i`` of ``L_q`` sees rows ``<= blen - L_q + i``
    and, with a ``window`` (0: none), none before position ``qpos0[b] + i - window + 1``. Row
    ``t`` sits at position ``t`` if ``t < sinks``, else ``tail_shift[b] + t``."""
    nb, _, lq, dim = q.shape
    h_kv = bk.shape[1]
    rows = group * lq
    block = 64
    for job in prange(nb * h_kv):
        b = job // h_kv
        hk = job % h_kv
        n_rows = blen[b]
        qr, qsr, m, l_, acc = _program_state(q, qs, b, hk, group)
        s = np.empty((rows, block), np.float32)
        v_tile = np.empty((dim, block), np.float32)
        valid_to = np.empty(rows, np.int64)
        valid_from = np.zeros(rows, np.int64)
        for start in range(0, n_rows, block):
            nt = min(block, n_rows - start)
            for t in range(nt):
                w = bvs[b, hk, start + t]
                for d in range(dim):
                    v_tile[d, t] = bv[b, hk, start + t, d] * w
            for r in range(rows):
                valid_to[r] = n_rows - lq + r % lq + 1 - start  # causal among the new tokens
                if window > 0:  # the first row at or past the window's first position
                    first = qpos0[b] + r % lq - window + 1
                    at = first if first < sinks else max(sinks, first - tail_shift[b])
                    valid_from[r] = at - start
                for t in range(nt):
                    dot = 0.0
                    for d in range(dim):
                        dot += qr[r, d] * bk[b, hk, start + t, d]
                    s[r, t] = dot * qsr[r] * bks[b, hk, start + t] * sm_scale
            _softmax_pv(s, nt, valid_from, valid_to, m, l_, acc, v_tile, use_sas, lut, c0, c1, c2,
                        c3, lut_max, counts, job)
        _store_partial(m_out, l_out, acc_out, b, hk, group, slot, m, l_, acc)


@njit(fastmath=_IN_ORDER, cache=True, nogil=True)
def _merge(m, l_, acc, out):
    """Exact merge of the splits: ``m, l (B, H_q, L_q, S)``, ``acc (..., S, D)`` -> ``out``.
    Summed in split order (no reassociation): empty splits add exact zeros, so the result does
    not depend on how many splits the batch's longest sequence needed."""
    nb, hq, lq, n_split = m.shape
    dim = acc.shape[-1]
    for b in range(nb):
        for h in range(hq):
            for i in range(lq):
                top = np.float32(NEG)
                for sp in range(n_split):
                    top = max(top, m[b, h, i, sp])
                den = np.float32(0.0)
                out[b, h, i, :] = 0.0
                for sp in range(n_split):
                    w = np.float32(math.exp(m[b, h, i, sp] - top))
                    den += l_[b, h, i, sp] * w
                    for x in range(dim):
                        out[b, h, i, x] += acc[b, h, i, sp, x] * w
                for x in range(dim):
                    out[b, h, i, x] /= den


@functools.cache
def _sas_tables(sas) -> tuple[np.ndarray, tuple[float, ...]]:
    """The LUT plus one 0 past its end (weights beyond T cut without a branch), coefficients."""
    if sas is None:
        return np.zeros(1, np.float32), (0.0, 0.0, 0.0, 0.0)
    coeffs, lut = kernel_args(sas, torch.device("cpu"))
    return np.append(lut.numpy(), np.float32(0.0)), tuple(coeffs)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.numpy() if t.is_contiguous() else t.contiguous().numpy()


def decode_attention_cpu(q: torch.Tensor, cache: PackedKV, *, math_cfg: AttentionMath,
                         scale: float | None = None, splits: int | None = None,
                         count: bool = False) -> torch.Tensor | tuple[torch.Tensor, int, int]:
    """Attention of the ``L_q`` newest tokens of each sequence over ``cache`` (which holds
    them; with ``L_q > 1`` they are causal among themselves and must all be in the buffer).

    Args:
        q: ``(B, H_q, L_q, D)`` float CPU tensor; ``H_q`` a multiple of the KV heads.
        cache: the tensor-only view of one layer (``QuantizedKVLayer.view()``).
        splits: context splits per (sequence, KV head); default: one per ``PAGES_PER_SPLIT``
            pages, so a sequence's result is the same whatever else shares the batch (a
            server's batched tokens equal one-at-a-time tokens).
        count: also return the weights SAS zeroed and the valid positions. Zeros are cut
            against running maxima (never above the final one), so they are a subset of the
            reference's: a lower bound on its ``sas_dropped``.
    Returns:
        ``(B, H_q, L_q, D)`` in ``q.dtype`` (and the two counts with ``count``).
    """
    check_query(q, cache, math_cfg)
    if q.device.type != "cpu":
        raise ValueError(f"decode_attention_cpu takes CPU tensors, got {q.device}")
    b, hq, lq, d = q.shape
    group = hq // cache.num_heads
    sm_scale = 1.0 / math.sqrt(d) if scale is None else scale
    if math_cfg.qk_int8:  # the same blockwise INT8 of the queries as the reference
        qi = quantize_int8_blockwise(q, math_cfg.block_size)
        qf, qs = qi.values.float(), qi.scale
    else:
        qf, qs = q.float(), torch.ones(b, hq, lq)
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    table, n_chunks, buffer_len = _np(cache.page_table), _np(cache.n_chunks), _np(cache.buffer_len)
    first_pos, tail_shift = (t.numpy() for t in cache.offsets())
    qpos0, window = np.array(cache.seq_lens, np.int64) - lq, cache.window or 0
    most = int(n_chunks.max())
    if splits is None:  # fixed pages per split: a sequence's sums do not depend on its batch
        step = PAGES_PER_SPLIT
        splits = max(1, -(-most // step))
    else:
        step = max(1, -(-most // splits))
    m = np.full((b, hq, lq, splits + 1), NEG, np.float32)
    l_ = np.zeros((b, hq, lq, splits + 1), np.float32)
    acc = np.zeros((b, hq, lq, splits + 1, d), np.float32)
    sas = math_cfg.sas
    lut, coeffs = _sas_tables(sas)
    lut_max = float(sas.lut_max) if sas else 0.0
    qn, qsn = _np(qf), _np(qs)
    counts = np.zeros((max(b * cache.num_heads * splits, 1), 2), np.int64)
    for g in cache.groups if most else ():
        kp, vp = _np(g.k_packed), _np(g.v_packed)
        if g.bits == 8:  # no second level; typed stand-ins, never read
            ksc = vsc = np.zeros((1, 1, 1, 1), np.uint8)
            klo = vlo = np.zeros((1, 1, 1, 1), np.int8)
        else:
            ksc, klo, vsc, vlo = (_np(t) for t in (g.k_scale, g.k_low, g.v_scale, g.v_low))
        _pages_pass(qn, qsn, group, _np(g.heads), table, n_chunks, splits, step, kp, ksc, klo,
                    _np(g.k_first), vp, vsc, vlo, _np(g.v_first), g.bits, g.k_group,
                    g.v_group, sm_scale, sas is not None, lut, *coeffs, lut_max, m, l_, acc,
                    counts, first_pos, qpos0, window)
    if int(buffer_len.max()):
        kb, vb = cache.buffer_k, cache.buffer_v
        _buffer_pass(qn, qsn, group, _np(kb.values), _np(kb.scale), _np(vb.values), _np(vb.scale),
                     buffer_len, splits, sm_scale, sas is not None, lut, *coeffs, lut_max, m, l_,
                     acc, counts, cache.sinks, tail_shift, qpos0, window)
    out = np.empty((b, hq, lq, d), np.float32)
    _merge(m, l_, acc, out)
    out = torch.from_numpy(out).to(q.dtype)
    if not count:
        return out
    return out, int(counts[:, 0].sum()), int(counts[:, 1].sum())
