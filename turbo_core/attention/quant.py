"""Progressive quantization (docs/design.md §1.2): blockwise symmetric INT8, then asymmetric INT4/INT2
with integer second-level scales.

Stage 1 — symmetric INT8 per block of tokens per head:
    s = max|x_block| / qmax,   q = clamp(round(x / s), -qmax, qmax),   x ~= s * q.
Stage 2 — asymmetric low-bit over INT8 groups, all in integers:
    lo = min(q8_group),  S = max(1, ceil((max - lo) / (2^b - 1))),
    code = floor((2 * (q8 - lo) + S) / (2 * S))         (round half up, integer only)
    q8' = clamp(code * S + lo, -127, 127)                (integer-only partial decompression)
so ``|q8 - q8'| <= S / 2``. A reconstruction exceeds its group's max by at most
``min(S / 2, 2^b - 2)``: with the first-level range protected to ``±119`` that is at most
119 + 8 = 127 for INT4 and 119 + 2 = 121 for INT2, so decompression stays inside int8 and the
clamp (saturation) only ever acts on inputs outside the protective range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbo_core.attention.config import check_bits


@dataclass(frozen=True)
class Int8Rows:
    """INT8 values with one float scale per row (token): ``x ~= values * scale[..., None]``.

    Blockwise quantization stores the block's scale on every row of the block, so one type
    covers blockwise tensors and per-token ones (the recent-token buffer).

    Attributes:
        values: int8, shape ``(..., L, D)``.
        scale: float32, shape ``(..., L)``.
    """

    values: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.values.to(dtype) * self.scale.to(dtype).unsqueeze(-1)


def quantize_int8_blockwise(x: torch.Tensor, block_size: int = 64, qmax: int = 127) -> Int8Rows:
    """Symmetric INT8 with one scale per ``block_size`` consecutive rows (tokens).

    Args:
        x: float tensor ``(..., L, D)``; the last two dims are tokens and channels, every
            leading dim (batch, head) gets its own scales. ``L`` need not divide ``block_size``.
        block_size: rows per scale. ``1`` gives per-token scales.
        qmax: largest code; 127 for attention operands, 119 before INT4/INT2 compression.

    Returns:
        :class:`Int8Rows`; an all-zero block gets scale 1 (its codes are 0, exactly).
    """
    if x.dim() < 2:
        raise ValueError(f"quantize_int8_blockwise needs (..., L, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"quantize_int8_blockwise needs a float tensor, got {x.dtype}")
    if block_size < 1 or not 1 <= qmax <= 127:
        raise ValueError(f"bad block_size={block_size} or qmax={qmax} (need >= 1 and 1..127)")
    *lead, length, dim = x.shape
    if block_size == 1 or length <= block_size:  # one scale per row, or one for all rows
        xf = x.float()
        amax = xf.abs().amax(dim=-1) if block_size == 1 else xf.abs().amax(dim=(-2, -1))
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        row_scale = scale if block_size == 1 else scale.unsqueeze(-1).expand(*lead, length)
        values = torch.round(xf / row_scale.unsqueeze(-1)).clamp_(-qmax, qmax)
        return Int8Rows(values.to(torch.int8), row_scale.contiguous())
    n_blocks = -(-length // block_size)
    pad = n_blocks * block_size - length
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    blocks = xf.reshape(*lead, n_blocks, block_size * dim)
    amax = blocks.abs().amax(dim=-1)  # (..., n_blocks)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    row_scale = scale.repeat_interleave(block_size, dim=-1)[..., :length]  # (..., L)
    values = torch.round(x.float() / row_scale.unsqueeze(-1)).clamp_(-qmax, qmax)
    return Int8Rows(values.to(torch.int8), row_scale.contiguous())


def quantize_int8_channels(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 with one scale per channel over all rows: ``x ~= values * scale[..., None, :]``.

    Args:
        x: float ``(..., L, D)``; each leading dim and each channel gets its own scale.
        qmax: largest code (119 before INT4/INT2 compression).

    Returns:
        ``(values int8 (..., L, D), scale float32 (..., D))``; an all-zero channel gets scale 1.
    """
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"quantize_int8_channels needs a float (..., L, D), got {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    if not 1 <= qmax <= 127:
        raise ValueError(f"bad qmax={qmax} (need 1..127)")
    xf = x.float()
    amax = xf.abs().amax(dim=-2)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    values = torch.round(xf / scale.unsqueeze(-2)).clamp_(-qmax, qmax)
    return values.to(torch.int8), scale.contiguous()


@dataclass(frozen=True)
class LowBit:
    """Asymmetric low-bit codes of an INT8 tensor, grouped along one axis.

    Attributes:
        codes: uint8 in ``[0, 2^bits - 1]``, same shape as the INT8 input.
        scale: uint8 integer scales ``S >= 1``, the input shape with the group axis divided
            by ``group``.
        low: int8 group minimum (the integer zero offset), same shape as ``scale``.
        bits, group, dim: the grouping used.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor
    bits: int
    group: int
    dim: int


def _grouped(t: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """View ``t`` with axis ``dim`` split into ``(n_groups, group)`` and moved last."""
    moved = t.movedim(dim, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // group, group)


def _ungrouped(g: torch.Tensor, dim: int) -> torch.Tensor:
    return g.reshape(*g.shape[:-2], g.shape[-2] * g.shape[-1]).movedim(-1, dim)


def quantize_lowbit(q8: torch.Tensor, bits: int, dim: int, group: int) -> LowBit:
    """Compress INT8 codes to ``bits`` (2 or 4) with integer scales and offsets per group.

    Args:
        q8: int8 tensor; groups run along axis ``dim`` (K: the token axis, one group per
            channel; V: the channel axis, one group per token).
        bits: 2 or 4.
        dim: the grouped axis; its size must be a multiple of ``group``.
        group: elements per group.
    """
    if bits not in (2, 4):
        raise ValueError(f"quantize_lowbit compresses to 2 or 4 bits, got {bits!r}")
    if q8.dtype != torch.int8:
        raise ValueError(f"quantize_lowbit needs int8 input, got {q8.dtype}")
    dim = dim % q8.dim()
    if group < 1 or q8.shape[dim] % group:
        raise ValueError(
            f"group {group} must divide axis {dim} of shape {tuple(q8.shape)} for low-bit groups"
        )
    levels = (1 << bits) - 1
    g = _grouped(q8.to(torch.int32), dim, group)
    lo = g.amin(dim=-1, keepdim=True)
    hi = g.amax(dim=-1, keepdim=True)
    scale = torch.clamp((hi - lo + levels - 1) // levels, min=1)  # ceil((hi - lo) / levels)
    codes = (2 * (g - lo) + scale) // (2 * scale)  # round half up, integer only
    return LowBit(
        codes=_ungrouped(codes, dim).to(torch.uint8),
        scale=scale.squeeze(-1).movedim(-1, dim).to(torch.uint8),
        low=lo.squeeze(-1).movedim(-1, dim).to(torch.int8),
        bits=bits,
        group=group,
        dim=dim,
    )


def dequantize_lowbit(lb: LowBit, saturate: bool = True) -> torch.Tensor:
    """Integer-only partial decompression back to INT8: ``clamp(code * S + lo, -127, 127)``.

    Returns int8 (or int16 with ``saturate=False``, to inspect the unclamped values).
    """
    g = _grouped(lb.codes.to(torch.int16), lb.dim, lb.group)
    s = lb.scale.movedim(lb.dim, -1).to(torch.int16).unsqueeze(-1)
    lo = lb.low.movedim(lb.dim, -1).to(torch.int16).unsqueeze(-1)
    q8 = _ungrouped(g * s + lo, lb.dim)
    if not saturate:
        return q8
    return q8.clamp_(-127, 127).to(torch.int8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide codes along the last axis, ``8 // bits`` per byte.

    Planar layout (kernel friendly): with ``m = N / (8 // bits)``, byte ``j`` holds the codes
    at positions ``j, j + m, j + 2m, ...`` in bits ``[0, b), [b, 2b), ...``. Unpacking is then
    a concatenation of shifted copies instead of an interleave.

    Args:
        codes: uint8 ``(..., N)`` with values ``< 2^bits``; ``N`` a multiple of ``8 // bits``.
        bits: 2, 4 or 8 (8 returns the codes unchanged).
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise ValueError(f"pack needs uint8 codes, got {codes.dtype}")
    if bits == 8:
        return codes.clone()
    per = 8 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"pack: last axis {n} is not a multiple of {per} for {bits}-bit codes")
    if bool((codes >> bits).any()):
        raise ValueError(f"pack: codes exceed {bits} bits (max {int(codes.max())})")
    parts = codes.split(n // per, dim=-1)
    out = parts[0].clone()
    for k, part in enumerate(parts[1:], start=1):
        out |= part << (k * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``(..., N / (8 // bits))`` to codes ``(..., N)``."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack needs uint8 bytes, got {packed.dtype}")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    return torch.cat([(packed >> (k * bits)) & mask for k in range(8 // bits)], dim=-1)
