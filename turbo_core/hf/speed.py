"""Prefill and decode speed of a contender against the float baseline, in one process, on the
same prompts, taking turns (so a noisy machine slows both alike).

* **prefill**: one prompt of ``context`` tokens into a fresh cache, ``repeats`` times;
* **decode**: ``batch`` prompts of ``context`` tokens prefilled (not timed), one untimed step
  (the compiled decode step compiles or loads then), then ``repeats`` rounds of
  ``new_tokens`` greedy steps of the whole batch, one forward per step.

Each round times the baseline and the contender back to back (the order alternates); a
speed-up is the median over rounds of contender tokens/s ÷ baseline tokens/s, and the tokens/s
reported are medians too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SpeedSettings:
    context: int = 1024
    batch: int = 4
    new_tokens: int = 16
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.context < 16 or self.batch < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise ValueError(f"speed settings need context >= 16, batch >= 1, new_tokens >= 2 "
                             f"and repeats >= 1, got {asdict(self)}")

    def prompts_needed(self) -> int:
        return self.repeats + self.batch


def prompts_from(ids: torch.Tensor, settings: SpeedSettings) -> list[list[int]]:
    """Distinct prompts of ``context`` tokens from held-out token ids (wrapping around)."""
    n = ids.numel()
    if n < settings.context:
        raise ValueError(f"held-out text has {n} tokens, the speed measurement needs "
                         f"{settings.context} (speed context)")
    step = max(1, (n - settings.context) // max(1, settings.prompts_needed() - 1))
    return [ids[(i * step) % (n - settings.context + 1):][:settings.context].tolist()
            for i in range(settings.prompts_needed())]


def _prefill_seconds(contender, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    contender.start([prompt])
    return time.perf_counter() - t0


def _decode_seconds(contender, state, logits: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = contender.step(state, logits.argmax(-1).tolist())
    return time.perf_counter() - t0, logits


def measure(baseline, contender, prompts: list[list[int]], settings: SpeedSettings,
            log=None) -> dict[str, float | int]:
    """Tokens/s of both and the speed-ups (see the module's docstring)."""
    pair = (baseline, contender)  # indices 0 and 1: the two may carry the same name
    _prefill_seconds(baseline, prompts[0][:64])  # warm-up: first-call costs out of the timing
    _prefill_seconds(contender, prompts[0][:64])

    def turns(r: int) -> tuple[int, ...]:
        return (0, 1) if r % 2 == 0 else (1, 0)

    prefill: tuple[list[float], list[float]] = ([], [])
    for r in range(settings.repeats):
        for i in turns(r):
            prefill[i].append(settings.context / _prefill_seconds(pair[i], prompts[r]))
    batch = prompts[settings.repeats:settings.repeats + settings.batch]
    states = [c.start(batch) for c in pair]
    for i in (0, 1):  # warm-up: a compiled step compiles (or loads) on its first call
        state, logits = states[i]
        states[i] = (state, _decode_seconds(pair[i], state, logits, 1)[1])
    decode: tuple[list[float], list[float]] = ([], [])
    for r in range(settings.repeats):
        for i in turns(r):
            state, logits = states[i]
            seconds, logits = _decode_seconds(pair[i], state, logits, settings.new_tokens)
            states[i] = (state, logits)
            decode[i].append(settings.batch * settings.new_tokens / seconds)
        if log:
            log(f"speed round {r + 1}/{settings.repeats}: decode {contender.name} "
                f"{decode[1][-1]:.1f} vs baseline {baseline.name} {decode[0][-1]:.1f} tok/s")

    def ratio(d: tuple[list[float], list[float]]) -> float:
        return statistics.median(a / b for a, b in zip(d[1], d[0], strict=True))

    return {"prefill_tokens_per_s": statistics.median(prefill[1]),
            "prefill_tokens_per_s_baseline": statistics.median(prefill[0]),
            "prefill_speedup": ratio(prefill),
            "decode_tokens_per_s": statistics.median(decode[1]),
            "decode_tokens_per_s_baseline": statistics.median(decode[0]),
            "decode_speedup": ratio(decode),
            "speed_context": settings.context, "speed_batch": settings.batch,
            "speed_repeats": settings.repeats}
