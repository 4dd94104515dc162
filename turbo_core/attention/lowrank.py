"""Low-rank attention along the sequence (Linformer, Wang et al., 2020): K and V of ``L`` tokens
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
    if mask is not None:
        if mask.dim() != 4 or mask.shape[1:3] != (1, 1) or mask.shape[3] != length:
            raise ValueError(f"low-rank attention takes a key padding mask (B, 1, 1, L) only, "
                             f"got {tuple(mask.shape)}")
        keep = mask if mask.dtype == torch.bool else torch.isfinite(mask)
        keep = keep.reshape(mask.shape[0], 1, length, 1).to(k.dtype)
        k, v = k * keep, v * keep
    return (e[:, :length].to(k.dtype) @ k, f[:, :length].to(v.dtype) @ v)
