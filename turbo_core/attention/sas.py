"""SAS: the sparsity-based softmax approximation of TurboAttention (docs/design.md §1.1).

For ``x = s - rowmax <= 0`` split ``-x = n + f`` with integer ``n >= 0`` and ``f in [0, 1)``:

    e^x = e^{-n} * e^{-f}  ~=  LUT[n] * P(f),   LUT[n] = e^{-n} for n = 0..T,

and the weight is exactly 0 where ``n > T`` (the table ends there: that is the sparsity).
No hardware ``exp`` is evaluated on the scores. ``P`` is a degree-2 or degree-3 polynomial,
fitted by least squares to ``e^{-f}`` on [0, 1).

Higher-order forms (``SASConfig.pieces`` / ``lut_steps``, the article's next step): with
``s = lut_steps`` and ``k = pieces``, ``-x * s * k = m + t`` (``m`` integer, ``t in [0, 1)``),
``n = m // k`` and ``i = m % k``; then ``e^x ~= LUT_s[n] * P_i(t)`` with ``LUT_s[n] = e^{-n/s}``
and ``P_i`` the least-squares fit of ``e^{-(i + t) / (s k)}`` on [0, 1). Still one floor, one
table entry and one polynomial per weight; the cut-off (``floor(-x) > T`` drops) is the same.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from turbo_core.attention.config import SASConfig

# The cubic published with TurboAttention, ascending powers. Our least-squares fit on [0, 1)
# agrees with it to within 3e-4 per coefficient (tested); both have max relative error ~1e-3.
PUBLISHED_CUBIC = (0.9996, -0.9922, 0.4626, -0.1025)

_FIT_SAMPLES = 4096


@functools.lru_cache(maxsize=64)
def fit_pieces(degree: int, pieces: int = 1, lut_steps: int = 1) -> tuple[tuple[float, ...], ...]:
    """Least-squares polynomials ``P_i(t) ~= e^{-(i + t) / (lut_steps * pieces)}`` on
    ``t in [0, 1)``, one per piece, ascending coefficients (module docstring).

    Reproducible: a fixed grid of ``_FIT_SAMPLES`` midpoints in float64, solved by numpy's
    ``polyfit`` (QR-based least squares), no randomness.
    """
    t = (np.arange(_FIT_SAMPLES, dtype=np.float64) + 0.5) / _FIT_SAMPLES
    width = lut_steps * pieces
    return tuple(tuple(float(c) for c in np.polynomial.polynomial.polyfit(
        t, np.exp(-(i + t) / width), degree)) for i in range(pieces))


def fit_exp_poly(degree: int) -> tuple[float, ...]:
    """Least-squares polynomial for ``e^{-f}`` on [0, 1), ascending coefficients."""
    return fit_pieces(degree)[0]


def poly_coeffs(cfg: SASConfig) -> tuple[float, ...]:
    """The coefficients of the single-polynomial form (explicit ones, else the fit)."""
    if cfg.pieces != 1 or cfg.lut_steps != 1:
        raise ValueError(f"SAS with pieces={cfg.pieces}, lut_steps={cfg.lut_steps} has no single "
                         f"polynomial; use piece_coeffs")
    return cfg.coeffs if cfg.coeffs is not None else fit_exp_poly(cfg.degree)


def piece_coeffs(cfg: SASConfig) -> tuple[tuple[float, ...], ...]:
    """One coefficient tuple per piece (a single one for the plain form)."""
    if cfg.pieces == 1 and cfg.lut_steps == 1:
        return (poly_coeffs(cfg),)
    return fit_pieces(cfg.degree, cfg.pieces, cfg.lut_steps)


def max_cutoff(cfg: SASConfig) -> int:
    return max(cfg.head_lut_max) if cfg.head_lut_max is not None else cfg.lut_max


def lut(cfg: SASConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[e^{-0/s}, e^{-1/s}, ..., e^{-((T + 1) s - 1)/s}]`` rounded once to ``dtype``
    (``s = lut_steps``; for ``s = 1`` that is ``e^{-0} .. e^{-T}``). Shape ``((T + 1) s,)``."""
    s = cfg.lut_steps
    table = torch.exp(-torch.arange((max_cutoff(cfg) + 1) * s, dtype=torch.float64) / s)
    return table.to(dtype=dtype, device=device)


def kernel_args(cfg: SASConfig | None, device: torch.device | str = "cpu"
                ) -> tuple[list[float], torch.Tensor | None]:
    """What the fused kernels take for SAS: four polynomial coefficients ``c0..c3`` (a quadratic
    is zero-padded) and the float32 LUT; ``([0, 0, 0, 0], None)`` without SAS. The kernels
    read only the single-polynomial form: others are refused here by name."""
    if cfg is None:
        return [0.0] * 4, None
    blocker = cfg.kernel_blocker()
    if blocker:
        raise ValueError(f"the fused kernels read one SAS polynomial and the unit LUT, not "
                         f"{blocker}; run it on the reference backend")
    return [*poly_coeffs(cfg), 0.0, 0.0, 0.0][:4], lut(cfg, torch.float32, device)


def _horner(f: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    acc = torch.full_like(f, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * f + c
    return acc


def _pieces_horner(t: torch.Tensor, piece: torch.Tensor, coeffs: tuple[tuple[float, ...], ...]
                   ) -> torch.Tensor:
    table = torch.tensor(coeffs, dtype=t.dtype, device=t.device)  # (pieces, degree + 1)
    acc = table[:, -1][piece]
    for j in range(table.shape[1] - 2, -1, -1):
        acc = acc * t + table[:, j][piece]
    return acc


def sas_exp(x: torch.Tensor, cfg: SASConfig, lut_max: torch.Tensor | int | None = None
            ) -> torch.Tensor:
    """Approximate ``exp(x)`` for ``x <= 0`` the SAS way, in ``x.dtype``.

    Args:
        x: any shape, float16/bfloat16/float32/float64, every element ``<= 0`` or ``-inf``
            (masked positions). ``-inf`` and NaN give weight 0.
        lut_max: the cut-off ``T`` (default ``cfg.lut_max``), or a tensor broadcastable to
            ``x`` (per-head cut-offs); at most the table's last exponent.

    Returns:
        Tensor of ``x``'s shape and dtype; exactly 0 where ``floor(-x) > T``.
    """
    if not x.is_floating_point():
        raise ValueError(f"sas_exp needs a floating-point tensor, got {x.dtype}")
    if bool((x > 0).any()):
        raise ValueError(
            f"sas_exp is defined for x <= 0 (scores minus the row max); max(x) = {x.max().item()}"
        )
    neg = -x
    cut = cfg.lut_max if lut_max is None else lut_max
    table = lut(cfg, x.dtype, x.device)
    if cfg.pieces == 1 and cfg.lut_steps == 1:
        n = torch.floor(neg)
        f = neg - n  # exact: n is the integer part of neg
        keep = n <= cut  # False for +inf and NaN
        idx = torch.where(keep, n, torch.zeros_like(n)).to(torch.long)
        # f is NaN where x = -inf (inf - inf): zero it, so the discarded branch of the final
        # where has a finite derivative and a mask gives zero gradient, not NaN
        f = torch.where(keep, f, torch.zeros_like(f))
        approx = table[idx] * _horner(f, poly_coeffs(cfg))
        return torch.where(keep, approx, torch.zeros_like(approx))
    k = cfg.pieces
    keep = torch.floor(neg) <= cut
    v = torch.where(keep, neg, torch.zeros_like(neg)) * float(cfg.lut_steps * k)
    m = torch.floor(v).clamp_(max=table.numel() * k - 1)  # a rounding up at the range's end
    t = (v - m).clamp(0.0, 1.0)
    mi = m.to(torch.long)
    approx = table[mi // k] * _pieces_horner(t, mi % k, piece_coeffs(cfg))
    return torch.where(keep, approx, torch.zeros_like(approx))


def sparsity_mask(x: torch.Tensor, cfg: SASConfig, lut_max: torch.Tensor | int | None = None
                  ) -> torch.Tensor:
    """True where SAS drops a weight (``floor(-x) > T``), given finite ``x <= 0``."""
    return torch.floor(-x) > (cfg.lut_max if lut_max is None else lut_max)


@dataclass(frozen=True)
class SASStats:
    """What an SAS config costs: worst relative error of its exponent and sparsity."""

    max_rel_error: float
    zero_fraction: float


def poly_max_rel_error(cfg: SASConfig, samples: int = 200_001) -> float:
    """Max relative error of the exponent on ``-x in [0, 1)`` in float64 (the math, no
    rounding): the LUT is exact there, so the error repeats with period 1 in ``-x``."""
    f = torch.linspace(0.0, 1.0, samples, dtype=torch.float64)[:-1]
    exact = torch.exp(-f)
    return float(((sas_exp(-f, cfg) - exact).abs() / exact).max())


def op_count(cfg: SASConfig) -> dict[str, int]:
    """Elementwise operations per weight and table sizes of an SAS form (what a kernel would
    run): scale of ``-x``, floor, fraction, cut-off compare + select, LUT load, the piece
    index (div/mod, pieces > 1) and coefficient loads, Horner's FMAs, the final product."""
    k, d = cfg.pieces, cfg.degree
    ops = 1 + 1 + 1 + 2 + 1 + (2 + d + 1 if k > 1 else 0) + d + 1
    return {"ops_per_weight": ops, "fma": d, "table_floats": (max_cutoff(cfg) + 1) * cfg.lut_steps,
            "coefficient_floats": k * (d + 1)}


def measured_max_rel_error(cfg: SASConfig, dtype: torch.dtype, samples: int = 100_000) -> float:
    """Max relative error of :func:`sas_exp` evaluated in ``dtype`` over the kept range.

    The grid covers ``x in (-(T + 1), 0]``; each grid value is first rounded to ``dtype`` and
    the exact reference is ``exp`` of that rounded value in float64, so only the SAS error and
    the arithmetic rounding of ``dtype`` are measured.
    """
    x = -torch.linspace(0.0, cfg.lut_max + 1.0, samples, dtype=torch.float64)[:-1]
    x = x.to(dtype)
    kept = ~sparsity_mask(x.to(torch.float64), cfg)
    approx = sas_exp(x, cfg).to(torch.float64)[kept]
    exact = torch.exp(x.to(torch.float64))[kept]
    return float(((approx - exact).abs() / exact).max())


def zero_fraction(x: torch.Tensor, cfg: SASConfig, valid: torch.Tensor | None = None) -> float:
    """Fraction of (valid) weights SAS sets to exactly zero.

    Args:
        x: scores minus row max, ``<= 0``; masked entries may be ``-inf``.
        valid: optional bool mask of the same shape (True = a real candidate key); defaults to
            the finite entries of ``x``.
    """
    if valid is None:
        valid = torch.isfinite(x)
    total = int(valid.sum())
    if total == 0:
        return 0.0
    dropped = int((sparsity_mask(torch.where(valid, x, torch.zeros_like(x)), cfg) & valid).sum())
    return dropped / total


def stats(cfg: SASConfig, x: torch.Tensor | None = None) -> SASStats:
    """Worst-case exponent error of ``cfg`` (float64 math) and, given scores, its sparsity."""
    frac = zero_fraction(x, cfg) if x is not None else math.nan
    return SASStats(max_rel_error=poly_max_rel_error(cfg), zero_fraction=frac)
