"""One layer of the progressively quantized KV cache (docs/design.md §1.2, stage 2), in pure PyTorch.

Storage, per layer, for any number of sequences of their own lengths:

* **recent-token buffer** — per sequence, the newest tokens in INT8 with one float scale per
  token and head (``x ~= q8 * s_t``), in one preallocated tensor ``(slots, H, rows, D)``.
* **pages** — every full ``chunk`` of a sequence's tokens is re-quantized to INT8 with one
  scale per (chunk, head) in the protective range ``±119``, then, per head, to the head's bits:
  K grouped per channel along tokens (``k_group`` tokens), V grouped per token along channels
  (``v_group`` channels), codes packed along the token axis (planar, see ``quant.pack``). Heads
  at 8 bits keep the INT8 codes unpacked. A page is one such chunk of one sequence; pages live
  in one pool per bit width (preallocated, grown by whole blocks of pages, written in place),
  and a page table per sequence lists its pages in order.
* **sliding windows** — a layer with a ``window`` (transformers' ``sliding_window``: a query
  sees itself and the ``window - 1`` tokens before it) releases, before each append, the pages
  no new token can see; they go back to the pool for the next ones. So a local layer holds at
  most about ``window + chunk`` tokens per sequence, whatever the context.

Readers never see this class: :meth:`QuantizedKVLayer.view` gives the tensor-only
:class:`~turbo_core.attention.packed.PackedKV` (no copy for the first ``N`` sequences).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from turbo_core.attention.config import KVQuantConfig, check_bits, check_window
from turbo_core.attention.kvstorage import PackedStorage
from turbo_core.attention.lowrank import check_cache_basis
from turbo_core.attention.packed import PackedKV, float_rows, int8_rows
from turbo_core.attention.packed import positions as packed_positions
from turbo_core.attention.pool import PagePool, compress_pages
from turbo_core.attention.quant import Int8Rows, quantize_int8_blockwise
from turbo_core.attention.rotation import apply_rope, rotate, undo_rope, unrotate
from turbo_core.attention.slots import SequenceSlots

# positions (int64 (L,)) -> the model's RoPE (cos, sin), float (L, D); what pre_rope needs
Rope = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class QuantizedKVLayer(PackedStorage, SequenceSlots):
    """Packed INT4/INT2 (+ INT8) KV storage of one attention layer with a per-head bit plan.

    Sequences are slots: :meth:`add_sequence` / :meth:`release`; :meth:`append` without
    ``seqs`` writes to every active sequence in order (and opens them on first use), which is
    how a transformers batch uses it.

    Args:
        head_bits: bits per KV head (2, 4 or 8), length = number of KV heads.
        head_dim: channels per head.
        cfg: chunk and group sizes, and the accuracy levers.
        rope: the model's RoPE by position; needed (and only read) with ``cfg.pre_rope``.
        window: the layer's sliding window (``None``: full attention); every reader of
            :meth:`view` applies it, and pages outside it are released.
        basis: with ``cfg.low_rank = r``, the calibrated ``(U_K, U_V)``, each ``(H_kv, D, r)``
            with orthonormal columns: the layer stores ``K U_K`` and ``V U_V`` (``head_dim``
            is then ``r``; ``model_dim`` stays ``D``) and :meth:`keys_values` gives back
            ``(K U_K) U_Kᵀ``, ``(V U_V) U_Vᵀ``.
    """

    def __init__(self, head_bits: Sequence[int], head_dim: int, cfg: KVQuantConfig | None = None,
                 rope: Rope | None = None, window: int | None = None,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.cfg = cfg or KVQuantConfig()
        self.window = check_window(window)
        if self.cfg.pre_rope and rope is None:
            raise ValueError("KVQuantConfig.pre_rope stores K before RoPE, so the cache needs the "
                             "model's RoPE: build it with TurboCache.for_model(model, ...); a model "
                             "without RoPE cannot use pre_rope")
        self.rope = rope
        self.head_bits = tuple(check_bits(int(b)) for b in head_bits)
        if not self.head_bits:
            raise ValueError("QuantizedKVLayer needs at least one KV head in head_bits")
        self.cfg.check_head_dim(head_dim)
        self.model_dim = head_dim
        self.basis = check_cache_basis(basis, self.cfg.low_rank, len(self.head_bits), head_dim)
        self.head_dim = self.cfg.low_rank or head_dim  # the stored width
        # heads grouped by bit width so each group packs into one dense tensor
        self.groups: dict[int, list[int]] = {}
        for h, b in enumerate(self.head_bits):
            self.groups.setdefault(b, []).append(h)
        self._pools: dict[int, PagePool] = {}
        self._device: torch.device | None = None
        self._free_pages: list[int] = []
        self._table = torch.zeros(0, 0, dtype=torch.int32)  # (slots, pages per sequence)
        self._n_chunks: list[int] = []  # per slot: pages held (in the page table)
        self._base: list[int] = []  # per slot: chunks released before them (sliding window)
        self._buf_len: list[int] = []
        self._active: list[int] = []  # open slots, in the order they were added
        self._buf: dict[str, torch.Tensor] = {}

    # -- sequences ---------------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return len(self.head_bits)

    def _slot_count(self) -> int:
        return len(self._n_chunks)

    def _open_slot(self, slot: int) -> None:
        self._fast = None
        if slot == len(self._n_chunks):
            self._n_chunks.append(0)
            self._base.append(0)
            self._buf_len.append(0)
        self._n_chunks[slot] = self._base[slot] = self._buf_len[slot] = 0

    def _close_slot(self, slot: int) -> None:
        self._fast = None
        self._free_pages += self._table[slot, : self._n_chunks[slot]].tolist()
        self._n_chunks[slot] = self._base[slot] = self._buf_len[slot] = 0

    def seq_lens(self, seqs: Sequence[int] | None = None) -> list[int]:
        c = self.cfg.chunk
        return [(self._base[s] + self._n_chunks[s]) * c + self._buf_len[s] for s in self._pick(seqs)]

    def _sinks(self, slot: int) -> int:
        """Rows at the front of a sequence's buffer that are its first tokens, kept at INT8:
        all buffered rows until ``sinks`` tokens were seen (nothing is compressed before)."""
        if self._n_chunks[slot] or self._base[slot]:
            return self.cfg.sinks
        return min(self.cfg.sinks, self._buf_len[slot])

    @property
    def seq_len(self) -> int:
        """Tokens held per sequence (the longest, when lengths differ)."""
        return max(self.seq_lens(), default=0)

    @property
    def buffered(self) -> int:
        return max((self._buf_len[s] for s in self._active), default=0)

    # -- writing -----------------------------------------------------------------------------
    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("key", k), ("value", v)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be (B, H_kv, T, D), got shape {tuple(t.shape)}")
            if t.shape[1] != self.num_heads or t.shape[3] != self.model_dim:
                raise ValueError(
                    f"{name} has {t.shape[1]} heads of dim {t.shape[3]}, but this cache layer "
                    f"holds {self.num_heads} heads of dim {self.model_dim}"
                )
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} shapes differ")

    def append(self, k: torch.Tensor, v: torch.Tensor, compress: bool = True,
               seqs: Sequence[int] | None = None, rotated: bool = False) -> None:
        """Add new tokens to the INT8 buffers. ``k, v``: float ``(N, H_kv, T, D)``, row ``i``
        for sequence ``seqs[i]`` (default: every open sequence, opened here on first use).

        With ``compress`` (default) every full chunk is compressed at once; otherwise call
        :meth:`compress_full_chunks` later (e.g. after the new tokens attended at INT8).
        """
        self._check(k, v)
        self._fast = None
        seqs = self._rows_for(k.shape[0], seqs)
        k, v = self._prepare(k, v, seqs, rotated)
        t = k.shape[2]
        if t == 1:  # a decode step: one scatter per tensor for the whole batch
            slot = torch.tensor(seqs, device=k.device)[:, None]
            pos = torch.tensor([self._buf_len[s] for s in seqs], device=k.device)[:, None]
            head = torch.arange(self.num_heads, device=k.device)[None, :]
        for name, x in (("k", k), ("v", v)):
            rows = quantize_int8_blockwise(x, block_size=1)
            if t == 1:
                self._buf[f"{name}_values"][slot, head, pos] = rows.values[:, :, 0]
                self._buf[f"{name}_scale"][slot, head, pos] = rows.scale[:, :, 0]
                continue
            for i, s in enumerate(seqs):
                at = self._buf_len[s]
                self._buf[f"{name}_values"][s, :, at:at + t] = rows.values[i]
                self._buf[f"{name}_scale"][s, :, at:at + t] = rows.scale[i]
        for s in seqs:
            self._buf_len[s] += t
        if compress:
            self.compress_full_chunks(seqs)

    def _prepare(self, k: torch.Tensor, v: torch.Tensor, seqs: list[int],
                 rotated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Before ``k, v`` go into the buffers: pages outside the window released, K and V as
        stored (RoPE undone with ``pre_rope``, rotated with ``rotate``), room for the rows."""
        if self.window is not None:
            self._release_outside_window(seqs)
        if self.cfg.pre_rope:  # K arrives after RoPE: store it as it was before
            k = self._undo_rope(k, seqs)
        if self.cfg.rotate and not rotated:  # stored rotated; readers rotate queries alike
            k, v = rotate(k), rotate(v)
        if self.basis is not None:  # the r coordinates in the calibrated basis
            k, v = (x.float() @ u.to(x.device) for x, u in zip((k, v), self.basis, strict=True))
        self._ensure_storage(k.device)
        self._reserve_rows(max(self._buf_len[s] for s in seqs) + k.shape[2])
        return k, v

    def update(self, k: torch.Tensor, v: torch.Tensor, seqs: Sequence[int] | None = None,
               rotated: bool = False) -> None:
        """One attention step's write: :meth:`compress_full_chunks` (what the previous step left),
        then :meth:`append` without compressing (the new tokens attend at INT8). On CPU with the
        C++ ops built, both are one ``torch.ops.turbo.append`` call (byte for byte the same).
        ``rotated``: ``k, v`` come already rotated (``cfg.rotate``; the compiled step rotates
        in its graph)."""
        self._check(k, v)
        self._fast = None
        seqs = self._rows_for(k.shape[0], seqs)
        cpu_ops = self._cpu_ops(k.device)
        if cpu_ops is None:
            self.compress_full_chunks(seqs)
            self.append(k, v, compress=False, seqs=seqs, rotated=rotated)
            return
        todo = self._full_chunks(seqs)
        jobs, pages = self._plan_compression(todo)
        k, v = self._prepare(k, v, seqs, rotated)
        cpu_ops.append(k, v, seqs, [self._buf_len[s] for s in seqs], self._buf, jobs, pages,
                       self._pools, self.cfg)
        for s in seqs:
            self._buf_len[s] += k.shape[2]
        if todo:
            self._shrink_rows()
        self._fast = self._plan_fast()  # the next steps' one-call path (PackedStorage.step)

    def _unseen_chunks(self, length: int) -> int:
        """Chunks of a sequence of ``length`` tokens that no token from the next one on sees:
        chunk ``g`` ends at position ``sinks + (g + 1)·c - 1``, and a token at position
        ``>= length`` sees keys ``> length - window``."""
        return max(0, (length - self.window + 1 - self.cfg.sinks) // self.cfg.chunk)

    def _release_outside_window(self, seqs: list[int]) -> None:
        """Free the leading pages of ``seqs`` that :meth:`_unseen_chunks` counts."""
        for s in seqs:
            gone = min(self._n_chunks[s], self._unseen_chunks(self.seq_lens([s])[0]) - self._base[s])
            if gone <= 0:
                continue
            held = self._n_chunks[s]
            self._free_pages += self._table[s, :gone].tolist()
            self._table[s, : held - gone] = self._table[s, gone:held].clone()
            self._base[s] += gone
            self._n_chunks[s] = held - gone

    def _undo_rope(self, k: torch.Tensor, seqs: list[int]) -> torch.Tensor:
        """``k (N, H, T, D)`` with RoPE undone at each row's positions (its sequence's next T)."""
        n, t = len(seqs), k.shape[2]
        pos = torch.tensor(self.seq_lens(seqs), device=k.device)[:, None] + torch.arange(t, device=k.device)
        cos, sin = self.rope(pos.reshape(-1))
        if cos.shape[-1] != self.head_dim:
            raise ValueError(f"pre_rope: the model's RoPE covers {cos.shape[-1]} of "
                             f"{self.head_dim} channels (partial RoPE is not supported)")
        return undo_rope(k, cos.reshape(n, 1, t, -1), sin.reshape(n, 1, t, -1))

    def compress_full_chunks(self, seqs: Sequence[int] | None = None) -> None:
        """Move every full ``chunk`` of buffered tokens into packed low-bit pages (on CPU with
        the C++ ops built: one ``turbo.append`` call without new rows, byte for byte the same —
        a prompt chunk's flush compressed 30 layers x 8 chunks in Python, ~7 % of a prefill)."""
        c = self.cfg.chunk
        todo = self._full_chunks(self._pick(seqs))
        if not todo:
            return
        self._fast = None
        cpu_ops = self._cpu_ops(self._device)
        if cpu_ops is not None:
            seqs = [s for s, _ in todo]
            jobs, pages = self._plan_compression(todo)
            none = torch.empty(len(seqs), self.num_heads, 0, self.head_dim)
            cpu_ops.append(none, none, seqs, [self._buf_len[s] for s in seqs], self._buf, jobs,
                           pages, self._pools, self.cfg)
            self._shrink_rows()
            return
        parts: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
        starts = {s: self._sinks(s) for s, _ in todo}
        for s, n_full in todo:
            at = starts[s]
            for name in ("k", "v"):
                rows = Int8Rows(self._buf[f"{name}_values"][s, :, at: at + n_full * c],
                                self._buf[f"{name}_scale"][s, :, at: at + n_full * c])
                x = rows.dequantize()  # (H, n_full * c, D) float32
                parts[name].append(x.reshape(self.num_heads, n_full, c, -1).transpose(0, 1))
        pages = self._take_pages(sum(n for _, n in todo))
        k, v = torch.cat(parts["k"]), torch.cat(parts["v"])  # (N, H, c, D)
        for bits, sides in compress_pages(k, v, self._pools, self.cfg).items():
            self._pools[bits].write(pages, sides)
        self._record_pages(todo, pages)
        for s, n_full in todo:  # the sinks stay at the front, the tail (< chunk) moves next
            keep, rest = starts[s], self._buf_len[s] - starts[s]
            for t in self._buf.values():
                t[s, :, keep: keep + rest] = t[s, :, keep + n_full * c: keep + n_full * c + rest].clone()
        self._shrink_rows()

    # -- reading -----------------------------------------------------------------------------
    def view(self, seqs: Sequence[int] | None = None) -> PackedKV:
        """The tensor-only view of ``seqs`` (default: every open sequence, in order). Pools and
        buffers are shared, not copied; only the small per-sequence tables are gathered."""
        seqs = self._pick(seqs)
        if not seqs or self._device is None:
            raise ValueError("the KV cache layer is empty")
        self._reserve_table(1)
        self._reserve_rows(1)
        max_chunks = max(self._n_chunks[s] for s in seqs)
        if seqs == list(range(len(seqs))):  # the common case: a slice, no copy at all
            table = self._table[: len(seqs), : max(1, max_chunks)]
            buf = {k: t[: len(seqs)] for k, t in self._buf.items()}
        else:
            idx = torch.tensor(seqs, dtype=torch.long)
            table = self._table.index_select(0, idx)[:, : max(1, max_chunks)]
            buf = {k: t.index_select(0, idx.to(t.device)) for k, t in self._buf.items()}
        device = self._device
        return PackedKV(
            groups=tuple(p.heads_view() for p in self._pools.values()),
            page_table=table.to(device), n_chunks=_ints(self._n_chunks, seqs, device),
            buffer_k=Int8Rows(buf["k_values"], buf["k_scale"]),
            buffer_v=Int8Rows(buf["v_values"], buf["v_scale"]),
            buffer_len=_ints(self._buf_len, seqs, device),
            num_heads=self.num_heads, head_dim=self.head_dim, chunk=self.cfg.chunk,
            chunk_base=_ints(self._base, seqs, device), sinks=self.cfg.sinks, window=self.window)

    def dequantize_int8(self) -> tuple[Int8Rows, Int8Rows]:
        """Integer-only decompression of every open sequence (equal lengths): K and V as INT8
        rows in token order, ``values`` int8 ``(B, H_kv, L, D)``, ``scale`` float32 ``(B, H_kv, L)``."""
        if len(set(self.seq_lens())) > 1:
            raise ValueError(f"sequences have different lengths {self.seq_lens()}; "
                             f"decompress them one at a time from view()")
        view = self.view()
        rows = [int8_rows(view, b) for b in range(len(self._active))]
        return tuple(Int8Rows(torch.stack([r[i].values for r in rows]),
                              torch.stack([r[i].scale for r in rows])) for i in (0, 1))

    def keys_values(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one sequence's held tokens as float32 ``(H_kv, L_held, D)`` in token order
        (positions: :meth:`positions`), as the model made them (rotated back, RoPE applied
        again): how the reference reads the levers the fused kernels do not
        (``KVQuantConfig.reference_only``)."""
        view = self.view([seq])
        k, v = float_rows(view, 0)
        if self.cfg.rotate:
            k, v = unrotate(k), unrotate(v)
        if self.basis is not None:  # (H, L, r) @ (H, r, D): back to the model's channels
            k, v = (x @ u.to(x.device).transpose(-1, -2) for x, u in zip((k, v), self.basis, strict=True))
        pos, order = packed_positions(view, 0).to(k.device).sort()
        k, v = k.index_select(1, order), v.index_select(1, order)
        if self.cfg.pre_rope:
            cos, sin = self.rope(pos)
            k = apply_rope(k, cos, sin)
        return k, v

    def positions(self, seq: int) -> torch.Tensor:
        """Token positions, int64 ``(L_held,)`` ascending, of the rows :meth:`keys_values` gives."""
        return packed_positions(self.view([seq]), 0).sort().values

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor allocated: page pools (free pages included) and buffers."""
        return [*(t for p in self._pools.values() for t in p.t.values()), *self._buf.values()]

    def capacity_nbytes(self) -> int:
        """Bytes of every tensor allocated (what the process holds for this layer)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def bytes_for(self, tokens: int) -> int:
        """The most bytes one sequence occupies at rest between decode steps while it grows to
        ``tokens`` tokens (full chunks as pages; the sinks and up to one chunk of INT8 rows in
        the buffer; a sliding-window layer only the pages its window still reaches), from the
        tensors' shapes and element sizes — what admission by a KV budget reserves."""
        if tokens <= 0:
            return 0
        pools = self._pools.values() if self._pools else [
            PagePool(b, h, self.head_dim, self.cfg, torch.device("meta"))
            for b, h in self.groups.items()]
        page = sum(p.page_nbytes() for p in pools)
        row = 2 * self.num_heads * (self.head_dim * torch.int8.itemsize + torch.float32.itemsize)
        c, sinks = self.cfg.chunk, self.cfg.sinks

        def at_rest(n: int) -> int:  # after a decode step that made the sequence n tokens long
            pages = max(0, n - sinks - 1) // c
            # released before the last append, at length n - 1
            gone = 0 if self.window is None else min(pages, self._unseen_chunks(n - 1))
            return (pages - gone) * page + (n - pages * c) * row

        if self.window is None:
            return at_rest(tokens)  # grows with n
        # held bytes rise until the window binds, then repeat with period c: the last two
        # periods and the peak before the first release cover every n <= tokens
        edge = min(tokens, self.window + sinks + c - 1)
        return max(at_rest(n) for n in (edge, *range(max(1, tokens - 2 * c), tokens + 1)))

    def nbytes(self) -> int:
        """Bytes the open sequences occupy: their pages (codes, scales, offsets, first-level
        scales) and their buffered INT8 rows with scales, counted from the tensors' sizes."""
        if self._device is None:
            return 0
        page = sum(p.page_nbytes() for p in self._pools.values())
        row = sum(t.shape[1] * math.prod(t.shape[3:]) * t.element_size() for t in self._buf.values())
        return sum(self._n_chunks[s] * page + self._buf_len[s] * row for s in self._active)


def _ints(values: list[int], seqs: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([values[s] for s in seqs], dtype=torch.int32, device=device)
