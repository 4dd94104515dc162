"""A model switched to a variant's attention, and the one slotted cache it runs many sequences
with: what the server (``turbo_core.serving.engine``) and the evaluation's speed and recall
measurements (``turbo_core.hf.contenders``) both drive."""

from __future__ import annotations

import torch

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant
from turbo_core.hf.attention import enable
from turbo_core.hf.cache import TurboCache
from turbo_core.hf.models import LoadedModel


class CacheRunner:
    """``lm`` on ``device`` with ``variant``'s attention; caches packed for quantized variants,
    float (model dtype) in the same slotted layout otherwise."""

    def __init__(self, lm: LoadedModel, variant: Variant, plan: BitPlan | None,
                 device: torch.device):
        if plan is not None:
            plan.check_compatible(lm.shape)
        if variant.needs_calibration and plan is None:
            raise ValueError(f"variant {variant.name} needs a bit plan (--plan)")
        self.device = device
        self.lm, self.variant, self.plan = lm, variant, plan
        self.lm.model.to(self.device)
        self.dtype = next(lm.model.parameters()).dtype
        self.activate()

    def activate(self) -> None:
        """(Re)switch the model to this variant's attention math — needed when several runners
        share one model and take turns."""
        enable(self.lm.model, self.variant.math)

    def new_cache(self) -> TurboCache:
        bits = (self.plan if self.plan is not None else self.variant.kv_bits) \
            if self.variant.quantized_cache else None
        return TurboCache.for_model(self.lm.model, self.lm.shape, bits, self.variant.kv,
                                    dtype=self.dtype)

    @torch.no_grad()
    def forward(self, cache: TurboCache, seqs: list[int], ids: list[list[int]],
                starts: list[int]) -> torch.Tensor:
        """New tokens ``ids[i]`` (all of one length) for sequence ``seqs[i]``, whose cache holds
        ``starts[i]`` tokens; returns the last position's logits ``(N, vocab)``."""
        cache.select(seqs)
        t = len(ids[0])
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(t, device=self.device)
        out = self.lm.model(input_ids=torch.tensor(ids, device=self.device), position_ids=pos,
                            cache=cache, use_cache=True, logits_to_keep=1)
        cache.flush(seqs)  # at rest between steps: < one chunk of rows per sequence buffered
        return out.logits[:, -1]

    def bytes_for(self, tokens: int) -> int:
        """KV bytes one sequence of ``tokens`` tokens occupies at rest in this runner's cache."""
        return self.new_cache().bytes_for(tokens)
