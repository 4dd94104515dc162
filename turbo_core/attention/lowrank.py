"""Low rank, twice: Linformer's attention along the sequence, and the KV cache's bases along the
channels (``KVQuantConfig.low_rank``: :func:`check_cache_basis`; calibrated by
``turbo_core.hf.lowrank``).

Low-rank attention along the sequence (Linformer, Wang et al., 2020): K and V of ``L`` tokens
are projected by learned ``(r, n)`` matrices ``E`` and ``F`` to ``r`` rows, ``K' = E[:, :L] K``,
``V' = F[:, :L] V``, and every query attends over those ``r`` rows — O(L·r) instead of O(L²).

The projections mix tokens, so the layer is not causal and ``n`` (``max_seq_len``) bounds the
sequence it takes; ``TurboAttention`` holds ``E`` and ``F`` as parameters (one pair per layer,
shared by the heads: Linformer's head-wise sharing) and trains them with the rest.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from turbo_core.attention.linear import padding_keep


def init_projections(rank: int, max_seq_len: int, *, device=None, dtype=None) -> nn.ParameterList:
    """``[E, F]``, each ``(rank, max_seq_len)`` drawn from N(0, 1/rank) (Linformer's init)."""
    params = []
    for _ in range(2):
        w = torch.empty(rank, max_seq_len, device=device, dtype=dtype)
        nn.init.normal_(w, std=1.0 / math.sqrt(rank))
        params.append(nn.Parameter(w))
    return nn.ParameterList(params)


def project(k: torch.Tensor, v: torch.Tensor, proj: tuple[torch.Tensor, torch.Tensor] | None,
            *, causal: bool, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E K, F V)`` for ``k, v (B, H, L, D)``; a key padding mask (``(B, 1, 1, L)``: bool True =
    keep, or 0 / -inf) zeroes the padded tokens' rows before they are mixed."""
    if proj is None:
        raise ValueError("low-rank attention needs its learned projections (E, F): use "
                         "TurboAttention, or pass seq_proj=(E, F) to turbo_attention")
    if causal:
        raise ValueError("low-rank (Linformer) attention mixes tokens along the sequence, so it "
                         "cannot be causal; use kernel attention for a causal O(L) layer")
    e, f = proj
    length = k.shape[2]
    if length > e.shape[1]:
        raise ValueError(f"sequence of {length} tokens exceeds the low-rank projections' "
                         f"max_seq_len {e.shape[1]}")
    keep = padding_keep(mask, k.shape[0], length, "low-rank attention")
    if keep is not None:
        k, v = k * keep.to(k.dtype), v * keep.to(v.dtype)
    return (e[:, :length].to(k.dtype) @ k, f[:, :length].to(v.dtype) @ v)


def check_cache_basis(basis: tuple[torch.Tensor, torch.Tensor] | None, rank: int | None, heads: int,
                      dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A cache layer's ``(U_K, U_V)``, each ``(heads, dim, rank)`` with orthonormal columns, as
    float32; ``None`` without ``low_rank``. Refuses a missing, misshapen or skewed basis."""
    if rank is None:
        if basis is not None:
            raise ValueError("a low-rank basis was given but KVQuantConfig.low_rank is not set")
        return None
    if basis is None:
        raise ValueError(f"KVQuantConfig.low_rank={rank} needs the calibrated bases of K and V "
                         f"(turbo_core.hf.lowrank.calibrate_bases, carried by the bit plan)")
    for name, u in zip(("K", "V"), basis, strict=True):
        if tuple(u.shape) != (heads, dim, rank):
            raise ValueError(f"low-rank basis of {name} has shape {tuple(u.shape)}, expected "
                             f"({heads}, {dim}, {rank})")
        eye = torch.eye(rank, dtype=torch.float64)
        if not torch.allclose(u.double().transpose(-1, -2) @ u.double(), eye.expand(heads, -1, -1),
                              atol=1e-4):
            raise ValueError(f"low-rank basis of {name} does not have orthonormal columns")
    return tuple(u.float() for u in basis)
