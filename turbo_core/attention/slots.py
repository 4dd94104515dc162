"""Sequence slots shared by the KV stores: which sequences are open, in what order.

A store keeps per-slot tensors; a slot is reused after :meth:`SequenceSlots.release`. The
store subclasses implement ``_slot_count``, ``_open_slot`` and ``_close_slot``.
"""

from __future__ import annotations

from collections.abc import Sequence


class SequenceSlots:
    """Open/close sequences and check the ids callers pass."""

    _active: list[int]

    def _slot_count(self) -> int:
        raise NotImplementedError

    def _open_slot(self, slot: int) -> None:
        raise NotImplementedError

    def _close_slot(self, slot: int) -> None:
        raise NotImplementedError

    @property
    def sequences(self) -> list[int]:
        return list(self._active)

    @property
    def batch(self) -> int | None:
        return len(self._active) or None

    def add_sequence(self) -> int:
        """Open an empty sequence; returns its slot id (the lowest free one)."""
        active = set(self._active)
        slot = next((s for s in range(self._slot_count()) if s not in active), self._slot_count())
        self._open_slot(slot)
        self._active.append(slot)
        return slot

    def release(self, seq: int) -> None:
        """Close a sequence; its storage is reused by the next :meth:`add_sequence`."""
        if seq not in self._active:
            raise ValueError(f"sequence {seq} is not open in this cache layer")
        self._close_slot(seq)
        self._active.remove(seq)

    def _pick(self, seqs: Sequence[int] | None) -> list[int]:
        if seqs is None:
            return list(self._active)
        seqs = [int(s) for s in seqs]
        missing = [s for s in seqs if s not in self._active]
        if missing:
            raise ValueError(f"sequences {missing} are not open in this cache layer")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"sequences {seqs} name a sequence twice")
        return seqs

    def _rows_for(self, n: int, seqs: Sequence[int] | None) -> list[int]:
        """The sequences ``n`` rows of new tokens go to (default: every open sequence, opened
        here on first use — how a transformers batch uses a store)."""
        if seqs is None:
            if not self._active:
                for _ in range(n):
                    self.add_sequence()
            if n != len(self._active):
                raise ValueError(f"batch size changed from {len(self._active)} to {n}")
        seqs = self._pick(seqs)
        if len(seqs) != n:
            raise ValueError(f"{n} rows of keys for {len(seqs)} sequences")
        return seqs
