"""The float KV store: the baseline's cache in the same slotted layout as the packed one.

K and V of every sequence live in one preallocated tensor each, ``(slots, H_kv, rows, D)`` in
the model's dtype, grown by whole blocks of rows and written in place — so the engine batches
float and packed variants alike and a benchmark compares caches, not allocators. A layer with a
sliding ``window`` drops, before each append, the rows no new token can see (moved down in
whole blocks), as transformers' sliding-window cache does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbo_core.attention.config import EXACT, check_window
from turbo_core.attention.kvstorage import FastStep
from turbo_core.attention.slots import SequenceSlots

ROW_BLOCK = 256  # rows grow by at least this many tokens


class FloatKVLayer(SequenceSlots):
    """Float K/V of one attention layer for any number of sequences of their own lengths."""

    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 window: int | None = None):
        if num_heads < 1 or head_dim < 1:
            raise ValueError(f"FloatKVLayer needs heads and channels, got {num_heads} x {head_dim}")
        self.num_heads, self.head_dim, self.dtype = num_heads, head_dim, dtype
        self.window = check_window(window)
        self._lens: list[int] = []
        self._start: list[int] = []  # per slot: the oldest position still held
        self._moved: list[int] = []  # per slot: positions moved out of the rows (row = pos - moved)
        self._active: list[int] = []
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._fast: FastStep | None = None  # set by append, cleared by every other change

    def _slot_count(self) -> int:
        return len(self._lens)

    def _open_slot(self, slot: int) -> None:
        self._fast = None
        if slot == len(self._lens):
            self._lens.append(0)
            self._start.append(0)
            self._moved.append(0)
        self._lens[slot] = self._start[slot] = self._moved[slot] = 0

    def _close_slot(self, slot: int) -> None:
        self._fast = None
        self._lens[slot] = self._start[slot] = self._moved[slot] = 0

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
        self._fast = None
        seqs = self._rows_for(k.shape[0], seqs)
        t = k.shape[2]
        if self.window is not None:
            self._drop_outside_window(seqs)
        self._reserve(k, max(self._lens[s] - self._moved[s] for s in seqs) + t)
        if t == 1:
            slot = torch.tensor(seqs, device=k.device)[:, None]
            pos = torch.tensor([self._lens[s] - self._moved[s] for s in seqs], device=k.device)[:, None]
            head = torch.arange(self.num_heads, device=k.device)[None, :]
            self._k[slot, head, pos] = k[:, :, 0]
            self._v[slot, head, pos] = v[:, :, 0]
        else:
            for i, s in enumerate(seqs):
                at = self._lens[s] - self._moved[s]
                self._k[s, :, at: at + t] = k[i]
                self._v[s, :, at: at + t] = v[i]
        for s in seqs:
            self._lens[s] += t
        self._fast = self._plan_fast(k.device)  # the next steps' one call (step)

    def update(self, k: torch.Tensor, v: torch.Tensor, seqs: Sequence[int] | None = None) -> None:
        """One attention step's write (the packed store's signature): :meth:`append`."""
        self.append(k, v, seqs=seqs)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[int],
             slots: torch.Tensor, math_cfg, scale: float | None,
             rotated: bool = False) -> torch.Tensor | None:
        """A decode step's write of ``k, v (B, H_kv, T, D)`` for ``seqs`` (``slots``: the same,
        int64) and the exact attention of ``q`` over them in one ``turbo.float_decode_step``
        call — :meth:`update` then ``turbo.float_decode_attention``, bit for bit, without the
        Python around them. ``None`` when that is not this step (rows to move out of the
        window or to grow, other math or dtype, no C++ ops): the caller takes those."""
        fast, t = self._fast, k.shape[2]
        if fast is None or t > fast.quiet or math_cfg != EXACT or q.dtype != torch.float32:
            return None
        from turbo_kernels import cpu_ops

        out = cpu_ops.float_decode_step(q, k, v, self._k, self._v, slots, fast.args,
                                        window=self.window, scale=scale)
        fast.quiet -= t
        for s in seqs:
            if self.window is not None:
                self._start[s] = max(self._start[s], self._lens[s] - self.window + 1)
            self._lens[s] += t
        return out

    def _plan_fast(self, device: torch.device) -> FastStep | None:
        """The one-call step's state after an append: each slot's held rows as a tensor, and
        the tokens every open sequence can take before its rows must grow or move."""
        from turbo_core.attention.functional import cpu_ops_allowed  # lazy: functional imports us

        if self.dtype != torch.float32 or device.type != "cpu" or not self._active \
                or not cpu_ops_allowed():
            return None
        cap, never = self._k.shape[2], 1 << 30
        quiet = min(min(cap - (self._lens[s] - self._moved[s]),
                        never if self.window is None else
                        ROW_BLOCK + self._moved[s] + self.window - 1 - self._lens[s])
                    for s in self._active)
        if quiet <= 0:
            return None
        slots = self._k.shape[0]
        pad = [0] * (slots - len(self._lens))
        rows = torch.tensor([[a - m for a, m in zip(self._start, self._moved, strict=True)] + pad,
                             [a - m for a, m in zip(self._lens, self._moved, strict=True)] + pad])
        return FastStep(quiet, rows)

    def _drop_outside_window(self, seqs: list[int]) -> None:
        """Forget the rows no token from the next one on sees (positions ``<= L - window``);
        once a whole block of them piles up, the held rows move down over it."""
        for s in seqs:
            self._start[s] = max(self._start[s], self._lens[s] - self.window + 1)
            dead = self._start[s] - self._moved[s]
            if dead >= ROW_BLOCK:
                held = self._lens[s] - self._start[s]
                for t in (self._k, self._v):
                    t[s, :, :held] = t[s, :, dead: dead + held].clone()
                self._moved[s] = self._start[s]

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
        """Views ``(H_kv, L_held, D)`` of one sequence's held K and V (no copy); their token
        positions are :meth:`positions`."""
        s = self._pick([seq])[0]
        if self._k is None:
            raise ValueError("the KV cache layer is empty")
        lo, hi = self._start[s] - self._moved[s], self._lens[s] - self._moved[s]
        return self._k[s, :, lo:hi], self._v[s, :, lo:hi]

    def held_rows(self, seqs: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int64 ``(N,)`` each: the slot of ``seqs[i]`` and its held rows ``[lo, hi)`` in the
        tensors of :meth:`tensors` (row = position - what moved out; the newest rows last)."""
        picked = self._pick(seqs)
        rows = [(s, self._start[s] - self._moved[s], self._lens[s] - self._moved[s]) for s in picked]
        return tuple(torch.tensor(col, dtype=torch.long) for col in zip(*rows, strict=True))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every slot, ``(slots, H_kv, rows, D)`` (rows past a slot's held ones unused)."""
        if self._k is None:
            raise ValueError("the KV cache layer is empty")
        return self._k, self._v

    def positions(self, seq: int) -> torch.Tensor:
        """Token positions, int64 ``(L_held,)`` ascending, of the rows :meth:`keys_values` gives."""
        s = self._pick([seq])[0]
        return torch.arange(self._start[s], self._lens[s])

    def _row_bytes(self) -> int:
        return 2 * self.num_heads * self.head_dim * self.dtype.itemsize

    def bytes_for(self, tokens: int) -> int:
        """The most bytes one sequence occupies at rest while it grows to ``tokens`` tokens
        (K and V rows in the cache dtype; a sliding-window layer holds at most ``window``)."""
        held = max(0, tokens) if self.window is None else min(max(0, tokens), self.window)
        return held * self._row_bytes()

    def nbytes(self) -> int:
        """Bytes the open sequences' held tokens occupy, from the tensors' element size."""
        if self._k is None:
            return 0
        return sum((self._lens[s] - self._start[s]) * self._row_bytes() for s in self._active)

    def capacity_nbytes(self) -> int:
        if self._k is None:
            return 0
        return 2 * self._k.numel() * self._k.element_size()
