"""Small statistics shared by the benchmarks and the rollout's verification."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``xs``; None when there is nothing."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]
