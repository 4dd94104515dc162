"""Storage growth and page bookkeeping of the packed KV cache layer (``kvcache.QuantizedKVLayer``):
its page pools, INT8 buffers and page table are preallocated tensors grown (and the buffers
shrunk) in whole blocks, written in place by the layer and the C++ ``append`` op, whose
compression jobs are planned here."""

from __future__ import annotations

import torch

from turbo_core.attention.pool import PagePool

PAGE_BLOCK = 16  # the page pool grows by at least this many pages (1024 tokens at chunk 64)
_NO_PAGES = torch.zeros(0, dtype=torch.long)  # a step that compresses nothing


class PackedStorage:
    """The growth helpers of :class:`~turbo_core.attention.kvcache.QuantizedKVLayer` (a mixin
    over its ``cfg``, ``groups``, ``_pools``, ``_buf``, ``_table`` and per-slot lists)."""

    def _ensure_storage(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
            self._pools = {b: PagePool(b, h, self.head_dim, self.cfg, device)
                           for b, h in self.groups.items()}
            shape = (0, self.num_heads, 0)
            self._buf = {"k_values": torch.empty(*shape, self.head_dim, dtype=torch.int8, device=device),
                         "k_scale": torch.empty(*shape, dtype=torch.float32, device=device)}
            self._buf |= {"v_values": torch.empty_like(self._buf["k_values"]),
                          "v_scale": torch.empty_like(self._buf["k_scale"])}
        elif device != self._device:
            raise ValueError(f"cache layer lives on {self._device}, new tokens are on {device}")

    def _reserve_rows(self, rows: int) -> None:
        """Buffer capacity for every slot: ``rows`` tokens (rounded up to a chunk)."""
        slots, cap = self._buf["k_values"].shape[0], self._buf["k_values"].shape[2]
        want_slots = max(slots, len(self._n_chunks))
        want_rows = max(cap, -(-rows // self.cfg.chunk) * self.cfg.chunk)
        if (want_slots, want_rows) != (slots, cap):
            self._resize_buffer(want_slots, want_rows)

    def _shrink_rows(self) -> None:
        """After compression the buffers hold < chunk rows: give back what a prefill grew."""
        need = max(self._buf_len, default=0)
        rows = max(self.cfg.chunk, -(-need // self.cfg.chunk) * self.cfg.chunk)
        if self._buf["k_values"].shape[2] > rows:
            self._resize_buffer(self._buf["k_values"].shape[0], rows)

    def _resize_buffer(self, slots: int, rows: int) -> None:
        for name, old in self._buf.items():
            new = torch.zeros(slots, old.shape[1], rows, *old.shape[3:], dtype=old.dtype,
                              device=old.device)
            keep = min(rows, old.shape[2])
            new[: old.shape[0], :, :keep] = old[:, :, :keep]
            self._buf[name] = new

    def _take_pages(self, n: int) -> torch.Tensor:
        if len(self._free_pages) < n:
            have = next(iter(self._pools.values())).capacity
            want = have + max(PAGE_BLOCK, have // 4, n - len(self._free_pages))
            want = -(-want // PAGE_BLOCK) * PAGE_BLOCK
            for pool in self._pools.values():
                pool.grow(want)
            self._free_pages += range(have, want)
        taken, self._free_pages = self._free_pages[:n], self._free_pages[n:]
        return torch.tensor(taken, dtype=torch.long, device=self._device)

    def _reserve_table(self, pages: int) -> None:
        slots, cols = self._table.shape
        want = (max(slots, len(self._n_chunks)), max(cols, pages))
        if want != (slots, cols):
            new = torch.zeros(*want, dtype=torch.int32)
            new[:slots, :cols] = self._table
            self._table = new

    def _cpu_ops(self, device: torch.device | None):
        """``turbo_kernels.cpu_ops`` when its ``append`` op writes this layer (CPU tensors, the
        ops built, no backend forced elsewhere, no per-channel K scales), else ``None``."""
        from turbo_core.attention.functional import cpu_ops_allowed  # lazy: functional imports us

        if device is None or device.type != "cpu" or self.cfg.k_channel_scale or not cpu_ops_allowed():
            return None
        from turbo_kernels import cpu_ops

        return cpu_ops

    def _plan_compression(self, todo: list[tuple[int, int]]) -> tuple[list, torch.Tensor]:
        """The op's jobs for ``todo``'s full chunks (:meth:`_full_chunks`) — ``(slot, first row,
        chunks, rows after)`` — and their pages, taken; the table and lengths are recorded as
        after compression."""
        jobs = [(s, self._sinks(s), n, self._buf_len[s] - self._sinks(s) - n * self.cfg.chunk)
                for s, n in todo]
        pages = self._take_pages(sum(n for _, n in todo)) if todo else _NO_PAGES
        self._record_pages(todo, pages)
        return jobs, pages

    def _full_chunks(self, seqs: list[int]) -> list[tuple[int, int]]:
        """``(sequence, full chunks)`` of buffered rows past the sinks, for those that have any."""
        todo = [(s, (self._buf_len[s] - self._sinks(s)) // self.cfg.chunk) for s in seqs]
        return [(s, n) for s, n in todo if n > 0]

    def _record_pages(self, todo: list[tuple[int, int]], pages: torch.Tensor) -> None:
        """The page table and lengths once ``todo``'s chunks sit in ``pages`` (in order)."""
        at = 0
        for s, n_full in todo:
            self._reserve_table(self._n_chunks[s] + n_full)
            self._table[s, self._n_chunks[s]: self._n_chunks[s] + n_full] = pages[at:at + n_full].cpu()
            at += n_full
            self._n_chunks[s] += n_full
            self._buf_len[s] -= n_full * self.cfg.chunk
