"""Contenders that generate token by token, for the speed and retrieval measurements of
``turbo evaluate``: our runner (what ``turbo serve``'s engine drives, packed or float cache)
and transformers' own caches (the quantized-cache peers) behind one small interface.

``start(prompts)`` prefills a batch and returns its state and the last position's logits
``(B, vocab)``; ``step(state, tokens)`` feeds one token per sequence and returns the next
logits. Both run under ``torch.no_grad``; each call switches the shared model to the
contender's attention first, so contenders on one model can take turns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant
from turbo_core.hf.models import LoadedModel
from turbo_core.hf.runner import CacheRunner

PREFILL_CHUNK = 512  # what `turbo serve` prefills at once by default (Limits.prefill_chunk)


@dataclass
class State:
    cache: object
    seqs: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


class EngineContender:
    """A variant as our serving engine runs it: one slotted cache, each prompt prefilled on its own in
    chunks of ``PREFILL_CHUNK``, all sequences decoded together in one forward per step."""

    def __init__(self, lm: LoadedModel, variant: Variant, plan: BitPlan | None,
                 name: str | None = None):
        self.runner = CacheRunner(lm, variant, plan, lm.model.device)
        self.name = name or variant.name

    def new_state(self) -> State:
        return State(self.runner.new_cache())

    @torch.no_grad()
    def add(self, state: State, prompt: list[int]) -> torch.Tensor:
        """Prefill one more sequence into ``state``; its last logits ``(vocab,)``."""
        self.runner.activate()
        seq = state.cache.add_sequence()
        logits = None
        for s in range(0, len(prompt), PREFILL_CHUNK):
            logits = self.runner.forward(state.cache, [seq], [prompt[s:s + PREFILL_CHUNK]], [s])
        state.seqs.append(seq)
        state.lengths.append(len(prompt))
        return logits[0]

    def start(self, prompts: list[list[int]]) -> tuple[State, torch.Tensor]:
        state = self.new_state()
        return state, torch.stack([self.add(state, p) for p in prompts])

    @torch.no_grad()
    def step(self, state: State, tokens: list[int]) -> torch.Tensor:
        self.runner.activate()
        logits = self.runner.forward(state.cache, state.seqs, [[t] for t in tokens], state.lengths)
        state.lengths = [n + 1 for n in state.lengths]
        return logits


class HFCacheContender:
    """transformers' own attention (SDPA) over a cache it makes (``new_cache()``), e.g. its
    ``QuantizedCache``: a dense batch, so the prompts of one ``start`` must be equally long."""

    def __init__(self, lm: LoadedModel, name: str, new_cache: Callable[[], object]):
        self.lm, self.name, self.new_cache = lm, name, new_cache

    def _forward(self, state: State, ids: torch.Tensor) -> torch.Tensor:
        self.lm.model.set_attn_implementation("sdpa")
        out = self.lm.model(input_ids=ids.to(self.lm.model.device), cache=state.cache,
                            use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def start(self, prompts: list[list[int]]) -> tuple[State, torch.Tensor]:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError(f"{self.name}: a batch needs prompts of one length, got "
                             f"{sorted({len(p) for p in prompts})}")
        state = State(self.new_cache(), list(range(len(prompts))), [len(p) for p in prompts])
        ids = torch.tensor(prompts)
        logits = None
        for s in range(0, ids.shape[1], PREFILL_CHUNK):
            logits = self._forward(state, ids[:, s:s + PREFILL_CHUNK])
        return state, logits

    @torch.no_grad()
    def step(self, state: State, tokens: list[int]) -> torch.Tensor:
        logits = self._forward(state, torch.tensor(tokens)[:, None])
        state.lengths = [n + 1 for n in state.lengths]
        return logits


Contender = EngineContender | HFCacheContender


def greedy(contender: Contender, prompt: list[int], max_new: int,
           eos: int | None = None) -> list[int]:
    """Greedy continuation of one prompt (stops at ``eos``)."""
    state, logits = contender.start([prompt])
    out: list[int] = []
    while len(out) < max_new:
        token = int(logits[0].argmax())
        if token == eos:
            break
        out.append(token)
        if len(out) < max_new:
            logits = contender.step(state, [token])
    return out
