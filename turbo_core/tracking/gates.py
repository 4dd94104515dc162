"""Accuracy and compression gates as data (MLflow ``MetricThreshold`` style).

A gate names a metric and bounds it absolutely and/or relative to a baseline (the current
MLflow champion). A missing or non-finite metric fails its gate. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Gate:
    """One metric's bounds.

    Attributes:
        metric: key in the evaluation result.
        threshold: absolute bound (``>=`` if ``greater_is_better`` else ``<=``); ``None`` = none.
        min_absolute_change: vs the baseline, the metric must be better by at least this much
            (negative values allow a bounded regression).
        min_relative_change: the same as a fraction of the baseline's magnitude.
        greater_is_better: direction of "better".
        shows: metrics a failure reports beside this one (what the gated figure stands on).
    """

    metric: str
    threshold: float | None = None
    min_absolute_change: float | None = None
    min_relative_change: float | None = None
    greater_is_better: bool = True
    shows: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.metric:
            raise ValueError("a gate needs a metric name")
        for name in ("threshold", "min_absolute_change", "min_relative_change"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"gate {self.metric}: {name} must be finite, got {value}")
        if self.threshold is None and self.min_absolute_change is None and \
                self.min_relative_change is None:
            raise ValueError(f"gate {self.metric} bounds nothing (set threshold or a change)")

    def check(self, metrics: dict[str, object], baseline: dict[str, object] | None) -> list[str]:
        """Reasons this gate fails (empty = passes)."""
        value = metrics.get(self.metric)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return [f"{self.metric}: missing or not a finite number ({value!r})"]
        sign = 1.0 if self.greater_is_better else -1.0
        word = ">=" if self.greater_is_better else "<="
        reasons = []
        if self.threshold is not None and sign * (value - self.threshold) < 0:
            beside = "".join(f"; {name} = {metrics[name]:.6g}" for name in self.shows
                             if isinstance(metrics.get(name), int | float))
            reasons.append(f"{self.metric} = {value:.6g}, needs {word} {self.threshold:.6g} "
                           f"(misses by {abs(value - self.threshold):.3g}{beside})")
        relative = self.min_absolute_change is not None or self.min_relative_change is not None
        if relative and baseline is not None:
            base = baseline.get(self.metric)
            if not isinstance(base, int | float) or not math.isfinite(base):
                return [*reasons, f"{self.metric}: champion has no finite value to compare"]
            gain = sign * (value - base)
            if self.min_absolute_change is not None and gain < self.min_absolute_change:
                reasons.append(f"{self.metric} changes by {gain:+.6g} vs champion {base:.6g}, "
                               f"needs >= {self.min_absolute_change:+.6g}")
            if self.min_relative_change is not None and base != 0 and \
                    gain / abs(base) < self.min_relative_change:
                reasons.append(f"{self.metric} changes by {gain / abs(base):+.2%} vs champion, "
                               f"needs >= {self.min_relative_change:+.2%}")
        return reasons


@dataclass(frozen=True)
class GateSet:
    gates: tuple[Gate, ...] = field(default_factory=tuple)

    def evaluate(self, metrics: dict[str, object],
                 baseline: dict[str, object] | None = None) -> GateDecision:
        reasons = [r for g in self.gates for r in g.check(metrics, baseline)]
        return GateDecision(passed=not reasons, reasons=tuple(reasons),
                            gates=tuple(asdict(g) for g in self.gates),
                            compared_to_champion=baseline is not None)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    gates: tuple[dict, ...]
    compared_to_champion: bool

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self, variant: str, metrics: dict[str, object]) -> str:
        status = "PASSED" if self.passed else "FAILED"
        lines = [f"# Gate report: {variant} — {status}", "", "| metric | value | bound |",
                 "|---|---|---|"]
        for g in self.gates:
            bound = []
            if g["threshold"] is not None:
                bound.append(f"{'>=' if g['greater_is_better'] else '<='} {g['threshold']}")
            if g["min_absolute_change"] is not None:
                bound.append(f"Δ vs champion >= {g['min_absolute_change']}")
            if g["min_relative_change"] is not None:
                bound.append(f"relative Δ vs champion >= {g['min_relative_change']:.1%}")
            value = metrics.get(g["metric"])
            shown = f"{value:.6g}" if isinstance(value, int | float) else "missing"
            lines.append(f"| {g['metric']} | {shown} | {'; '.join(bound)} |")
        lines += ["", "Reasons:" if self.reasons else "All gates passed."]
        lines += [f"- {r}" for r in self.reasons]
        return "\n".join(lines) + "\n"

