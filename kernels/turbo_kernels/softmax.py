"""The online-softmax step both attention kernels share, with the SAS exponent (docs/design.md §1.1).

``online_softmax_step`` turns one tile of scaled scores into unnormalised weights against the
running row max; the caller rescales its accumulators by ``alpha`` and adds ``p·V`` and
``sum(p)``. With ``USE_SAS`` the weights come from ``LUT[n] · P(f)`` (``-x = n + f``), exactly 0
past the table; otherwise from ``tl.exp``. Only ``alpha`` (one per row and tile) uses ``exp``.

Reference: ``turbo_core.attention.sas.sas_exp``; the LUT and coefficients come from
``turbo_core.attention.sas.kernel_args``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def sas_exp(x, lut_ptr, C0, C1, C2, C3, LUT_MAX: tl.constexpr, DEGREE: tl.constexpr):
    """e^x for x <= 0 (or -inf): LUT[floor(-x)] * P(frac(-x)), exactly 0 past the LUT."""
    neg = tl.minimum(-x, LUT_MAX + 1.0)  # -inf (masked) -> past the table, and no inf - inf
    n = tl.floor(neg)
    f = neg - n
    keep = n <= LUT_MAX
    idx = tl.where(keep, n, 0.0).to(tl.int32)
    table = tl.load(lut_ptr + idx)
    if DEGREE == 3:
        poly = ((C3 * f + C2) * f + C1) * f + C0
    else:
        poly = (C2 * f + C1) * f + C0
    return tl.where(keep, table * poly, 0.0)


@triton.jit
def online_softmax_step(s, m_i, lut_ptr, C0, C1, C2, C3, LUT_MAX: tl.constexpr,
                        DEGREE: tl.constexpr, USE_SAS: tl.constexpr):
    """``s (M, N)`` scaled scores (``-inf`` where masked), ``m_i (M,)`` the running max.

    Returns ``p (M, N) = e^(s - m_new)``, ``alpha (M,) = e^(m_i - m_new)`` and ``m_new``; rows
    with nothing valid yet keep ``m_new = -inf`` and get ``p = 0``, ``alpha = 1`` (no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    x = s - m_safe[:, None]
    if USE_SAS:
        p = sas_exp(x, lut_ptr, C0, C1, C2, C3, LUT_MAX, DEGREE)
    else:
        p = tl.exp(x)
    alpha = tl.exp(m_i - m_safe)
    return p, alpha, m_new


def merge_partials(m: torch.Tensor, l_: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Exact merge of online-softmax partials over their last axis ``S`` (context splits):
    ``m, l (..., S)`` running max and sum, ``acc (..., S, D)``; returns ``(..., D)``. Empty
    splits (``m`` = -inf or a large negative sentinel) get weight 0."""
    top = m.amax(dim=-1, keepdim=True)
    w = torch.exp(m - top).nan_to_num(0.0)
    return (acc * w.unsqueeze(-1)).sum(dim=-2) / (l_ * w).sum(dim=-1, keepdim=True)
