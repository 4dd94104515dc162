"""Functional TurboAttention API: the single place that picks an implementation.

Backends: ``triton`` (the fused kernels in ``turbo_kernels``) and ``reference`` (pure PyTorch,
``turbo_core.attention.reference``). ``TURBO_ATTENTION_BACKEND`` = ``auto`` (default: Triton on CUDA
tensors when a kernel implements the call, else the reference), ``triton`` (the kernels for
every call they implement, also on CPU tensors under ``TRITON_INTERPRET=1``; other calls run
the reference with a WARNING naming why) or ``reference``. Each distinct choice is logged once
with its reason.
"""

from __future__ import annotations

import logging
import os
from typing import Unpack

import torch

from turbo_core.attention.config import EXACT
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.reference import KV, AttentionOptions, AttentionResult, attention_details

log = logging.getLogger(__name__)

BACKEND_ENV = "TURBO_ATTENTION_BACKEND"
_BACKENDS = ("auto", "triton", "reference")
_logged: set[tuple[str, str]] = set()


def requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}; use one of {_BACKENDS}")
    return value


def _kernel_blocker(q: torch.Tensor, k: KV, v: KV, opts: AttentionOptions,
                    kv_store: object = None) -> str | None:
    """Why the kernels cannot serve this call (None = they can)."""
    math_cfg, mask = opts.get("math_cfg", EXACT), opts.get("mask")
    if kv_store is not None:
        if q.dim() != 4 or q.shape[2] != 1:
            return "several new tokens over a quantized cache (chunked prefill)"
        if math_cfg.pv_int8 or math_cfg.sparse_ratio is not None:
            return "INT8 P·V or top-k in decode"
        return "attention mask over a quantized cache" if mask is not None else None
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        return "pre-quantized KV input without its cache layer"
    if mask is not None:
        return "explicit attention mask"
    if opts.get("need_probs", False):
        return "attention weights requested"
    if opts.get("dropout_p", 0.0) > 0.0:
        return "attention dropout"
    if math_cfg.sparse_ratio is not None:
        return "top-k sparsity"
    if q.dim() != 4 or not 16 <= q.shape[-1] <= 256:
        return f"head_dim {q.shape[-1] if q.dim() else '?'} outside 16..256"
    if math_cfg.pv_int8 and math_cfg.block_size % 64:
        return "INT8 P·V block not a multiple of 64"
    return None


def choose_backend(q: torch.Tensor, k: KV, v: KV, *, kv_store: object = None,
                   **opts: Unpack[AttentionOptions]) -> tuple[str, str]:
    """``(backend, reason)`` for one call, honouring ``TURBO_ATTENTION_BACKEND``."""
    wanted = requested_backend()
    blocker = _kernel_blocker(q, k, v, opts, kv_store)
    if wanted == "reference":
        return "reference", f"{BACKEND_ENV}=reference"
    if wanted == "triton":
        if blocker:
            return "reference", f"{BACKEND_ENV}=triton, but no kernel for: {blocker}"
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{BACKEND_ENV}=triton on {q.device} tensors needs a CUDA device "
                             f"or TRITON_INTERPRET=1 (Triton's CPU interpreter)")
        return "triton", f"{BACKEND_ENV}=triton"
    if not q.is_cuda:
        return "reference", f"{q.device.type} tensors"
    if blocker:
        return "reference", blocker
    return "triton", "CUDA tensors"


def turbo_attention(q: torch.Tensor, k: KV, v: KV, *, kv_store: QuantizedKVLayer | None = None,
                    **opts: Unpack[AttentionOptions]) -> AttentionResult:
    """TurboAttention over ``q (B, H_q, L_q, D)``, ``k, v (B, H_kv, L_k, D)``.

    See :func:`turbo_core.attention.reference.attention_details` for the arguments. ``kv_store``: the
    packed cache layer ``k``/``v`` were read from; with one new token the Triton decode kernel
    reads it directly. The Triton paths return ``sas_dropped = candidates = 0`` (no counting).
    """
    math_cfg, scale = opts.get("math_cfg", EXACT), opts.get("scale")
    backend, reason = choose_backend(q, k, v, kv_store=kv_store, **opts)
    if (backend, reason) not in _logged:
        _logged.add((backend, reason))
        forced_miss = backend == "reference" and reason.startswith(f"{BACKEND_ENV}=triton")
        log.log(logging.WARNING if forced_miss else logging.INFO,
                "TurboAttention backend: %s (%s)", backend, reason)
    if backend == "triton" and kv_store is not None:
        from turbo_kernels.decode import decode_attention

        out = decode_attention(q, kv_store.view(), math_cfg=math_cfg, scale=scale)
        return AttentionResult(out=out, probs=None, sas_dropped=0, candidates=0)
    if backend == "triton":
        from turbo_kernels.prefill import prefill_attention

        out = prefill_attention(q, k, v, math_cfg=math_cfg, causal=opts.get("causal", False), scale=scale)
        return AttentionResult(out=out, probs=None, sas_dropped=0, candidates=0)
    return attention_details(q, k, v, **opts)


def backend_name(device: str | torch.device = "cpu") -> str:
    """What ``auto`` (or the env override) picks for a plain prefill call on ``device``."""
    wanted = requested_backend()
    if wanted != "auto":
        return wanted
    return "triton" if torch.device(device).type == "cuda" else "reference"
