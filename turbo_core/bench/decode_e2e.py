"""End-to-end decode rows of ``turbo bench decode``: a real model's greedy decode after a long
prompt, with each cache, in one run.

The prompt (held-out text; batch rows start at different offsets) is prefilled once with the
float model; every contender's cache is filled from those same K/V (our ``TurboCache`` stores
them packed exactly as its ``update`` would, quanto quantizes them), so every contender decodes
from identical inputs and only decode is timed (prefill is not what these rows measure). Each
step is one ``forward`` of one token per sequence; one untimed warm-up step comes first (it also
loads the CPU kernel's compiled code, once per process). Peak memory is the process's resident
set, sampled during the timed steps, minus what it was just before them.
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
        cache = TurboCache.for_model(lm.model, lm.shape, 4, get_variant("turbo-int4").kv)
    for i, layer in enumerate(prefill.layers):
        k, v = layer.keys.clone(), layer.values.clone()
        if isinstance(cache, TurboCache):
            cache.layers[i].lazy_initialization(k, v)
            cache.layers[i].store.append(k, v)
        else:
            cache.update(k, v, i)
    return cache


def _decode(lm, name: str, cache, first: torch.Tensor, steps: int) -> dict:
    from turbo_core.attention.variants import get_variant
    from turbo_core.hf.attention import enable
    from turbo_core.hf.cache import cache_bytes

    if name.startswith("turbo"):
        enable(lm.model, get_variant("turbo-int4").math)
    else:
        lm.model.set_attn_implementation("sdpa")
    token, times, out = first, [], []
    try:
        with torch.no_grad():
            for timed in (False, True):  # one untimed warm-up step, outside the memory window
                with _PeakRSS() as mem:
                    for _ in range(steps if timed else 1):
                        t0 = time.perf_counter()
                        logits = lm.model(token, past_key_values=cache, use_cache=True).logits
                        times.append(time.perf_counter() - t0)
                        token = logits[:, -1:].argmax(-1)
                        out.append(token)
    finally:
        lm.model.set_attn_implementation("sdpa")
    batch = first.shape[0]
    step_s = median(times[1:])
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
        for name in ("dynamic-fp32", "quanto-int4", "turbo-int4"):
            log(f"end to end: {name} decode, batch {batch}, {steps} steps")
            rows.append(_decode(lm, name, _fill(name, lm, prefill), first, steps) | {"prompt": prompt_len})
        del prefill
        base = rows[-3]["decode_tokens_per_s"]
        for r in rows[-3:]:
            r["ratio_vs_dynamic"] = r["decode_tokens_per_s"] / base
    return {"model": lm.name, "prompt_tokens": prompt_len, "steps": steps, "rows": rows,
            "method": "one float prefill shared by all caches; greedy decode; median step time"}


def table(doc: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    keys = ["batch", "contender", "median_step_ms", "decode_tokens_per_s", "ratio_vs_dynamic",
            "kv_bytes", "peak_rss_growth_mib"]
    rows = [[r[k] if k != "kv_bytes" else f"{r[k] / 2**20:.1f} MiB" for k in keys] for r in doc["rows"]]
    return (f"{doc['model']}, greedy decode after {doc['prompt_tokens']} prompt tokens, median of "
            f"{doc['steps']} steps\n" + tabulate(rows, headers=keys, tablefmt=fmt, floatfmt=".2f"))
