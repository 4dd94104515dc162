"""Triton kernel: float → blockwise symmetric INT8 (stage 1 of progressive quantization).

Reference: ``turbo_core.attention.quant.quantize_int8_blockwise`` (bit-exact: same scale, and rounding
half to even like ``torch.round``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbo_core.attention.quant import Int8Rows


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _int8_block_kernel(
    x_ptr, q_ptr, s_ptr,
    stride_xb, stride_xl, stride_xd,
    stride_qb, stride_ql, stride_qd,
    stride_sb, stride_sl,
    L, D, QMAX,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (token block, flattened leading index). ``x (N, L, D)`` float,
    ``q (N, L, D)`` int8, ``s (N, L)`` float32 per-row scale (constant within a block)."""
    pid_l = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_l * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < L) & (cols[None, :] < D)
    x = tl.load(x_ptr + pid_n * stride_xb + rows[:, None] * stride_xl + cols[None, :] * stride_xd,
                mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax / QMAX, 1.0)
    q = _round_half_even(x / scale)
    q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    tl.store(q_ptr + pid_n * stride_qb + rows[:, None] * stride_ql + cols[None, :] * stride_qd,
             q.to(tl.int8), mask=mask)
    tl.store(s_ptr + pid_n * stride_sb + rows * stride_sl,
             tl.zeros([BLOCK], dtype=tl.float32) + scale, mask=rows < L)


def quantize_int8_blockwise(x: torch.Tensor, block_size: int = 64, qmax: int = 127) -> Int8Rows:
    """Triton twin of ``turbo_core.attention.quant.quantize_int8_blockwise`` for ``x (..., L, D)``."""
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"quantize_int8_blockwise needs a float (..., L, D) tensor, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"the Triton quantizer needs a power-of-two block_size, got {block_size}")
    if not 1 <= qmax <= 127:
        raise ValueError(f"qmax must be in [1, 127], got {qmax}")
    *lead, length, dim = x.shape
    if dim > 1024:
        raise ValueError(f"head_dim {dim} > 1024 is not supported by the Triton quantizer")
    x3 = x.reshape(-1, length, dim)  # a view when possible; strides are passed through
    n = x3.shape[0]
    q = torch.empty(n, length, dim, dtype=torch.int8, device=x.device)
    s = torch.empty(n, length, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(length, block_size), n)
    _int8_block_kernel[grid](
        x3, q, s,
        x3.stride(0), x3.stride(1), x3.stride(2),
        q.stride(0), q.stride(1), q.stride(2),
        s.stride(0), s.stride(1),
        length, dim, float(qmax),
        BLOCK=block_size, BLOCK_D=triton.next_power_of_2(dim),
    )
    return Int8Rows(q.reshape(*lead, length, dim), s.reshape(*lead, length))


@triton.jit
def _lowbit_pack_kernel(
    x_ptr, p_ptr, s_ptr, lo_ptr,
    stride_xn, stride_xd, stride_xt,
    stride_pn, stride_pd, stride_pt,
    stride_sn, stride_sd, stride_st,
    BITS: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr,
    ALONG_TOKENS: tl.constexpr,
):
    """Grid ``(N,)``: compress one int8 chunk ``x (D, CHUNK)`` (channels × tokens) to ``BITS``.

    Groups run along tokens (K: per channel) or along channels (V: per token). Integer scale
    ``S = max(1, ceil((hi - lo) / levels))``, ``code = (2 (x - lo) + S) // (2 S)``; codes are packed
    planar along tokens: byte ``j`` holds tokens ``j + k·M`` in bits ``[k·BITS, (k+1)·BITS)``.
    """
    n = tl.program_id(0)
    d = tl.arange(0, D)
    t = tl.arange(0, CHUNK)
    x = tl.load(x_ptr + n * stride_xn + d[:, None] * stride_xd + t[None, :] * stride_xt).to(tl.int32)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    if ALONG_TOKENS:
        g = tl.reshape(x, [D, CHUNK // GROUP, GROUP])
        lo = tl.min(g, axis=2)
        hi = tl.max(g, axis=2)
        scale = tl.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)
        codes = (2 * (g - lo[:, :, None]) + scale[:, :, None]) // (2 * scale[:, :, None])
        codes = tl.reshape(codes, [D, CHUNK])
        sg = tl.arange(0, CHUNK // GROUP)
        s_ptrs = n * stride_sn + d[:, None] * stride_sd + sg[None, :] * stride_st
    else:
        g = tl.reshape(x, [D // GROUP, GROUP, CHUNK])
        lo = tl.min(g, axis=1)
        hi = tl.max(g, axis=1)
        scale = tl.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)
        codes = (2 * (g - lo[:, None, :]) + scale[:, None, :]) // (2 * scale[:, None, :])
        codes = tl.reshape(codes, [D, CHUNK])
        sg = tl.arange(0, D // GROUP)
        s_ptrs = n * stride_sn + sg[:, None] * stride_sd + t[None, :] * stride_st
    tl.store(s_ptr + s_ptrs, scale.to(tl.uint8))
    tl.store(lo_ptr + s_ptrs, lo.to(tl.int8))
    PER: tl.constexpr = 8 // BITS
    M: tl.constexpr = CHUNK // PER
    parts = tl.reshape(codes, [D, PER, M])
    shifts = (tl.arange(0, PER) * BITS)[None, :, None]
    packed = tl.sum(parts << shifts, axis=1)  # disjoint bit fields: sum == or
    m = tl.arange(0, M)
    tl.store(p_ptr + n * stride_pn + d[:, None] * stride_pd + m[None, :] * stride_pt,
             packed.to(tl.uint8))


def compress_chunk(q8: torch.Tensor, bits: int, group: int, along_tokens: bool):
    """Triton twin of the cache's chunk compression (``quantize_lowbit`` + ``pack``).

    Args:
        q8: int8 ``(B, n, D, chunk)`` (channels × tokens per head); D, chunk, group powers of two.
        group: tokens per group (``along_tokens``, K) or channels per group (V).
    Returns:
        ``(packed (B, n, D, chunk·bits/8) uint8, scale uint8, low int8)`` with the reference's
        shapes: ``(B, n, D, chunk / group)`` for K, ``(B, n, D / group, chunk)`` for V.
    """
    if q8.dtype != torch.int8 or q8.dim() != 4:
        raise ValueError(f"compress_chunk needs int8 (B, n, D, chunk), got {q8.dtype} {tuple(q8.shape)}")
    if bits not in (2, 4):
        raise ValueError(f"compress_chunk compresses to 2 or 4 bits, got {bits}")
    b, n, d, c = q8.shape
    for name, val in (("head_dim", d), ("chunk", c), ("group", group)):
        if val < 1 or val & (val - 1):
            raise ValueError(f"compress_chunk needs a power-of-two {name}, got {val}")
    span = c if along_tokens else d
    if group > span:
        raise ValueError(f"group {group} larger than the grouped axis ({span})")
    x = q8.reshape(b * n, d, c)
    packed = torch.empty(b * n, d, c * bits // 8, dtype=torch.uint8, device=q8.device)
    s_shape = (b * n, d, c // group) if along_tokens else (b * n, d // group, c)
    scale = torch.empty(s_shape, dtype=torch.uint8, device=q8.device)
    low = torch.empty(s_shape, dtype=torch.int8, device=q8.device)
    _lowbit_pack_kernel[(b * n,)](
        x, packed, scale, low, *x.stride(), *packed.stride(), *scale.stride(),
        BITS=bits, D=d, CHUNK=c, GROUP=group, ALONG_TOKENS=along_tokens,
    )
    return (packed.reshape(b, n, d, -1), scale.reshape(b, n, *s_shape[1:]),
            low.reshape(b, n, *s_shape[1:]))
