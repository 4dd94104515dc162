"""Triton kernel: float → blockwise symmetric INT8 (stage 1 of progressive quantization).

Reference: ``turbo_core.quant.quantize_int8_blockwise`` (bit-exact: same scale, and rounding
half to even like ``torch.round``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turbo_core.quant import Int8Rows


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
    """Triton twin of ``turbo_core.quant.quantize_int8_blockwise`` for ``x (..., L, D)``."""
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
