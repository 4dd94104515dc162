"""transformers integration: the ``turbo`` attention implementation.

* Attention goes through transformers' ``AttentionInterface`` under the name ``"turbo"`` (no
  model file is copied or patched), so every model family that dispatches through
  ``ALL_ATTENTION_FUNCTIONS`` — Llama, Qwen2/3, Mistral, Phi-3, Gemma… — runs TurboAttention.
  GQA keys arrive un-repeated and are handled by the reference/kernels directly.
* K/V that come from :class:`~turbo_core.hf.cache.TurboCache` carry their INT8 rows and the
  packed store they came from, which the decode kernel reads.
* Sliding windows: a cache layer knows its window (``features.layer_windows``) and every reader
  applies it per sequence; transformers' causal or sliding-window mask is recognised and
  dropped, any other mask (padding) is applied by token position. A layer whose own
  ``sliding_window`` differs from its cache layer's is refused, and so is anything
  ``features.check_supported`` names (soft-capping, ALiBi, non-causal attention...).

The per-module math is set by :func:`enable` as ``module.turbo_math`` on each attention module.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from turbo_core.attention.config import EXACT, AttentionMath
from turbo_core.attention.functional import turbo_attention
from turbo_core.attention.packed import visible
from turbo_core.attention.rotation import rotate, unrotate
from turbo_core.hf.cache import LAYER_ATTR
from turbo_core.hf.features import check_supported
from turbo_core.hf.step import ROTATION_KWARG, STEP_KWARG, attend

ATTN_NAME = "turbo"


def turbo_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention function. ``query (B, H_q, L, D)``, ``key/value (B, H_kv, S, D)``,
    ``attention_mask`` bool ``(B, 1, L, S)`` (True = attend); returns ``(B, L, H_q, D)``.
    ``kwargs`` may carry the layer's ``sliding_window`` (what transformers' own attention
    functions apply) and ``softcap``, which is refused. With ``turbo_step`` (what
    :class:`~turbo_core.hf.step.CompiledStep` passes the model) the new tokens go to the step
    op, which writes and reads the active step's cache (transformers' mask is not needed: the
    cache knows each sequence's positions)."""
    if kwargs.get(STEP_KWARG):
        rot = kwargs.get(ROTATION_KWARG)  # the store's R: rotated here, in the graph
        if rot is None:
            out = attend(query, key, value, module.layer_idx, float(scaling), False)
        else:  # as the store and _over_cache rotate: q back to its dtype, the output too
            out = attend(rotate(query, rot).to(query.dtype), rotate(key, rot), rotate(value, rot),
                         module.layer_idx, float(scaling), True)
            out = unrotate(out, rot).to(out.dtype)
        return out.transpose(1, 2).contiguous(), None
    math_cfg: AttentionMath = getattr(module, "turbo_math", EXACT)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attention logit soft-capping (softcap={kwargs['softcap']}) is not "
                         f"implemented by TurboAttention")
    layer = getattr(key, LAYER_ATTR, None)  # a TurboCache handle: the history is in its store
    store = layer.store if layer is not None else None
    window = kwargs.get("sliding_window")
    if layer is not None:
        layer.attended = True
        if "sliding_window" in kwargs and window != store.window:
            raise ValueError(f"layer {getattr(module, 'layer_idx', '?')} attends over a sliding "
                             f"window of {window} but its TurboCache layer was built with "
                             f"{store.window}; build the cache with TurboCache.for_model(model, ...)")
        window = store.window
    seqs = layer.seqs if layer is not None else None
    lk = max(store.seq_lens(seqs)) if store is not None else key.shape[2]
    lq = query.shape[2]
    causal = attention_mask is None and getattr(module, "is_causal", True) and lq > 1
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)  # additive float mask
    elif attention_mask is not None and _is_plain_causal(attention_mask, lq, lk, window):
        attention_mask, causal = None, True  # no padding: lets the fused kernels take the call
    if store is not None and attention_mask is not None and attention_mask.shape[-1] != lk:
        raise ValueError(f"attention mask covers {attention_mask.shape[-1]} keys but the TurboCache "
                         f"layer holds {lk}")
    # without a cache the window is an option of the call (the mask, if any, already has it)
    window = window if store is None and attention_mask is None and causal else None
    res = turbo_attention(query, key, value, math_cfg=math_cfg, causal=causal, scale=scaling,
                          mask=attention_mask, window=window, dropout_p=dropout, kv_store=store,
                          kv_seqs=seqs)
    _record_sparsity(module, res.sas_dropped, res.candidates)
    return res.out.transpose(1, 2).contiguous(), None


def _is_plain_causal(mask: torch.Tensor, lq: int, lk: int, window: int | None) -> bool:
    """True when a bool ``(B, 1, L_q, L_k)`` mask is exactly bottom-right causal, within
    ``window`` when there is one (no padding): what the readers apply by themselves."""
    if mask.shape[-1] != lk:
        return False
    keys = torch.arange(lk, device=mask.device)
    return bool(torch.equal(mask, visible(keys, keys[lk - lq:], window).expand_as(mask)))


def _record_sparsity(module: torch.nn.Module, dropped: int, candidates: int) -> None:
    stats = getattr(module, "turbo_sas_counts", None)
    if stats is not None:
        stats[0] += dropped
        stats[1] += candidates


def register() -> None:
    """Register ``"turbo"`` with transformers (idempotent). Masks are always materialised as
    bool ``(B, 1, L, S)`` so padding and causality reach the reference unchanged."""
    AttentionInterface.register(ATTN_NAME, turbo_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, partial(sdpa_mask, allow_is_causal_skip=False))


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules: ``*Attention`` modules that carry a ``layer_idx``."""
    found = [m for m in model.modules()
             if hasattr(m, "layer_idx") and type(m).__name__.endswith("Attention")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no *Attention modules with a layer_idx; "
                         f"this architecture is not supported")
    return sorted(found, key=lambda m: m.layer_idx)


def enable(model: torch.nn.Module, math_cfg: AttentionMath) -> torch.nn.Module:
    """Switch ``model`` to TurboAttention with ``math_cfg`` (in place; returns the model).
    Refuses, by name, a model whose attention uses a feature TurboAttention does not implement
    (``features.check_supported``)."""
    check_supported(model)
    register()
    for m in attention_modules(model):
        m.turbo_math = math_cfg
        m.turbo_sas_counts = [0, 0]
    model.set_attn_implementation(ATTN_NAME)
    return model


def sas_zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of attention weights SAS zeroed since :func:`enable` / :func:`reset_counters`."""
    dropped = total = 0
    for m in attention_modules(model):
        d, t = getattr(m, "turbo_sas_counts", (0, 0))
        dropped, total = dropped + d, total + t
    return dropped / total if total else 0.0


def reset_counters(model: torch.nn.Module) -> None:
    for m in attention_modules(model):
        m.turbo_sas_counts = [0, 0]
