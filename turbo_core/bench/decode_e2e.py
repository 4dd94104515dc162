"""End-to-end decode rows of ``turbo bench decode``: a real model's greedy decode after a long
prompt, with each cache, in one run.

The prompt (held-out text; batch rows start at different offsets) is prefilled once with the
float model; every contender's cache is filled from those same K/V (our ``TurboCache`` stores
them — float for ``fp16``, packed for ``turbo-int4`` — exactly as its ``update`` would, quanto
quantizes them), so every contender decodes from identical inputs and only decode is timed
(prefill is not what these rows measure). Our two run the serving engine's decode step
(``CacheRunner``: compiled with Inductor where a C++ compiler exists, as ``turbo serve`` runs
it); transformers' caches run its own forward with SDPA. Each step is one forward of one token
per sequence; two untimed warm-up steps come first (they compile, or load the compiled step
from the on-disk cache). Peak memory is the process's resident set, sampled during the timed
steps, minus what it was just before them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from turbo_core.bench.common import median


class _PeakRSS:
    """Samples the resident set size (``/proc/self/statm``) every 2 ms while active."""

    def __init__(self) -> None:
        import os

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _prompt(lm, batch: int, length: int) -> torch.Tensor:
    from turbo_core.hf import data

    ids = lm.tokenizer(data.load_split().evaluation, return_tensors="pt")["input_ids"][0]
    need = length + 97 * (batch - 1)
    if ids.numel() < need:
        raise ValueError(f"held-out text has {ids.numel()} tokens, the benchmark needs {need}")
    return torch.stack([ids[97 * i: 97 * i + length] for i in range(batch)])


def _fill(name: str, lm, prefill) -> object:
    """A ``name`` cache holding the prefill's K/V, as that cache's own update would store them."""
    from transformers.cache_utils import DynamicCache, QuantizedCache

    from turbo_core.attention.variants import get_variant
    from turbo_core.hf.cache import TurboCache

    if name == "dynamic-fp32":
        cache = DynamicCache(config=lm.model.config)
    elif name == "quanto-int4":
        cache = QuantizedCache(backend="quanto", config=lm.model.config, nbits=4,
                               residual_length=64, q_group_size=64)
    else:
        variant = get_variant(name)
        cache = TurboCache.for_model(lm.model, lm.shape, variant.kv_bits if variant.quantized_cache
                                     else None, variant.kv)
    for i, layer in enumerate(prefill.layers):
        k, v = layer.keys.clone(), layer.values.clone()
        if isinstance(cache, TurboCache):
            cache.layers[i].lazy_initialization(k, v)
            cache.layers[i].store.append(k, v)
        else:
            cache.update(k, v, i)
    return cache


OURS = ("fp16", "turbo-int4")  # through the serving engine's step; the others are transformers'
WARM_UP = 2  # steps: batch 1 and batch > 1 compile separately, once


def _stepper(lm, name: str, cache, batch: int, start: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """One decode step of ``name`` over ``cache``: tokens ``(B, 1)`` -> logits ``(B, vocab)``."""
    if name not in OURS:
        lm.model.set_attn_implementation("sdpa")
        return lambda token: lm.model(token, cache=cache, use_cache=True).logits[:, -1]
    from turbo_core.attention.variants import get_variant
    from turbo_core.hf.runner import CacheRunner

    runner = CacheRunner(lm, get_variant(name), None, lm.model.device)
    seqs, lens = cache.sequences, [start] * batch

    def step(token: torch.Tensor) -> torch.Tensor:
        logits = runner.forward(cache, seqs, token.tolist(), lens)
        lens[:] = [n + 1 for n in lens]
        return logits

    return step


def _decode(lm, name: str, cache, first: torch.Tensor, steps: int, start: int) -> dict:
    from turbo_core.hf.cache import cache_bytes

    token, times, out = first, [], []
    step = _stepper(lm, name, cache, first.shape[0], start)
    try:
        with torch.no_grad():
            for timed in (False, True):  # untimed warm-up steps, outside the memory window
                with _PeakRSS() as mem:
                    for _ in range(steps if timed else WARM_UP):
                        t0 = time.perf_counter()
                        logits = step(token)
                        times.append(time.perf_counter() - t0)
                        token = logits.argmax(-1)[:, None]
                        out.append(token)
    finally:
        lm.model.set_attn_implementation("sdpa")
    batch = first.shape[0]
    step_s = median(times[WARM_UP:])
    return {"contender": name, "batch": batch, "median_step_ms": step_s * 1e3,
            "decode_tokens_per_s": batch / step_s, "kv_bytes": cache_bytes(cache),
            "peak_rss_growth_mib": (mem.peak - mem.start) / 2**20,
            "tokens": torch.cat(out, dim=1)[0].tolist()}


def run(quick: bool = False, repeats: int = 5, model: str = "smollm2",
        log: Callable[[str], None] = print) -> dict:
    from transformers.cache_utils import DynamicCache

    from turbo_core.hf import models

    lm = models.load(model)
    prompt_len = 1024 if quick else 4096
    steps = max(8, 2 * repeats)
    rows = []
    for batch in (1, 8):
        ids = _prompt(lm, batch, prompt_len)
        log(f"end to end: float prefill of {batch} x {prompt_len} tokens")
        lm.model.set_attn_implementation("sdpa")
        with torch.no_grad():
            prefill = DynamicCache(config=lm.model.config)
            logits = lm.model(ids, past_key_values=prefill, use_cache=True, logits_to_keep=1).logits
        first = logits[:, -1:].argmax(-1)
        for name in ("dynamic-fp32", "quanto-int4", *OURS):
            log(f"end to end: {name} decode, batch {batch}, {steps} steps")
            rows.append(_decode(lm, name, _fill(name, lm, prefill), first, steps, prompt_len)
                        | {"prompt": prompt_len})
        del prefill
        by_name = {r["contender"]: r for r in rows[-4:]}
        for r in rows[-4:]:
            r["ratio_vs_dynamic"] = r["decode_tokens_per_s"] / by_name["dynamic-fp32"]["decode_tokens_per_s"]
            r["ratio_vs_fp16"] = r["decode_tokens_per_s"] / by_name["fp16"]["decode_tokens_per_s"]
    return {"model": lm.name, "prompt_tokens": prompt_len, "steps": steps, "rows": rows,
            "method": "one float prefill shared by all caches; greedy decode; median step time; "
                      "fp16 and turbo-int4 through the serving engine's (compiled) step"}


def table(doc: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    keys = ["batch", "contender", "median_step_ms", "decode_tokens_per_s", "ratio_vs_dynamic",
            "ratio_vs_fp16", "kv_bytes", "peak_rss_growth_mib"]
    rows = [[r[k] if k != "kv_bytes" else f"{r[k] / 2**20:.1f} MiB" for k in keys] for r in doc["rows"]]
    return (f"{doc['model']}, greedy decode after {doc['prompt_tokens']} prompt tokens, median of "
            f"{doc['steps']} steps\n" + tabulate(rows, headers=keys, tablefmt=fmt, floatfmt=".2f"))
