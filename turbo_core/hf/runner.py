"""A model switched to a variant's attention, and the one slotted cache it runs many sequences
with: what the server (``turbo_core.serving.engine``) and the evaluation's speed and recall
measurements (``turbo_core.hf.contenders``) both drive.

A forward of one new token per sequence (a decode step) goes through the step op
(``turbo_core.hf.step``): compiled with Inductor when ``compile`` is on, the same op eagerly
otherwise; a forward of several tokens (a prompt chunk) runs transformers' eager forward over
the ``TurboCache``. Both write and read the cache through the same store methods and ops."""

from __future__ import annotations

import logging

import torch

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.rotation import rotation
from turbo_core.attention.variants import Variant
from turbo_core.hf.attention import ATTN_NAME, attention_modules, enable
from turbo_core.hf.cache import TurboCache
from turbo_core.hf.models import LoadedModel
from turbo_core.hf.step import CompiledStep, StepContext, compiler_missing, eager_step, use_step_linears

log = logging.getLogger(__name__)


def compile_default(device: torch.device) -> tuple[bool, str]:
    """Whether decode steps compile by default here, and why: on CPU where Inductor's C++
    backend has a compiler; on CUDA only when asked (``compile=True``), until it has run on a
    GPU."""
    if device.type == "cuda":
        return False, ("the compiled CUDA step (Inductor's Triton kernels, CUDA graphs around the "
                       "step op) has not run on a GPU yet: the step op runs eagerly with the "
                       "Triton attention kernels; --compile turns it on")
    if device.type != "cpu":
        return False, f"the compiled step is built for CPU and CUDA; {device.type} runs the step op eagerly"
    missing = compiler_missing()
    if missing:
        return False, (f"{missing}: decode steps run the step op eagerly (on SmolLM2 at batch 8 "
                       f"and 2k tokens, 5-10 % slower a step)")
    return True, "Inductor's C++ backend"


class CacheRunner:
    """``lm`` on ``device`` with ``variant``'s attention; caches packed for quantized variants,
    float (model dtype) in the same slotted layout otherwise."""

    def __init__(self, lm: LoadedModel, variant: Variant, plan: BitPlan | None,
                 device: torch.device, compile: bool | None = None):
        if plan is not None:
            plan.check_compatible(lm.shape)
        if variant.needs_calibration and plan is None:
            raise ValueError(f"variant {variant.name} needs a bit plan (--plan)")
        self.device = device
        self.lm, self.variant, self.plan = lm, variant, plan
        self.lm.model.to(self.device)
        use_step_linears(self.lm.model)  # a decode step's few rows: the weights read once
        self.dtype = next(lm.model.parameters()).dtype
        default, why = compile_default(device)
        self.compiled = default if compile is None else compile
        if compile is None and not default:
            log.log(logging.WARNING if device.type == "cpu" else logging.INFO,
                    "decode steps not compiled: %s", why)
        # a rotated packed cache is rotated inside the step's graph (not the levers the
        # reference alone reads: it unrotates what it decompresses)
        kv = variant.kv
        rot = rotation(lm.shape.head_dim, device) if variant.quantized_cache and kv.rotate \
            and not kv.reference_only() else None
        self._attention: list[torch.nn.Module] | None = None  # set by activate()
        self._step = CompiledStep.for_model(lm.model, rot) if self.compiled \
            else eager_step(lm.model, rot)
        self.activate()

    def activate(self) -> None:
        """(Re)switch the model to this variant's attention math — needed when several runners
        share one model and take turns (the evaluation's contenders do, every step). Once
        enabled, a switch only sets each attention module's math: ``enable`` walks the module
        tree three times, ~2.5 ms on SmolLM2, which would be a twentieth of a timed step."""
        model = self.lm.model
        if self._attention is None or model.config._attn_implementation != ATTN_NAME:
            enable(model, self.variant.math)
            self._attention = attention_modules(model)
        for m in self._attention:
            m.turbo_math = self.variant.math

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
        if len(ids[0]) == 1:  # a decode step: the (compiled) step op path
            cache.select(seqs)
            return self._step(StepContext(cache, self.variant.math), torch.tensor(ids, device=self.device),
                              torch.tensor(starts, device=self.device)[:, None])
        return self.forward_cache(cache, seqs, ids, starts)

    @torch.no_grad()
    def forward_cache(self, cache: TurboCache, seqs: list[int], ids: list[list[int]],
                      starts: list[int]) -> torch.Tensor:
        """:meth:`forward` through transformers' eager forward over the ``TurboCache`` (what a
        prompt chunk takes, and the reference a step is tested against)."""
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
