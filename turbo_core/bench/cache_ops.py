"""The other two cache ops of ``turbo bench decode``: the per-step cache write and prompt
prefill, each against the float engine's own path in the same run (SmolLM2's layer shape).

* **append** — one layer's write per decode step, µs: ``QuantizedKVLayer.update`` (the C++
  ``turbo.append`` op: INT8 rows in, full chunks compressed into pages every ``chunk`` steps,
  amortized over ``2 · chunk`` steps) against the same store written by PyTorch
  (``TURBO_ATTENTION_BACKEND=reference``) and the float store's write (``FloatKVLayer``).
* **prefill** — a prompt of 2k / 8k tokens through one layer in the engine's chunks of 512:
  write + attention over everything before, tokens/s. ``sdpa-fp32`` is the float engine
  (``FloatKVLayer`` + SDPA), ``turbo-*`` the packed store + the C++ prefill op.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from unittest import mock

import torch

from turbo_core.attention.config import TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.floatcache import FloatKVLayer
from turbo_core.attention.functional import BACKEND_ENV, turbo_attention
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.bench.common import median

PREFILL_CHUNK = 512  # the engine's prefill_chunk (serving.engine.Limits)


def _with_backend(value: str | None, fn: Callable[[], object]) -> object:
    """``fn()`` under ``TURBO_ATTENTION_BACKEND=value`` (``None``: as the environment has it)."""
    with mock.patch.dict(os.environ, {} if value is None else {BACKEND_ENV: value}):
        return fn()


def _stores(kv_heads: int, head_dim: int, mix: int) -> dict[str, tuple[Callable[[], object], str | None]]:
    """name -> (a fresh store, the backend it runs under)."""
    cfg = KVQuantConfig()
    return {"sdpa-fp32": (lambda: FloatKVLayer(kv_heads, head_dim), None),
            "turbo-int4": (lambda: QuantizedKVLayer([4] * kv_heads, head_dim, cfg), None),
            "turbo-mix": (lambda: QuantizedKVLayer([2] * mix + [4] * (kv_heads - mix), head_dim, cfg), None),
            "turbo-int4-pytorch": (lambda: QuantizedKVLayer([4] * kv_heads, head_dim, cfg), "reference")}


def _append_once(make: Callable[[], object], prompt: list[torch.Tensor], new: list) -> float:
    """µs per step of ``len(new)`` one-token writes after a prompt."""
    store = make()
    store.update(*prompt)
    t0 = time.perf_counter()
    for k, v in new:
        store.update(k, v)
    return (time.perf_counter() - t0) / len(new) * 1e6


def _prefill_once(make: Callable[[], object], k: torch.Tensor, v: torch.Tensor,
                  q: torch.Tensor) -> float:
    """Seconds to write and attend a prompt in the engine's chunks."""
    store = make()
    length = k.shape[2]
    t0 = time.perf_counter()
    for s in range(0, length, PREFILL_CHUNK):
        e = min(length, s + PREFILL_CHUNK)
        store.update(k[:, :, s:e], v[:, :, s:e])
        if isinstance(store, FloatKVLayer):
            turbo_attention(q[:, :, s:e], None, None, kv_store=store, causal=True)
        else:
            turbo_attention(q[:, :, s:e], None, None, kv_store=store, math_cfg=TURBO_DEFAULT)
    return time.perf_counter() - t0


def _alternating(contenders: dict, run: Callable[..., float], repeats: int,
                 *args: object) -> dict[str, float]:
    """Median per contender, the contenders taking turns within each repeat (a noisy machine
    slows all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (make, backend) in contenders.items():
            times[name].append(_with_backend(backend, functools.partial(run, make, *args)))
    return {name: median(ts) for name, ts in times.items()}


def append_rows(shape, batches: list[int], context: int, repeats: int, mix: int,
                log: Callable[[str], None]) -> list[dict]:
    steps = 2 * KVQuantConfig().chunk
    rows = []
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        h, d = shape.kv_heads, shape.head_dim
        prompt = [torch.randn(batch, h, context, d, generator=gen) for _ in range(2)]
        new = [[torch.randn(batch, h, 1, d, generator=gen) for _ in range(2)] for _ in range(steps)]
        log(f"append {shape.name} batch={batch}: {', '.join(_stores(h, d, mix))}")
        us = _alternating(_stores(h, d, mix), _append_once, repeats, prompt, new)
        rows += [{"op": "append", "contender": name, "shape": shape.name, "batch": batch,
                  "context": context, "median_us_per_step": t} for name, t in us.items()]
    return rows


def prefill_rows(shape, lengths: list[int], repeats: int, mix: int,
                 log: Callable[[str], None]) -> list[dict]:
    rows = []
    for length in lengths:
        gen = torch.Generator().manual_seed(length)
        h, d = shape.kv_heads, shape.head_dim
        k, v = (torch.randn(1, h, length, d, generator=gen) for _ in range(2))
        q = torch.randn(1, shape.q_heads, length, d, generator=gen)
        # the PyTorch-written store is an append contender only
        stores = {n: c for n, c in _stores(h, d, mix).items() if c[1] is None}
        log(f"prefill {shape.name} prompt={length}: {', '.join(stores)}")
        secs = _alternating(stores, _prefill_once, repeats, k, v, q)
        rows += [{"op": "prefill", "contender": name, "shape": shape.name, "prompt": length,
                  "median_s": t, "tokens_per_s": length / t,
                  "ratio_vs_sdpa": secs["sdpa-fp32"] / t} for name, t in secs.items()]
    return rows


def table(doc: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    parts = []
    if doc.get("append"):
        base = {(r["batch"]): r["median_us_per_step"] for r in doc["append"] if r["contender"] == "sdpa-fp32"}
        rows = [[r["shape"], r["batch"], r["context"], r["contender"], r["median_us_per_step"],
                 base[r["batch"]] / r["median_us_per_step"]] for r in doc["append"]]
        parts.append("Cache write per layer per decode step (µs, median; ratio > 1 is faster than "
                     "the float store's write)\n" + tabulate(
                         rows, headers=["shape", "batch", "context", "contender", "us_per_step",
                                        "ratio_vs_sdpa"], tablefmt=fmt, floatfmt=".2f"))
    if doc.get("prefill"):
        rows = [[r["shape"], r["prompt"], r["contender"], r["median_s"] * 1e3, r["tokens_per_s"],
                 r["ratio_vs_sdpa"]] for r in doc["prefill"]]
        parts.append(f"Prefill through one layer in chunks of {PREFILL_CHUNK} (write + attention; "
                     "median; ratio > 1 is faster than the float engine)\n" + tabulate(
                         rows, headers=["shape", "prompt", "contender", "ms", "tokens_per_s",
                                        "ratio_vs_sdpa"], tablefmt=fmt, floatfmt=".2f"))
    return "\n\n".join(parts)
