"""Functional TurboAttention API: the single place that picks an implementation.

Backends:
* ``triton`` — the fused kernels in ``turbo_kernels`` (prefill; decode over the packed cache);
* ``cpu`` — the C++ CPU ops (``turbo_kernels.cpu_ops``): ``decode_attention`` /
  ``prefill_attention`` for new tokens over the packed cache, in place, and ``attention`` over
  plain tensors (inference: the op has no backward);
* ``sdpa`` — PyTorch's ``scaled_dot_product_attention`` for exact attention (every switch off);
* ``reference`` — pure PyTorch (``turbo_core.attention.reference``), the ground truth.

``TURBO_ATTENTION_BACKEND`` = ``auto`` (default: the fastest implementation that serves the
call: Triton on CUDA, the CPU ops over a packed cache on CPU — when they are built —, SDPA for
exact math, else the reference), ``triton`` / ``cpu`` (that implementation for every call it
serves — Triton also on CPU tensors under ``TRITON_INTERPRET=1`` —, other calls run the
reference with a WARNING naming why) or ``reference``. Each distinct choice is logged once with its reason.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Unpack

import torch

from turbo_core.attention.config import EXACT, FeatureMap
from turbo_core.attention.floatcache import FloatKVLayer
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.packed import visible
from turbo_core.attention.reference import (
    KV,
    MAX_INT8_HEAD_DIM,
    AttentionOptions,
    AttentionResult,
    _valid_mask,
    _with_mask,
    attention_details,
    decode_attention_reference,
)
from turbo_core.attention.rotation import rotate, unrotate

log = logging.getLogger(__name__)

BACKEND_ENV = "TURBO_ATTENTION_BACKEND"
_BACKENDS = ("auto", "triton", "cpu", "reference")
# Query rows per KV head (GQA group x new tokens) up to which the CPU decode op (register-blocked
# loops over each page) beats the prefill op (two sgemm per tile of pages); measured on two
# cores at 1k and 4k contexts: the prefill op is 1.1x at 24 rows, 0.5x at 3 (issue 24's note).
CPU_DECODE_MAX_ROWS = 16
TRITON_MAX_ROWS = 256  # turbo_kernels.decode.MAX_ROWS (not imported: triton stays lazy)
_logged: set[tuple[str, str]] = set()


def requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r}; use one of {_BACKENDS}")
    return value


def _common_blocker(opts: AttentionOptions) -> str | None:
    math_cfg = opts.get("math_cfg", EXACT)
    if opts.get("need_probs", False):
        return "attention weights requested"
    if opts.get("dropout_p", 0.0) > 0.0:
        return "attention dropout"
    return math_cfg.kernel_blocker()


def _cache_blocker(q: torch.Tensor, store: QuantizedKVLayer, opts: AttentionOptions,
                   backend: str) -> str | None:
    """Why ``backend`` (triton or cpu) cannot read the packed cache for this call."""
    if q.dim() != 4:
        return f"query of rank {q.dim()}"
    if store.cfg.reference_only():
        return f"cache lever {' and '.join(store.cfg.reference_only())} (the kernels read one " \
               f"first-level scale per (page, head) and K after RoPE)"
    if opts.get("mask") is not None:
        return "attention mask with padding over a quantized cache"
    if opts.get("math_cfg", EXACT).pv_int8:
        return "INT8 P·V over a quantized cache"
    lq = q.shape[2]
    rows = q.shape[1] // store.num_heads * lq  # query rows per KV head
    if backend == "triton" and rows > TRITON_MAX_ROWS:
        return f"{rows} query rows per KV head over a quantized cache (> {TRITON_MAX_ROWS})"
    if backend == "cpu" and q.is_cuda:
        return f"{q.device.type} tensors"
    if backend == "cpu":
        from turbo_kernels import cpu_ops

        if not cpu_ops.load():
            return f"the C++ CPU ops are not built ({cpu_ops.stale()}; scripts/env.sh builds them)"
    return _common_blocker(opts)


def _prefill_blocker(q: torch.Tensor, k: KV, v: KV, opts: AttentionOptions) -> str | None:
    """Why the Triton prefill kernel cannot serve this call."""
    math_cfg = opts.get("math_cfg", EXACT)
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        return "pre-quantized KV input without its cache layer"
    if opts.get("mask") is not None:
        return "explicit attention mask"
    if q.dim() != 4 or not 16 <= q.shape[-1] <= 256:
        return f"head_dim {q.shape[-1] if q.dim() else '?'} outside 16..256"
    if math_cfg.pv_int8 and math_cfg.block_size % 64:
        return "INT8 P·V block not a multiple of 64"
    return _common_blocker(opts)


def _cpu_blocker(q: torch.Tensor, k: KV, v: KV, opts: AttentionOptions) -> str | None:
    """Why the C++ op ``turbo.attention`` cannot serve a call over plain tensors."""
    math_cfg = opts.get("math_cfg", EXACT)
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
        return "pre-quantized KV input without its cache layer"
    if q.is_cuda or q.dim() != 4:
        return f"{q.device.type} tensors" if q.is_cuda else f"query of rank {q.dim()}"
    if opts.get("mask") is not None:
        return "explicit attention mask"
    if math_cfg.pv_int8:
        return "INT8 P·V"
    if math_cfg.qk_int8 and q.shape[-1] > MAX_INT8_HEAD_DIM:
        return f"INT8 Q·Kᵀ at head_dim {q.shape[-1]}"
    if opts.get("causal", False) and q.shape[2] > k.shape[2]:
        return "causal attention with more queries than keys"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "gradients (the C++ op has no backward)"
    blocker = _common_blocker(opts)
    if blocker is None:
        from turbo_kernels import cpu_ops

        if not cpu_ops.load():
            return f"the C++ CPU ops are not built ({cpu_ops.stale()}; scripts/env.sh builds them)"
    return blocker


def _sdpa_serves(q: torch.Tensor, k: KV, v: KV, opts: AttentionOptions) -> bool:
    """Exact math on plain tensors of one dtype, no weights wanted, no mask (a fully masked row
    is NaN in SDPA, 0 in the reference); causal only when square (SDPA aligns causality
    top-left, ours bottom-right)."""
    if opts.get("math_cfg", EXACT) != EXACT or opts.get("need_probs", False):
        return False
    if opts.get("mask") is not None:
        return False
    if not all(isinstance(t, torch.Tensor) and t.dtype == q.dtype for t in (k, v)):
        return False
    if opts.get("window") is not None:  # served with an explicit bool mask
        return q.dim() == 4
    return q.dim() == 4 and not (opts.get("causal", False) and q.shape[2] != k.shape[2])


def choose_backend(q: torch.Tensor, k: KV, v: KV, *, kv_store: object = None,
                   **opts: Unpack[AttentionOptions]) -> tuple[str, str]:
    """``(backend, reason)`` for one call, honouring ``TURBO_ATTENTION_BACKEND``."""
    wanted = requested_backend()
    if wanted == "reference":
        return "reference", f"{BACKEND_ENV}=reference"
    if wanted in ("triton", "cpu"):
        blocker = (_cache_blocker(q, kv_store, opts, wanted) if kv_store is not None else
                   _prefill_blocker(q, k, v, opts) if wanted == "triton" else
                   _cpu_blocker(q, k, v, opts))
        if blocker:
            return "reference", f"{BACKEND_ENV}={wanted}, but no kernel for: {blocker}"
        if wanted == "triton" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{BACKEND_ENV}=triton on {q.device} tensors needs a CUDA device "
                             f"or TRITON_INTERPRET=1 (Triton's CPU interpreter)")
        return wanted, f"{BACKEND_ENV}={wanted}"
    if kv_store is not None:
        fast = "triton" if q.is_cuda else "cpu"
        blocker = _cache_blocker(q, kv_store, opts, fast)
        return ("reference", blocker) if blocker else (fast, f"packed cache on {q.device.type}")
    if _sdpa_serves(q, k, v, opts):
        return "sdpa", "exact math"
    if not q.is_cuda:
        blocker = _cpu_blocker(q, k, v, opts)
        return ("reference", blocker) if blocker else ("cpu", f"plain tensors on {q.device.type}")
    blocker = _prefill_blocker(q, k, v, opts)
    return ("reference", blocker) if blocker else ("triton", "CUDA tensors")


def turbo_attention(q: torch.Tensor, k: KV | None, v: KV | None, *,
                    kv_store: QuantizedKVLayer | FloatKVLayer | None = None,
                    kv_seqs: Sequence[int] | None = None, kv_rotated: bool = False,
                    **opts: Unpack[AttentionOptions]) -> AttentionResult:
    """TurboAttention over ``q (B, H_q, L_q, D)``, ``k, v (B, H_kv, L_k, D)``.

    See :func:`turbo_core.attention.reference.attention_details` for the arguments. With
    ``kv_store`` (the packed cache layer, already holding the ``L_q`` new tokens) ``k``/``v``
    are not used: the fast paths read the packed storage in place and only the reference
    decompresses it. ``kv_seqs`` names the store's sequences that the rows of ``q`` belong to
    (default: every open one); ``kv_rotated``: ``q`` comes rotated like a rotated store's K/V
    (``cfg.rotate``) and the output goes back rotated (the compiled step rotates in its
    graph). The kernels return ``sas_dropped = candidates = 0`` unless they
    count. A :class:`FloatKVLayer` store is read by ``turbo.float_decode_attention`` for a few
    new tokens of exact math on CPU, else per sequence (SDPA for exact math).
    """
    math_cfg, scale = opts.get("math_cfg", EXACT), opts.get("scale")
    features, seq_proj = opts.pop("features", None), opts.pop("seq_proj", None)
    if math_cfg.structural:
        if kv_store is not None:
            raise ValueError("kernel and low-rank attention do not read a KV cache (they are "
                             "layers of their own, not approximations of the cached softmax)")
        return _structural(q, k, v, features, seq_proj, opts)
    if features is not None or seq_proj is not None:
        raise ValueError("features / seq_proj are for kernel / low-rank attention (math_cfg."
                         "kernel / low_rank), which this math_cfg does not set")
    if isinstance(kv_store, FloatKVLayer):
        return _over_float(q, kv_store, kv_seqs, opts)
    backend, reason = choose_backend(q, k, v, kv_store=kv_store, **opts)
    if (backend, reason) not in _logged:
        _logged.add((backend, reason))
        forced_miss = backend == "reference" and reason.startswith(f"{BACKEND_ENV}=")
        log.log(logging.WARNING if forced_miss and "=reference" not in reason else logging.INFO,
                "TurboAttention backend: %s (%s)", backend, reason)
    if kv_store is not None:
        if kv_rotated:
            return _over_packed(q, kv_store, kv_seqs, backend, opts)
        return _over_cache(q, kv_store, kv_seqs, backend, opts)
    if backend == "sdpa":
        window, causal = opts.get("window"), opts.get("causal", False)
        allowed = None if window is None else _valid_mask(q.shape[2], k.shape[2], causal, q.device, window)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=opts.get("dropout_p", 0.0),
            is_causal=causal and allowed is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return AttentionResult(out=out, probs=None, sas_dropped=0, candidates=0)
    if backend == "cpu":
        from turbo_kernels import cpu_ops

        out, dropped, candidates = cpu_ops.attention(q, k, v, math_cfg=math_cfg, scale=scale,
                                                     causal=opts.get("causal", False),
                                                     window=opts.get("window"))
        return AttentionResult(out=out, probs=None, sas_dropped=dropped, candidates=candidates)
    if backend == "triton":
        from turbo_kernels.prefill import prefill_attention

        out = prefill_attention(q, k, v, math_cfg=math_cfg, causal=opts.get("causal", False),
                                scale=scale, window=opts.get("window"))
        return AttentionResult(out=out, probs=None, sas_dropped=0, candidates=0)
    return attention_details(q, k, v, **opts)


def _structural(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor | None,
                seq_proj: tuple[torch.Tensor, torch.Tensor] | None,
                opts: AttentionOptions) -> AttentionResult:
    """Kernel attention (``turbo_core.attention.linear``) or Linformer's projections followed by
    the rest of the math (``turbo_core.attention.lowrank``); pure PyTorch, differentiable."""
    from turbo_core.attention import linear, lowrank

    math_cfg = opts["math_cfg"]
    if opts.get("window") is not None:
        raise ValueError("kernel and low-rank attention take no sliding window")
    if math_cfg.low_rank is not None:
        kk, vv = lowrank.project(k, v, seq_proj, causal=opts.get("causal", False),
                                 mask=opts.get("mask"))
        rest = dataclasses.replace(math_cfg, low_rank=None, max_seq_len=None)
        return turbo_attention(q, kk, vv, **{**opts, "math_cfg": rest, "mask": None})
    if opts.get("dropout_p", 0.0) > 0.0:
        raise ValueError("kernel attention forms no attention matrix to apply dropout to; "
                         "use dropout_p=0")
    if math_cfg.kernel is FeatureMap.FAVOR and features is None:
        features = linear.default_features(math_cfg.num_features, q.shape[-1], q.device, q.dtype)
    causal, scale = opts.get("causal", False), opts.get("scale")
    out = linear.kernel_attention(q, k, v, kind=math_cfg.kernel, features=features,
                                  causal=causal, scale=scale, mask=opts.get("mask"))
    probs = None
    if opts.get("need_probs", False):  # the implied weights, O(L²) like MHA's
        probs = linear.implied_weights(q, k, kind=math_cfg.kernel, features=features,
                                       causal=causal, scale=scale, mask=opts.get("mask"))
    return AttentionResult(out=out, probs=probs, sas_dropped=0, candidates=0)


def _over_float(q: torch.Tensor, store: FloatKVLayer | QuantizedKVLayer, seqs: Sequence[int] | None,
                opts: AttentionOptions) -> AttentionResult:
    """Each sequence over its own held rows (lengths differ); new tokens are the newest ``L_q``,
    and each key is masked by its token position: causal, inside the store's sliding window, and
    by an explicit token-order mask when one is given. A packed store is read this way
    (decompressed to float) when it uses a reference-only lever."""
    seqs = store.sequences if seqs is None else list(seqs)
    if len(seqs) != q.shape[0]:
        raise ValueError(f"{q.shape[0]} query rows for {len(seqs)} cached sequences")
    if isinstance(store, FloatKVLayer) and _float_op_serves(q, store, opts):
        from turbo_kernels import cpu_ops

        slots, lo, hi = store.held_rows(seqs)
        k_cache, v_cache = store.tensors()
        out = cpu_ops.float_decode_attention(q, k_cache, v_cache, slots, lo, hi,
                                             window=store.window, scale=opts.get("scale"))
        return AttentionResult(out=out, probs=None, sas_dropped=0, candidates=0)
    mask, lq = opts.get("mask"), q.shape[2]
    outs, dropped, total = [], 0, 0
    for i, s in enumerate(seqs):
        k, v = store.keys_values(s)
        k, v = k.to(q.dtype), v.to(q.dtype)
        pos = store.positions(s).to(q.device)
        allowed = visible(pos, pos[-1] - lq + 1 + torch.arange(lq, device=q.device), store.window)
        plain = mask is None and (store.window is None or bool(allowed.all())) and \
            int(pos[0]) == 0 and lq in (1, k.shape[1])  # no gap, nothing out of the window
        m = None if plain else _with_mask(allowed[None, None], mask, i, pos)
        exact = _sdpa_serves(q, k, v, {**opts, "mask": None, "causal": False, "window": None})
        if exact and mask is None:  # every row sees itself: no fully masked row (NaN in SDPA)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q[i: i + 1], k[None], v[None], attn_mask=m, is_causal=m is None and lq > 1,
                scale=opts.get("scale"), enable_gqa=q.shape[1] != k.shape[0]))
            continue
        one = {**opts, "mask": m, "causal": m is None and lq > 1, "window": None}
        res = turbo_attention(q[i: i + 1], k[None], v[None], **one)
        outs.append(res.out)
        dropped, total = dropped + res.sas_dropped, total + res.candidates
    return AttentionResult(out=torch.cat(outs), probs=None, sas_dropped=dropped, candidates=total)


def cpu_ops_allowed() -> bool:
    """Whether the C++ CPU ops may run: no other backend forced (``TURBO_ATTENTION_BACKEND``)
    and the ops built (``turbo_kernels.cpu_ops.load``). Every caller outside the dispatch
    above (the stores' writes, the float decode op, the step's linear layers) asks this."""
    if requested_backend() not in ("auto", "cpu"):
        return False
    from turbo_kernels import cpu_ops  # lazy: the kernels package stays out of imports

    return cpu_ops.load()


def _float_op_serves(q: torch.Tensor, store: FloatKVLayer, opts: AttentionOptions) -> bool:
    """``turbo.float_decode_attention`` serves exact math over a float32 CPU store, no mask, a
    few new tokens (it scores them by dot products; a prompt chunk goes to SDPA's tiles)."""
    if opts.get("math_cfg", EXACT) != EXACT or opts.get("mask") is not None or \
            _common_blocker(opts) is not None:
        return False
    if q.device.type != "cpu" or q.dtype != torch.float32 or store.dtype != torch.float32 or \
            q.shape[1] // store.num_heads * q.shape[2] > CPU_DECODE_MAX_ROWS:
        return False
    return cpu_ops_allowed()


def _over_cache(q: torch.Tensor, store: QuantizedKVLayer, seqs: Sequence[int] | None,
                backend: str, opts: AttentionOptions) -> AttentionResult:
    """Attention over the packed store; a rotated store (``cfg.rotate``) holds ``K R`` and
    ``V R``, so queries go in as ``q R`` and the output comes back as ``out Rᵀ``. The levers
    only the reference reads (``cfg.reference_only``) decompress each sequence to float K/V."""
    if store.cfg.reference_only():
        return _over_float(q, store, seqs, opts)
    if not store.cfg.rotate:
        return _over_packed(q, store, seqs, backend, opts)
    res = _over_packed(rotate(q).to(q.dtype), store, seqs, backend, opts)
    return dataclasses.replace(res, out=unrotate(res.out).to(res.out.dtype))


def _over_packed(q: torch.Tensor, store: QuantizedKVLayer, seqs: Sequence[int] | None,
                 backend: str, opts: AttentionOptions) -> AttentionResult:
    math_cfg, scale = opts.get("math_cfg", EXACT), opts.get("scale")
    if backend == "cpu":
        from turbo_kernels import cpu_ops

        rows = q.shape[1] // store.num_heads * q.shape[2]
        op = cpu_ops.decode_attention if rows <= CPU_DECODE_MAX_ROWS else cpu_ops.prefill_attention
        out, dropped, candidates = op(q, store.view(seqs), math_cfg=math_cfg, scale=scale)
        return AttentionResult(out=out, probs=None, sas_dropped=dropped, candidates=candidates)
    if backend == "triton":
        from turbo_kernels.decode import decode_attention

        out = decode_attention(q, store.view(seqs), math_cfg=math_cfg, scale=scale)
        return AttentionResult(out=out, probs=None, sas_dropped=0, candidates=0)
    if opts.get("need_probs") or opts.get("dropout_p"):
        raise ValueError("attention weights and dropout are not served over the packed KV cache "
                         "(inference only); run without a TurboCache")
    return decode_attention_reference(q, store.view(seqs), math_cfg=math_cfg, scale=scale,
                                      mask=opts.get("mask"))
