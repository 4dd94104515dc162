"""The float KV store: the baseline's cache in the same slotted layout as the packed one.

K and V of every sequence live in one preallocated tensor each, ``(slots, H_kv, rows, D)`` in
the model's dtype, grown by whole blocks of rows and written in place — so the engine batches
float and packed variants alike and a benchmark compares caches, not allocators.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbo_core.attention.slots import SequenceSlots

ROW_BLOCK = 256  # rows grow by at least this many tokens


class FloatKVLayer(SequenceSlots):
    """Float K/V of one attention layer for any number of sequences of their own lengths."""

    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype = torch.float32):
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"FloatKVLayer needs heads and channels, got {num_heads} x {head_dim}")
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self._lens: list[int] = []
        self._active: list[int] = []
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def _slot_count(self) -> int:
        return len(self._lens)

    def _open_slot(self, slot: int) -> None:
        if slot == len(self._lens):
            self._lens.append(0)
        self._lens[slot] = 0

    def _close_slot(self, slot: int) -> None:
        self._lens[slot] = 0

    def seq_lens(self, seqs: Sequence[int] | None = None) -> list[int]:
        return [self._lens[s] for s in self._pick(seqs)]

    @property
    def seq_len(self) -> int:
        return max(self.seq_lens(), default=0)

    def append(self, k: torch.Tensor, v: torch.Tensor, compress: bool = True,
               seqs: Sequence[int] | None = None) -> None:
        """Store new tokens ``k, v (N, H_kv, T, D)``, row ``i`` for ``seqs[i]`` (``compress`` is
        accepted for the packed store's signature; float rows need no compression)."""
        if k.dim() != 4 or k.shape[1] != self.num_heads or k.shape[3] != self.head_dim \
                or k.shape != v.shape:
            raise ValueError(f"key {tuple(k.shape)} / value {tuple(v.shape)} do not fit a cache "
                             f"layer of {self.num_heads} heads of dim {self.head_dim}")
        seqs = self._rows_for(k.shape[0], seqs)
        t = k.shape[2]
        self._reserve(k, max(self._lens[s] for s in seqs) + t)
        if t == 1:
            slot = torch.tensor(seqs, device=k.device)[:, None]
            pos = torch.tensor([self._lens[s] for s in seqs], device=k.device)[:, None]
            head = torch.arange(self.num_heads, device=k.device)[None, :]
            self._k[slot, head, pos] = k[:, :, 0]
            self._v[slot, head, pos] = v[:, :, 0]
        else:
            for i, s in enumerate(seqs):
                self._k[s, :, self._lens[s]: self._lens[s] + t] = k[i]
                self._v[s, :, self._lens[s]: self._lens[s] + t] = v[i]
        for s in seqs:
            self._lens[s] += t

    def compress_full_chunks(self, seqs: Sequence[int] | None = None) -> None:
        """Float rows stay as stored (the packed store compresses here)."""
        self._pick(seqs)

    def _reserve(self, like: torch.Tensor, rows: int) -> None:
        slots = len(self._lens)
        if like.dtype != self.dtype or (self._k is not None and like.device != self._k.device):
            where = self._k.device if self._k is not None else "any device"
            raise ValueError(f"cache layer holds {self.dtype} on {where}, new tokens are "
                             f"{like.dtype} on {like.device}")
        if self._k is None:
            self._k = like.new_empty(0, self.num_heads, 0, self.head_dim)
            self._v = like.new_empty(0, self.num_heads, 0, self.head_dim)
        have_slots, have_rows = self._k.shape[0], self._k.shape[2]
        if slots <= have_slots and rows <= have_rows:
            return
        want = max(have_rows, -(-rows // ROW_BLOCK) * ROW_BLOCK)
        if rows > have_rows:
            want = max(want, have_rows + have_rows // 4)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_zeros(max(slots, have_slots), self.num_heads, want, self.head_dim)
            new[: old.shape[0], :, : old.shape[2]] = old
            setattr(self, name, new)

    def keys_values(self, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(H_kv, L, D)`` of one sequence's K and V (no copy)."""
        n = self._lens[self._pick([seq])[0]]
        if self._k is None:
            raise ValueError("the KV cache layer is empty")
        return self._k[seq, :, :n], self._v[seq, :, :n]

    def bytes_for(self, tokens: int) -> int:
        """Bytes one sequence of ``tokens`` tokens occupies (K and V rows in the cache dtype)."""
        return max(0, tokens) * 2 * self.num_heads * self.head_dim * self.dtype.itemsize

    def nbytes(self) -> int:
        """Bytes the open sequences' tokens occupy, from the tensors' element size."""
        if self._k is None:
            return 0
        return sum(self.bytes_for(self._lens[s]) for s in self._active)

    def capacity_nbytes(self) -> int:
        if self._k is None:
            return 0
        return 2 * self._k.numel() * self._k.element_size()
