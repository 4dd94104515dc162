"""The packed KV cache as a transformers ``Cache``, and the bytes a cache really holds.

:class:`TurboCache` has one :class:`TurboCacheLayer` per model layer; each stores packed
INT4/INT2 bytes, integer scales and offsets plus the INT8 recent-token buffer in a
:class:`~turbo_core.attention.kvcache.QuantizedKVLayer`. :func:`cache_bytes` measures it — or
any transformers (quantized) cache — from the tensors held.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.floatcache import FloatKVLayer
from turbo_core.attention.kvcache import QuantizedKVLayer, Rope
from turbo_core.attention.plan import BitPlan, ModelShape
from turbo_core.hf.features import layer_windows, text_config

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

    def __init__(self, store: QuantizedKVLayer | FloatKVLayer):
        super().__init__()
        self.store = store
        self.is_sliding = store.window is not None  # the store applies it; masks stay full length
        self.seqs: list[int] | None = None  # the sequences the next update writes (None: all)
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
        self.store.update(key_states, value_states, seqs=self.seqs)
        for handle in (key_states, value_states):
            setattr(handle, LAYER_ATTR, self)
        self.attended = False
        return key_states, value_states

    def flush(self, seqs: Sequence[int] | None = None) -> None:
        self.store.compress_full_chunks(seqs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return max(self.store.seq_lens(self.seqs), default=0)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for seq in self.store.sequences:
            self.store.release(seq)
        self.seqs, self.attended = None, True

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
    bits per (layer, KV head) from a :class:`BitPlan` or a uniform width; ``bits=None`` keeps
    float K/V (``dtype``) in the same slotted layout — the baseline a server batches alike.

    Sequences: a plain batch opens one per row on first use. A server opens them itself
    (:meth:`add_sequence`), points each forward at the ones it carries (:meth:`select`), and
    :meth:`release` frees a finished one's storage for the next. ``rope`` (:func:`model_rope`;
    one, or one per layer) is what a cache storing K before RoPE (``cfg.pre_rope``) needs.
    ``windows`` gives each layer's sliding window (``None``: full attention); build the cache
    with :meth:`for_model` so both come from the model itself.
    """

    def __init__(self, shape: ModelShape, bits: BitPlan | int | None,
                 cfg: KVQuantConfig | None = None, dtype: torch.dtype = torch.float32,
                 rope: Rope | Sequence[Rope | None] | None = None,
                 windows: Sequence[int | None] | None = None):
        cfg = cfg or KVQuantConfig()
        windows = tuple(windows) if windows is not None else (None,) * shape.num_layers
        ropes = tuple(rope) if isinstance(rope, Sequence) else (rope,) * shape.num_layers
        if len(windows) != shape.num_layers or len(ropes) != shape.num_layers:
            raise ValueError(f"TurboCache for {shape.num_layers} layers got {len(windows)} "
                             f"windows and {len(ropes)} RoPE functions")
        if bits is None:
            stores = [FloatKVLayer(shape.num_kv_heads, shape.head_dim, dtype, window=w)
                      for w in windows]
        else:
            if isinstance(bits, BitPlan):
                bits.check_compatible(shape)
                bits.check_layout(cfg.levers())
                grid = bits.bits_grid()
            else:
                grid = [[bits] * shape.num_kv_heads for _ in range(shape.num_layers)]
            bases = getattr(bits, "low_rank_bases", None) or [None] * shape.num_layers
            stores = [QuantizedKVLayer(row, shape.head_dim, cfg, r, window=w, basis=u)
                      for row, r, w, u in zip(grid, ropes, windows, bases, strict=True)]
        super().__init__(layers=[TurboCacheLayer(s) for s in stores])
        self.shape = shape
        self.quantized = bits is not None
        self.windows = windows
        self.slots: torch.Tensor | None = None  # select()'s sequences, int64

    @classmethod
    def for_model(cls, model: torch.nn.Module, shape: ModelShape, bits: BitPlan | int | None,
                  cfg: KVQuantConfig | None = None, dtype: torch.dtype = torch.float32) -> TurboCache:
        """A cache for ``model``: its layers' sliding windows and RoPE come from the model."""
        types = getattr(text_config(model.config), "layer_types", None)
        ropes = [model_rope(model, t) for t in types] if types and _rope_per_layer_type(model) \
            else model_rope(model)
        return cls(shape, bits, cfg, dtype=dtype, rope=ropes, windows=layer_windows(model.config))

    def add_sequence(self) -> int:
        slots = {layer.store.add_sequence() for layer in self.layers}
        if len(slots) != 1:
            raise RuntimeError(f"cache layers disagree on the new sequence's slot: {slots}")
        return slots.pop()

    def release(self, seq: int) -> None:
        for layer in self.layers:
            layer.store.release(seq)

    def select(self, seqs: Sequence[int] | None) -> None:
        """The sequences the next forward's batch rows are, in order (``None``: every open one)."""
        picked = None if seqs is None else self.layers[0].store._pick(seqs)
        for layer in self.layers:
            layer.seqs = picked
        # the same as a tensor, made once for every layer's one-call step (QuantizedKVLayer.step)
        self.slots = None if picked is None else torch.tensor(picked, dtype=torch.long)

    @property
    def sequences(self) -> list[int]:
        return self.layers[0].store.sequences

    def seq_length(self, seq: int) -> int:
        return self.layers[0].store.seq_lens([seq])[0]

    def bytes_for(self, tokens: int) -> int:
        """The most bytes one sequence of ``tokens`` tokens occupies at rest (every layer)."""
        return sum(layer.store.bytes_for(tokens) for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes the cached tokens occupy (packed pages with their scales and offsets, buffered
        INT8 rows), from the tensors' sizes; :meth:`capacity_nbytes` adds unused capacity."""
        return sum(layer.nbytes() for layer in self.layers)

    def capacity_nbytes(self) -> int:
        """Bytes of every tensor the cache has allocated (free pages and buffer rows included)."""
        return sum(layer.store.capacity_nbytes() for layer in self.layers)

    def flush(self, seqs: Sequence[int] | None = None) -> None:
        """Compress every full chunk still waiting in the buffers (the state at rest), of
        ``seqs`` or of every open sequence."""
        for layer in self.layers:
            layer.flush(seqs)


def _rotary(model: torch.nn.Module) -> torch.nn.Module | None:
    return getattr(getattr(model, "model", model), "rotary_emb", None)


def _rope_per_layer_type(model: torch.nn.Module) -> bool:
    """True when the model's rotary module takes a ``layer_type`` (Gemma 3: local layers use
    another base frequency than global ones)."""
    rotary = _rotary(model)
    return rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters


def model_rope(model: torch.nn.Module, layer_type: str | None = None) -> Rope | None:
    """The model's RoPE by position, ``positions (L,) -> (cos, sin)`` float32 ``(L, D)``, from
    its ``rotary_emb`` module (what ``KVQuantConfig.pre_rope`` re-applies after decompression),
    for the layers of ``layer_type`` when the model's RoPE depends on it; ``None`` for a model
    without one (a pre_rope cache then refuses to be built)."""
    rotary = _rotary(model)
    if rotary is None:
        return None
    extra = (layer_type,) if layer_type is not None and _rope_per_layer_type(model) else ()

    def rope(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probe = torch.empty(1, dtype=torch.float32, device=positions.device)
        with torch.no_grad():
            cos, sin = rotary(probe, positions[None].long(), *extra)
        return cos[0].float(), sin[0].float()

    return rope


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
            held = getattr(layer, name, None)
            if isinstance(held, tuple):  # HQQ: (packed codes, meta with scale and zero)
                codes, meta = held
                parts = [codes, *(v for v in meta.values() if isinstance(v, torch.Tensor))]
            else:
                parts = [held]
            total += sum(tensor_bytes(t) for t in parts if isinstance(t, torch.Tensor))
    return total
