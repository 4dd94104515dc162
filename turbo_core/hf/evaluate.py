"""Evaluation of a variant against the float baseline on held-out text.

Perplexity is measured over non-overlapping windows of ``window`` tokens. With a quantized KV
cache each window is fed in slices of ``chunk`` tokens through :class:`~turbo_core.hf.cache.TurboCache`,
so every token attends to the most recent tokens at INT8 and to older ones at their plan bits —
exactly what it sees during decoding — instead of a full-precision prefill that would hide the
cache's error.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant
from turbo_core.hf.attention import ATTN_NAME, enable, sas_zero_fraction
from turbo_core.hf.cache import TurboCache, cache_bytes
from turbo_core.hf.calibrate import token_ids
from turbo_core.hf.data import TextSplit
from turbo_core.hf.models import LoadedModel

log = logging.getLogger(__name__)

FP16_BYTES = 2


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate. ``max_tokens`` of held-out text in windows of ``window``."""

    max_tokens: int = 8192
    window: int = 1024
    decode_prompt: int = 128
    decode_tokens: int = 32

    def __post_init__(self) -> None:
        if self.window < 16 or self.max_tokens < self.window:
            raise ValueError(f"need window >= 16 and max_tokens >= window, got window={self.window}, "
                             f"max_tokens={self.max_tokens}")
        if self.decode_tokens < 2 or self.decode_prompt < 1:
            raise ValueError("decode_tokens must be >= 2 and decode_prompt >= 1")


@dataclass
class WindowScores:
    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        self.tokens += int(targets.numel())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def eval_windows(ids: torch.Tensor, settings: EvalSettings) -> list[torch.Tensor]:
    """Non-overlapping windows of ``settings.window`` tokens covering ``max_tokens``."""
    need = settings.max_tokens
    if ids.numel() < need:
        raise ValueError(f"held-out text has {ids.numel()} tokens, the evaluation needs "
                         f"{need} (max_tokens); use a longer --text or a smaller --max-tokens")
    ids = ids[:need]
    n = need // settings.window
    return [ids[i * settings.window:(i + 1) * settings.window] for i in range(n)]


def _float_cache_bytes(lm: LoadedModel, tokens: int) -> int:
    s = lm.shape
    return 2 * s.num_layers * s.num_kv_heads * s.head_dim * FP16_BYTES * tokens


@dataclass(frozen=True)
class _Runner:
    """How one contender computes logits: attention implementation and cache factory."""

    name: str
    attn: str  # "turbo" or "sdpa"
    new_cache: Callable[[], object] | None  # None: float cache (full-window forward)
    chunk: int

    @torch.no_grad()
    def logits(self, lm: LoadedModel, window: torch.Tensor) -> tuple[torch.Tensor, object | None]:
        lm.model.set_attn_implementation(self.attn)
        ids = window.unsqueeze(0)
        if self.new_cache is None:
            return lm.model(ids, use_cache=False).logits[0], None
        cache = self.new_cache()
        parts = [lm.model(ids[:, s:s + self.chunk], cache=cache, use_cache=True).logits[0]
                 for s in range(0, ids.shape[1], self.chunk)]
        return torch.cat(parts), cache

    @torch.no_grad()
    def speed(self, lm: LoadedModel, prompt: torch.Tensor, n_new: int) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s), greedy ``generate`` with this cache."""
        lm.model.set_attn_implementation(self.attn)

        def run(max_new: int) -> float:
            cache = self.new_cache() if self.new_cache is not None else None
            t0 = time.perf_counter()
            lm.model.generate(prompt.unsqueeze(0), max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False, cache=cache,
                              attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                              pad_token_id=lm.tokenizer.eos_token_id)
            return time.perf_counter() - t0

        run(2)  # warm-up
        t_first = run(1)  # prefill + first token
        t_all = run(n_new)
        return prompt.numel() / t_first, (n_new - 1) / max(t_all - t_first, 1e-9)


def _measure(lm: LoadedModel, runner: _Runner, split: TextSplit, settings: EvalSettings,
             progress: bool) -> dict[str, object]:
    ids = token_ids(lm.tokenizer, split.evaluation)
    windows = eval_windows(ids, settings)
    base, var = WindowScores(), WindowScores()
    agree = 0
    held = None
    try:
        for w in tqdm(windows, desc=f"evaluate {runner.name}", unit="window", disable=not progress):
            lm.model.set_attn_implementation("sdpa")
            with torch.no_grad():
                ref = lm.model(w.unsqueeze(0), use_cache=False).logits[0]
            out, cache = runner.logits(lm, w)
            base.add(ref[:-1], w[1:])
            var.add(out[:-1], w[1:])
            agree += int((ref[:-1].argmax(-1) == out[:-1].argmax(-1)).sum())
            if cache is not None:
                held = cache_bytes(cache)
        sas_zero = sas_zero_fraction(lm.model) if runner.attn == ATTN_NAME else 0.0
        prefill_tps, decode_tps = runner.speed(lm, ids[:settings.decode_prompt], settings.decode_tokens)
    finally:
        lm.model.set_attn_implementation("sdpa")
    fp16 = _float_cache_bytes(lm, settings.window)
    kv_bytes = held if held is not None else fp16
    return {
        "model": lm.name,
        "variant": runner.name,
        "data_source": split.source,
        "data_sha256": split.sha256,
        "eval_tokens": base.tokens,
        "window": settings.window,
        "ppl_baseline": base.ppl,
        "ppl_variant": var.ppl,
        "ppl_delta_pct": 100.0 * (var.ppl / base.ppl - 1.0),
        "top1_agreement": agree / base.tokens,
        "kv_context_tokens": settings.window,
        "kv_bytes_per_token": kv_bytes / settings.window,
        "kv_compression": fp16 / kv_bytes,
        "sas_zero_fraction": sas_zero,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode_tps,
        "settings": asdict(settings),
    }


def evaluate(
    lm: LoadedModel,
    variant: Variant,
    split: TextSplit,
    *,
    plan: BitPlan | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """All metrics of ``turbo evaluate`` for one variant (baseline measured in the same call).

    ``kv_compression`` is FP16 bytes of the same context divided by the bytes the cache holds
    after ``window`` tokens (codes, scales, offsets and the INT8 buffer, measured).
    """
    settings = settings or EvalSettings()
    if plan is not None:
        plan.check_compatible(lm.shape)
    if variant.quantized_cache:
        bits = plan if plan is not None else variant.kv_bits
        new_cache = partial(TurboCache, lm.shape, bits, variant.kv)
    else:
        new_cache = None
    enable(lm.model, variant.math)
    result = _measure(lm, _Runner(variant.name, ATTN_NAME, new_cache, variant.kv.chunk), split,
                      settings, progress)
    result["int2_heads"] = plan.selection.int2_heads if plan is not None else 0
    result["int2_scope"] = plan.selection.scope if plan is not None else None
    return result


PEER_BACKENDS = ("quanto", "hqq")


def evaluate_peer(
    lm: LoadedModel,
    backend: str,
    nbits: int,
    split: TextSplit,
    *,
    settings: EvalSettings | None = None,
    residual: int = 64,
    group: int = 64,
    progress: bool = True,
) -> dict[str, object]:
    """The same metrics for transformers' own quantized KV cache (exact attention), with the
    same residual (recent-token) length as our buffer and the same group size."""
    if backend not in PEER_BACKENDS:
        raise ValueError(f"unknown peer backend {backend!r}; use one of {PEER_BACKENDS}")
    if nbits not in (2, 4):
        raise ValueError(f"peer nbits must be 2 or 4, got {nbits}")
    from transformers.cache_utils import QuantizedCache

    settings = settings or EvalSettings()
    new_cache = partial(QuantizedCache, backend=backend, config=lm.model.config, nbits=nbits,
                        residual_length=residual, q_group_size=group)
    name = f"hf-{backend}-int{nbits}"
    result = _measure(lm, _Runner(name, "sdpa", new_cache, residual), split, settings, progress)
    result["int2_heads"] = 0
    result["int2_scope"] = None
    return result
