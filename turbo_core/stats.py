"""Small statistics shared by the benchmarks and the rollout's verification."""

from __future__ import annotations


def percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (0..1) of ``xs``; None when there is nothing."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def binomial_upper(successes: int, trials: int, confidence: float = 0.95) -> float:
    """The one-sided Clopper–Pearson upper confidence bound on a success rate seen as
    ``successes`` of ``trials``: the largest rate the data do not rule out at ``confidence``
    (1.0 when every trial succeeded or none was run)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if successes == trials:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, successes + 1, trials - successes))
