"""transformers integration: the ``turbo`` attention implementation and the packed KV cache.

* Attention goes through transformers' ``AttentionInterface`` under the name ``"turbo"`` (no
  model file is copied or patched), so every model family that dispatches through
  ``ALL_ATTENTION_FUNCTIONS`` — Llama, Qwen2/3, Mistral, Phi-3, Gemma… — runs TurboAttention.
  GQA keys arrive un-repeated and are handled by the reference/kernels directly.
* :class:`TurboCache` is a transformers ``Cache`` whose layers really store packed INT4/INT2
  bytes, integer scales and offsets plus the INT8 recent-token buffer (``QuantizedKVLayer``).

The per-module math is set by :func:`enable` as ``module.turbo_math`` on each attention module.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from turbo_core.config import EXACT, AttentionMath, KVQuantConfig
from turbo_core.functional import turbo_attention
from turbo_core.kvcache import QuantizedKVLayer
from turbo_core.plan import BitPlan, ModelShape
from turbo_core.quant import Int8Rows

ATTN_NAME = "turbo"
_INT8_ATTR = "turbo_int8"  # attribute on K/V tensors returned by TurboCache: their INT8 rows
_STORE_ATTR = "turbo_store"  # ... and the QuantizedKVLayer they came from (for the decode kernel)


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
    ``attention_mask`` bool ``(B, 1, L, S)`` (True = attend); returns ``(B, L, H_q, D)``."""
    math_cfg: AttentionMath = getattr(module, "turbo_math", EXACT)
    k = getattr(key, _INT8_ATTR, None) or key
    v = getattr(value, _INT8_ATTR, None) or value
    causal = attention_mask is None and getattr(module, "is_causal", True) and query.shape[2] > 1
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)  # additive float mask
    elif attention_mask is not None and _is_plain_causal(attention_mask, query.shape[2], key.shape[2]):
        attention_mask, causal = None, True  # no padding: lets the fused kernel take the call
    res = turbo_attention(
        query, k, v, math_cfg=math_cfg, causal=causal, scale=scaling, mask=attention_mask,
        dropout_p=dropout, kv_store=getattr(key, _STORE_ATTR, None) if query.shape[2] == 1 else None,
    )
    _record_sparsity(module, res.sas_dropped, res.candidates)
    return res.out.transpose(1, 2).contiguous(), None


def _is_plain_causal(mask: torch.Tensor, lq: int, lk: int) -> bool:
    """True when a bool ``(B, 1, L_q, L_k)`` mask is exactly bottom-right causal (no padding)."""
    i = torch.arange(lq, device=mask.device).unsqueeze(-1)
    j = torch.arange(lk, device=mask.device).unsqueeze(0)
    return bool(torch.equal(mask, (j <= i + (lk - lq)).expand_as(mask)))


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
    """Switch ``model`` to TurboAttention with ``math_cfg`` (in place; returns the model)."""
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


class TurboCacheLayer(CacheLayerMixin):
    """One transformers cache layer backed by a :class:`QuantizedKVLayer`.

    ``update`` first compresses the full chunks left by the previous call, then appends the new
    tokens (INT8 per token into the recent buffer) and returns K/V for attention — compressed
    chunks decompressed to INT8 (integer-only) plus the buffer, as float tensors that also carry
    their :class:`Int8Rows` and the store itself. So a token attends to the recent tokens at
    INT8 and to older ones at their plan bits, and the store after ``update`` is exactly what
    the attention reads (the decode kernel reads the store). :meth:`flush` compresses what is
    left, e.g. before measuring bytes at rest.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, head_bits: Sequence[int], head_dim: int, cfg: KVQuantConfig):
        super().__init__()
        self.store = QuantizedKVLayer(head_bits, head_dim, cfg)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.compress_full_chunks()
        self.store.append(key_states, value_states, compress=False)
        k8, v8 = self.store.dequantize_int8()
        return _carrying(k8, self.dtype, self.store), _carrying(v8, self.dtype, self.store)

    def flush(self) -> None:
        self.store.compress_full_chunks()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.seq_len

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store = QuantizedKVLayer(self.store.head_bits, self.store.head_dim, self.store.cfg)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("TurboCache does not support beam search reordering; use greedy or sampling")

    def offload(self) -> None:
        raise ValueError("TurboCache does not support offloading")

    def prefetch(self) -> None:
        return None

    def nbytes(self) -> int:
        return self.store.nbytes()


def _carrying(rows: Int8Rows, dtype: torch.dtype, store: QuantizedKVLayer) -> torch.Tensor:
    t = rows.dequantize(torch.float32).to(dtype)
    setattr(t, _INT8_ATTR, rows)
    setattr(t, _STORE_ATTR, store)
    return t


class TurboCache(Cache):
    """Packed INT4/INT2 KV cache for ``generate()`` / ``forward``, one layer per model layer,
    bits per (layer, KV head) from a :class:`BitPlan` or a uniform width."""

    def __init__(self, shape: ModelShape, bits: BitPlan | int, cfg: KVQuantConfig | None = None):
        cfg = cfg or KVQuantConfig()
        if isinstance(bits, BitPlan):
            bits.check_compatible(shape)
            grid = bits.bits_grid()
        else:
            grid = [[bits] * shape.num_kv_heads for _ in range(shape.num_layers)]
        super().__init__(layers=[TurboCacheLayer(row, shape.head_dim, cfg) for row in grid])
        self.shape = shape

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (packed codes, scales, offsets, buffer)."""
        return sum(layer.nbytes() for layer in self.layers)

    def flush(self) -> None:
        """Compress every full chunk still waiting in the buffers (the state at rest)."""
        for layer in self.layers:
            layer.flush()
