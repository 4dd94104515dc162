"""Storage growth and page bookkeeping of the packed KV cache layer (``kvcache.QuantizedKVLayer``):
its page pools, INT8 buffers and page table are preallocated tensors grown (and the buffers
shrunk) in whole blocks, written in place by the layer and the C++ ``append`` op, whose
compression jobs are planned here; and the decode step's fast path (:class:`FastStep`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbo_core.attention.pool import PagePool

PAGE_BLOCK = 16  # the page pool grows by at least this many pages (1024 tokens at chunk 64)
_NO_PAGES = torch.zeros(0, dtype=torch.long)  # a step that compresses nothing


@dataclass
class FastStep:
    """What a store's decode steps pass to their one-call op while nothing but new rows
    changes — ``args``: for ``turbo.decode_step`` the slot-indexed lengths, page table, buffers
    and pools (the op advances the buffer lengths in place); for ``turbo.float_decode_step``
    the held rows per slot — and ``quiet``: the tokens every open sequence can still take
    before the store must do more than write rows (compress a chunk, release a page or move
    rows out of a window, grow a buffer)."""

    quiet: int
    args: list


class PackedStorage:
    """The growth helpers of :class:`~turbo_core.attention.kvcache.QuantizedKVLayer` (a mixin
    over its ``cfg``, ``groups``, ``_pools``, ``_buf``, ``_table`` and per-slot lists)."""

    _fast: FastStep | None = None  # set by update (the C++ path), cleared by every other change

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[int],
             slots: torch.Tensor, math_cfg, scale: float | None,
             rotated: bool = False) -> torch.Tensor | None:
        """A decode step's write of ``k, v (B, H_kv, T, D)`` for ``seqs`` (``slots``: the same,
        int64) and the attention of ``q`` over them, in one ``turbo.decode_step`` call — byte
        for byte :meth:`update` then the CPU decode op, without building a view or planning
        in Python. ``rotated``: ``q, k, v`` come rotated like a rotated store (``cfg.rotate``)
        and the output stays rotated. Returns ``None`` when the step is not that simple (a chunk
        due, a window release, a new sequence, unrotated input for a rotated store, no C++
        path): the caller takes ``update`` and ``turbo_attention``. The caller checks that the
        math is the decode op's (no INT8 P·V, no top-k) and the query rows few
        (``functional.CPU_DECODE_MAX_ROWS``)."""
        fast, t = self._fast, k.shape[2]
        if fast is None or t > fast.quiet or (self.cfg.rotate and not rotated):
            return None
        from turbo_kernels import cpu_ops

        out = cpu_ops.decode_step(q, k, v, slots, fast.args, math_cfg=math_cfg, scale=scale)
        fast.quiet -= t
        lens = self._buf_len
        for s in seqs:
            lens[s] += t
        return out

    def _plan_fast(self) -> FastStep | None:
        """:class:`FastStep` for the layer as it is now (after an ``update`` on the C++ path)."""
        cfg = self.cfg
        if cfg.pre_rope or cfg.reference_only() or not self._active:
            return None
        slots, cap = self._buf["k_values"].shape[0], self._buf["k_values"].shape[2]
        quiet = min(min(cfg.sinks + cfg.chunk - self._buf_len[s], cap - self._buf_len[s],
                        self._window_room(s)) for s in self._active)
        if quiet <= 0:
            return None
        self._reserve_table(1, slots)
        pad = [0] * (slots - len(self._n_chunks))
        lens = torch.tensor([self._n_chunks + pad, self._base + pad, self._buf_len + pad],
                            dtype=torch.int32)
        from turbo_kernels import cpu_ops

        return FastStep(quiet, cpu_ops.step_args(lens, self._table[:slots], self._buf, self._pools,
                                                 cfg, self.window))

    def _window_room(self, s: int) -> int:
        """Tokens sequence ``s`` can take before an append would release a page (its window);
        a step that starts at length ``L`` releases one once ``L >= (base + 1)·c + window - 1 +
        sinks`` (``_unseen_chunks``)."""
        if self.window is None:
            return 1 << 30
        length = self.seq_lens([s])[0]
        return (self._base[s] + 1) * self.cfg.chunk + self.window - 1 + self.cfg.sinks - length

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
        self._fast = None
        for name, old in self._buf.items():
            new = torch.zeros(slots, old.shape[1], rows, *old.shape[3:], dtype=old.dtype,
                              device=old.device)
            keep = min(rows, old.shape[2])
            new[: old.shape[0], :, :keep] = old[:, :, :keep]
            self._buf[name] = new

    def _take_pages(self, n: int) -> torch.Tensor:
        self._fast = None  # a pool may grow (new tensors)
        if len(self._free_pages) < n:
            have = next(iter(self._pools.values())).capacity
            want = have + max(PAGE_BLOCK, have // 4, n - len(self._free_pages))
            want = -(-want // PAGE_BLOCK) * PAGE_BLOCK
            for pool in self._pools.values():
                pool.grow(want)
            self._free_pages += range(have, want)
        taken, self._free_pages = self._free_pages[:n], self._free_pages[n:]
        return torch.tensor(taken, dtype=torch.long, device=self._device)

    def _reserve_table(self, pages: int, slots: int = 0) -> None:
        """A page table of at least ``pages`` columns and a row per slot (at least ``slots``)."""
        have, cols = self._table.shape
        want = (max(have, slots, len(self._n_chunks)), max(cols, pages))
        if want != (have, cols):
            self._fast = None
            new = torch.zeros(*want, dtype=torch.int32)
            new[:have, :cols] = self._table
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
