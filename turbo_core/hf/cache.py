"""The packed KV cache as a transformers ``Cache``, and the bytes a cache really holds.

:class:`TurboCache` has one :class:`TurboCacheLayer` per model layer; each stores packed
INT4/INT2 bytes, integer scales and offsets plus the INT8 recent-token buffer in a
:class:`~turbo_core.attention.kvcache.QuantizedKVLayer`. :func:`cache_bytes` measures it — or
any transformers (quantized) cache — from the tensors held.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.plan import BitPlan, ModelShape

LAYER_ATTR = "turbo_cache_layer"  # attribute on the K/V handles TurboCache returns


class TurboCacheLayer(CacheLayerMixin):
    """One transformers cache layer backed by a :class:`QuantizedKVLayer`.

    ``update`` first compresses the full chunks left by the previous call, then appends the new
    tokens (INT8 per token into the recent buffer) and returns light handles: the new K/V
    tokens themselves, carrying this layer (``LAYER_ATTR``). The ``"turbo"`` attention reads the
    store in place — the fast paths never copy the history; only the reference decompresses
    what it needs. So a token attends to the recent tokens at INT8 and to older ones at their
    plan bits. The handles are not the history: TurboCache works with ``attn_implementation
    "turbo"`` only (:func:`~turbo_core.hf.attention.enable`): the next ``update`` refuses
    to go on when the previous handles were read by any other attention. :meth:`flush`
    compresses what is left, e.g. before measuring bytes at rest.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, head_bits: Sequence[int], head_dim: int, cfg: KVQuantConfig):
        super().__init__()
        self.store = QuantizedKVLayer(head_bits, head_dim, cfg)
        self.attended = True  # set False by update, True again when the turbo attention reads

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.attended:
            raise ValueError("TurboCache was read by an attention other than 'turbo'; switch the "
                             "model with turbo_core.hf.attention.enable() before using TurboCache")
        self.store.compress_full_chunks()
        self.store.append(key_states, value_states, compress=False)
        for handle in (key_states, value_states):
            setattr(handle, LAYER_ATTR, self)
        self.attended = False
        return key_states, value_states

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
        self.attended = True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("TurboCache does not support beam search reordering; use greedy or sampling")

    def offload(self) -> None:
        raise ValueError("TurboCache does not support offloading")

    def prefetch(self) -> None:
        return None

    def nbytes(self) -> int:
        return self.store.nbytes()


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
        """Bytes the cached tokens occupy (packed pages with their scales and offsets, buffered
        INT8 rows), from the tensors' sizes; :meth:`capacity_nbytes` adds unused capacity."""
        return sum(layer.nbytes() for layer in self.layers)

    def capacity_nbytes(self) -> int:
        """Bytes of every tensor the cache has allocated (free pages and buffer rows included)."""
        return sum(layer.store.capacity_nbytes() for layer in self.layers)

    def flush(self) -> None:
        """Compress every full chunk still waiting in the buffers (the state at rest)."""
        for layer in self.layers:
            layer.flush()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds, looking inside wrapper subclasses (e.g. quanto's packed
    ``QBitsTensor``) through ``__tensor_flatten__``."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def cache_bytes(cache: object) -> int:
    """Bytes held by a TurboCache or by a transformers (quantized) cache."""
    if isinstance(cache, TurboCache):
        cache.flush()  # the chunks the next token would compress: count them at rest
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += tensor_bytes(t)
    return total
