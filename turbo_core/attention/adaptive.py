"""Adaptive (context-dependent) sparsity: a SAS cut-off per head, chosen from calibration data.

SAS drops a weight where the score is more than ``T + 1`` below its row's max. What that costs
depends on the head: where attention is flat, few keys fall that far and little mass is lost at
a small ``T``; where it is peaked over a long context, many far keys together can hold mass.
:func:`calibrate_cutoffs` measures, per head, the exact softmax mass each ``T`` drops on
calibration inputs and keeps the smallest ``T`` whose mean dropped mass is within
``tolerance``; it reports per head the zeroed fraction and the error of the attention at
that cut-off against exact attention. Top-p (``AttentionMath.top_p``) is the per-query
counterpart and lives in the reference (``turbo_core.attention.reference.top_p_scores``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from turbo_core.attention.config import EXACT, AttentionMath, SASConfig
from turbo_core.attention.reference import _scores, _valid_mask, attention_details

MAX_CALIBRATED_CUTOFF = 16


@dataclass(frozen=True)
class CutoffReport:
    """The chosen cut-offs (one per query head) and, per head, what they cost."""

    cutoffs: tuple[int, ...]
    tolerance: float
    heads: list[dict]

    def sas(self, base: SASConfig | None = None) -> SASConfig:
        """``base`` (default the cubic) with these per-head cut-offs."""
        return dataclasses.replace(base or SASConfig(), head_lut_max=self.cutoffs)


def _relative_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None,
                     window: int | None) -> torch.Tensor:
    """``s - rowmax`` in float64, ``(B, H_q, L_q, L_k)``, ``-inf`` where masked."""
    b, hq, lq, d = q.shape
    s = _scores(q, k, EXACT, torch.float64).reshape(b, hq, lq, k.shape[2]) \
        * (1.0 / math.sqrt(d) if scale is None else scale)
    valid = _valid_mask(q.shape[2], k.shape[2], causal, q.device, window)
    if valid is not None:
        s = s.masked_fill(~valid, -math.inf)
    return s - s.amax(dim=-1, keepdim=True)


def dropped_mass(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False,
                 scale: float | None = None, window: int | None = None,
                 max_cutoff: int = MAX_CALIBRATED_CUTOFF) -> torch.Tensor:
    """``(H_q, max_cutoff + 1)``: per head and cut-off ``T``, the exact softmax mass of the keys
    SAS drops at ``T`` (``floor(-x) > T``), averaged over the batch and the query rows."""
    x = _relative_scores(q, k, causal, scale, window)
    probs = torch.softmax(x, dim=-1).nan_to_num(0.0)
    depth = torch.floor(-x).nan_to_num(0.0, posinf=-1.0)  # masked keys carry no mass anyway
    out = [(probs * (depth > t)).sum(-1).mean(dim=(0, 2)) for t in range(max_cutoff + 1)]
    return torch.stack(out, dim=1)


def calibrate_cutoffs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                      tolerance: float = 1e-3, causal: bool = False, scale: float | None = None,
                      window: int | None = None, base: SASConfig | None = None,
                      max_cutoff: int = MAX_CALIBRATED_CUTOFF) -> CutoffReport:
    """Per query head, the smallest ``T`` in ``0..max_cutoff`` whose mean dropped mass is
    ``<= tolerance`` (``max_cutoff`` where none is), and the report of the attention with
    those cut-offs against exact attention (``q (B, H_q, L_q, D)``, ``k, v (B, H_kv, L_k, D)``)."""
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"tolerance is a softmax mass in (0, 1), got {tolerance!r}")
    if not isinstance(max_cutoff, int) or not 0 <= max_cutoff <= 64:
        raise ValueError(f"max_cutoff must be an int in [0, 64], got {max_cutoff!r}")
    mass = dropped_mass(q, k, causal=causal, scale=scale, window=window, max_cutoff=max_cutoff)
    within = mass <= tolerance
    cutoffs = tuple(int(row.nonzero()[0]) if bool(row.any()) else max_cutoff for row in within)
    cfg = dataclasses.replace(base or SASConfig(), head_lut_max=cutoffs)
    heads = head_report(q, k, v, AttentionMath(sas=cfg), causal=causal, scale=scale, window=window)
    for h, (row, t) in enumerate(zip(heads, cutoffs, strict=True)):
        row |= {"cutoff": t, "dropped_mass": float(mass[h, t]),
                "dropped_mass_one_less": float(mass[h, t - 1]) if t > 0 else None}
    return CutoffReport(cutoffs=cutoffs, tolerance=tolerance, heads=heads)


def head_report(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, math_cfg: AttentionMath, *,
                causal: bool = False, scale: float | None = None, window: int | None = None
                ) -> list[dict]:
    """Per query head: the share of valid weights ``math_cfg`` sets to exactly zero (SAS's
    cut-off, top-p, top-k) and the error of its output against exact attention (relative
    Frobenius, max abs), on the same inputs."""
    opts = {"causal": causal, "scale": scale, "window": window}
    res = attention_details(q, k, v, math_cfg=math_cfg, need_probs=True, **opts)
    exact = attention_details(q.double(), k.double(), v.double(), **opts).out
    valid = _valid_mask(q.shape[2], k.shape[2], causal, q.device, window)
    valid = torch.ones_like(res.probs, dtype=torch.bool) if valid is None else valid.expand_as(res.probs)
    zeroed = (res.probs == 0) & valid
    rows = []
    for h in range(q.shape[1]):
        diff, ref = res.out[:, h].double() - exact[:, h], exact[:, h]
        rows.append({"head": h, "zero_fraction": float(zeroed[:, h].sum() / valid[:, h].sum().clamp(min=1)),
                     "rel_error": float(diff.norm() / ref.norm().clamp(min=1e-300)),
                     "max_abs_error": float(diff.abs().max())})
    return rows


def table(report: CutoffReport) -> str:
    """The per-head report as a Markdown table."""
    lines = ["| head | cut-off T | dropped mass | zeroed | rel. error vs exact | max abs error |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in report.heads:
        lines.append(f"| {r['head']} | {r['cutoff']} | {r['dropped_mass']:.2e} | "
                     f"{r['zero_fraction']:.1%} | {r['rel_error']:.2e} | {r['max_abs_error']:.2e} |")
    return "\n".join(lines)
