"""The generation engine behind the server: one model + variant + plan, token-by-token
generation with the packed TurboCache, cancellable, with the KV bytes it holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant, get_variant
from turbo_core.hf import models
from turbo_core.hf.attention import enable
from turbo_core.hf.cache import TurboCache, cache_bytes


@dataclass(frozen=True)
class Limits:
    """Server limits; requests beyond them are refused with a 4xx, never a 500."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_concurrency: int = 1
    max_queue: int = 8
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if min(self.max_prompt_tokens, self.max_new_tokens, self.max_concurrency) < 1 or \
                self.max_queue < 0 or self.request_timeout_s <= 0:
            raise ValueError(f"invalid server limits: {self}")


class Engine:
    def __init__(self, lm: models.LoadedModel, variant: Variant, plan: BitPlan | None):
        if plan is not None:
            plan.check_compatible(lm.shape)
        if variant.needs_calibration and plan is None:
            raise ValueError(f"variant {variant.name} needs a bit plan (--plan)")
        self.lm, self.variant, self.plan = lm, variant, plan
        self.model_id = f"{lm.name}:{variant.name}"
        enable(lm.model, variant.math)
        self.kv_bytes_in_use = 0
        self._kv_lock = threading.Lock()

    @classmethod
    def from_files(cls, model: str | None, variant: str, plan: str | None) -> Engine:
        return cls(models.load(model), get_variant(variant), BitPlan.load(plan) if plan else None)

    @classmethod
    def from_mlflow(cls, uri: str) -> Engine:
        import mlflow.pyfunc

        from turbo_core.tracking import runs as tracking

        tracking.configure()
        wrapped = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        return cls(wrapped.lm, wrapped.variant, wrapped.plan)

    def encode(self, prompt: str) -> torch.Tensor:
        return self.lm.tokenizer(prompt, return_tensors="pt")["input_ids"]

    def _new_cache(self):
        if not self.variant.quantized_cache:
            from transformers import DynamicCache

            return DynamicCache(config=self.lm.model.config)
        return TurboCache(self.lm.shape, self.plan if self.plan is not None else
                             self.variant.kv_bits, self.variant.kv)

    @torch.no_grad()
    def self_test(self, tokens: int = 2) -> bool:
        """Readiness: a real prefill of ``tokens`` and one decode step through the variant's
        cache. :meth:`warm_up` runs it long enough to fill a page, which compiles every CPU
        kernel path once (~15 s, cached on disk) before the first request."""
        ids = self.encode("ready " * tokens)[:, :tokens]
        cache = self._new_cache()
        out = self.lm.model(ids, cache=cache, use_cache=True)
        logits = self.lm.model(out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True).logits
        return bool(torch.isfinite(logits).all())

    def warm_up(self) -> bool:
        return self.self_test(tokens=self.variant.kv.chunk + 2)

    @torch.no_grad()
    def stream(self, ids: torch.Tensor, max_new: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None,
               cancel: threading.Event | None = None,
               deadline: float | None = None) -> Iterator[tuple[str, str | None]]:
        """Yield ``(text_delta, finish_reason)``; the last item carries ``stop``, ``length``
        or ``timeout``. Greedy at temperature 0, else seeded top-p sampling."""
        tok = self.lm.tokenizer
        gen = torch.Generator().manual_seed(seed if seed is not None else 0)
        cache = self._new_cache()
        out = self.lm.model(ids, cache=cache, use_cache=True)
        produced: list[int] = []
        text = ""
        try:
            for _ in range(max_new):
                logits = out.logits[0, -1].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    if top_p < 1.0:
                        sorted_p, order = probs.sort(descending=True)
                        keep = sorted_p.cumsum(0) - sorted_p < top_p
                        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                    nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
                else:
                    nxt = int(logits.argmax())
                if nxt == tok.eos_token_id:
                    yield "", "stop"
                    return
                produced.append(nxt)
                full = tok.decode(produced, skip_special_tokens=True)
                delta, text = full[len(text):], full
                self._account(cache)
                hit = next((s for s in (stop or []) if s in text), None)
                if hit is not None:
                    yield delta[: max(0, len(delta) - (len(text) - text.index(hit)))], "stop"
                    return
                yield delta, None
                if cancel is not None and cancel.is_set():
                    return
                if deadline is not None and time.monotonic() > deadline:
                    yield "", "timeout"
                    return
                out = self.lm.model(torch.tensor([[nxt]]), cache=cache, use_cache=True)
            yield "", "length"
        finally:
            self._account(None)

    def _account(self, cache) -> None:
        with self._kv_lock:
            if cache is None:
                self.kv_bytes_in_use = 0
            elif isinstance(cache, TurboCache):
                self.kv_bytes_in_use = cache.nbytes()
            else:
                self.kv_bytes_in_use = cache_bytes(cache)
