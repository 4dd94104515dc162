"""The tensor-only view of one layer of the packed KV cache: what every reader reads.

Kernels (``turbo_kernels``), the CPU fast path and the reference take a :class:`PackedKV` —
tensors, lengths and the bit groups — never the cache class itself. Layout (``n`` = KV heads
at one width, ``P`` = pages in the pool, ``c`` = tokens per page, i.e. the chunk):

* K codes ``k_packed`` uint8 ``(P, n, D, c·bits/8)``, packed along tokens (planar, see
  ``quant.pack``); second-level ``k_scale`` uint8 / ``k_low`` int8 ``(P, n, D, c/k_group)``
  (K is grouped per channel along tokens; each bit group has its own group sizes);
* V codes ``v_packed`` uint8 ``(P, n, D, c·bits/8)``; ``v_scale`` / ``v_low``
  ``(P, n, D/v_group, c)`` (V is grouped per token along channels);
* first-level INT8 scales ``k_first`` / ``v_first`` float32 ``(P, n)``;
* per sequence ``b``: the pages it holds in token order ``page_table[b, :n_chunks[b]]``, then
  ``buffer_len[b]`` INT8 rows of the recent-token buffer ``(B, H_kv, rows, D)`` with a float
  scale per token and head.

Token positions (:func:`positions`): the buffer's first ``sinks`` rows are the sequence's first
tokens; the pages follow them, after the ``chunk_base[b]`` chunks a sliding-window layer has
released; the buffer's other rows are the newest tokens. So held page ``i`` covers positions
``sinks + (chunk_base + i)·c + t`` and buffer row ``r`` sits at ``r`` when ``r < sinks``, else
at ``(chunk_base + n_chunks)·c + r``; positions rise along the pages and along the buffer.
``window`` (``None``: full attention) is the layer's sliding window as transformers defines it:
the query at position ``p`` sees keys ``p - window < j <= p``.

INT8 of a code: ``q8 = clamp(code·scale + low, ±127)``; float: ``q8 · first``. Heads at 8 bits
hold the INT8 codes unpacked and no second level (``k_scale`` … are ``None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbo_core.attention.quant import Int8Rows, LowBit, dequantize_lowbit, unpack


@dataclass(frozen=True)
class PackedHeads:
    """The compressed chunks of the KV heads stored at one bit width (shapes above)."""

    bits: int
    heads: torch.Tensor  # int64 (n,): which KV heads of the layer these rows are
    k_group: int  # tokens per K group (per channel)
    v_group: int  # channels per V group (per token)
    k_packed: torch.Tensor
    k_scale: torch.Tensor | None
    k_low: torch.Tensor | None
    k_first: torch.Tensor
    v_packed: torch.Tensor
    v_scale: torch.Tensor | None
    v_low: torch.Tensor | None
    v_first: torch.Tensor


@dataclass(frozen=True)
class PackedKV:
    """One cache layer as tensors: page pools per bit group, page tables, INT8 buffers."""

    groups: tuple[PackedHeads, ...]
    page_table: torch.Tensor  # int32 (B, max_chunks)
    n_chunks: torch.Tensor  # int32 (B,)
    buffer_k: Int8Rows  # values int8 (B, H_kv, rows, D), scale float32 (B, H_kv, rows)
    buffer_v: Int8Rows
    buffer_len: torch.Tensor  # int32 (B,)
    num_heads: int
    head_dim: int
    chunk: int
    chunk_base: torch.Tensor  # int32 (B,): chunks released before the held pages (windowed layers)
    sinks: int = 0  # buffer rows at the front that are the first tokens
    window: int | None = None  # sliding window (keys a query sees, itself included)

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def seq_lens(self) -> list[int]:
        total = self.chunk_base.long() + self.n_chunks.long()
        return (total * self.chunk + self.buffer_len.long()).tolist()

    def offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``(B,)`` each: the position of held page 0's first key, and what a buffer row
        past the sinks adds to its row index to give its position (module docstring)."""
        base = self.chunk_base.long()
        return self.sinks + base * self.chunk, (base + self.n_chunks.long()) * self.chunk


def check_query(q: torch.Tensor, view: PackedKV, math_cfg) -> None:
    """Refuse, naming the problem, queries a fast decode path over ``view`` cannot serve:
    ``q (B, H_q, L_q, D)`` with the view's batch and head_dim, ``H_q`` a multiple of the KV
    heads, several new tokens only when every sequence buffers them all, no top-k, no INT8 P·V."""
    if q.dim() != 4:
        raise ValueError(f"query must be (B, H_q, L_q, D), got shape {tuple(q.shape)}")
    b, hq, lq, d = q.shape
    if d != view.head_dim or hq % view.num_heads:
        raise ValueError(f"query {tuple(q.shape)} does not fit a cache of {view.num_heads} KV heads "
                         f"of head_dim {view.head_dim} (query heads must be a multiple)")
    if view.batch != b:
        raise ValueError(f"cache view holds {view.batch} sequences, query batch {b}")
    if lq > 1 and lq > int(view.buffer_len.min()):  # the causal part must lie in the buffer
        raise ValueError(f"{lq} new tokens but a sequence buffers only {int(view.buffer_len.min())}: "
                         f"append the new tokens (compress=False) before attending")
    blocker = "INT8 P·V" if math_cfg.pv_int8 else math_cfg.kernel_blocker()
    if blocker:
        raise ValueError(f"fast decode implements SAS (one polynomial) and INT8 Q·Kᵀ only, "
                         f"not {blocker}")


def positions(view: PackedKV, b: int) -> torch.Tensor:
    """Token positions, int64 ``(L,)``, of the rows :func:`int8_rows` / :func:`float_rows` give
    for sequence ``b``: held pages first, then the buffer (module docstring)."""
    c, base, n = view.chunk, int(view.chunk_base[b]), int(view.n_chunks[b])
    device = view.buffer_k.values.device
    rows = torch.arange(int(view.buffer_len[b]), device=device)
    buffered = torch.where(rows < view.sinks, rows, rows + (base + n) * c)
    return torch.cat([torch.arange(n * c, device=device) + view.sinks + base * c, buffered])


def visible(keys: torch.Tensor, queries: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool ``(L_q, L_k)``: query position ``queries[i]`` sees key position ``keys[j]`` — causal,
    and within ``window`` when there is one (transformers' sliding-window mask)."""
    ok = keys[None, :] <= queries[:, None]
    if window is not None:
        ok &= keys[None, :] > queries[:, None] - window
    return ok


def _pages(view: PackedKV, b: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-only decompression of sequence ``b``'s pages of ``side`` (``"k"``/``"v"``), heads
    in layer order: ``values`` int8 ``(H_kv, C·c, D)`` in token order and the first-level scales,
    float32 ``(H_kv, C·c)`` per (chunk, head) or ``(H_kv, C·c, D)`` per channel."""
    n_chunks, c, h, d = int(view.n_chunks[b]), view.chunk, view.num_heads, view.head_dim
    device = view.buffer_k.values.device
    per_channel = any(getattr(g, f"{side}_first").dim() == 3 for g in view.groups)
    values = torch.empty(h, n_chunks * c, d, dtype=torch.int8, device=device)
    scale = torch.empty(h, n_chunks * c, *((d,) if per_channel else ()), dtype=torch.float32,
                        device=device)
    pages = view.page_table[b, :n_chunks].long().to(device)
    for g in view.groups if n_chunks else ():
        codes = unpack(getattr(g, f"{side}_packed").index_select(0, pages), g.bits)  # (C, n, D, c)
        if g.bits == 8:
            q8 = codes.view(torch.int8)
        else:
            dim, group = (-1, g.k_group) if side == "k" else (-2, g.v_group)
            lb = LowBit(codes, getattr(g, f"{side}_scale").index_select(0, pages),
                        getattr(g, f"{side}_low").index_select(0, pages), g.bits, group, dim % 4)
            q8 = dequantize_lowbit(lb)
        n = g.heads.numel()
        values[g.heads] = q8.permute(1, 0, 3, 2).reshape(n, n_chunks * c, d)  # (n, C·c, D)
        first = getattr(g, f"{side}_first").index_select(0, pages)  # (C, n) or (C, n, D)
        scale[g.heads] = first.transpose(0, 1).repeat_interleave(c, dim=1).expand_as(scale[g.heads])
    return values, scale


def _check_seq(view: PackedKV, b: int) -> None:
    if int(view.n_chunks[b]) + int(view.buffer_len[b]) == 0:
        raise ValueError(f"sequence {b} of the KV cache view is empty")


def int8_rows(view: PackedKV, b: int) -> tuple[Int8Rows, Int8Rows]:
    """Integer-only decompression of sequence ``b``: K and V as INT8 rows in token order,
    ``values`` int8 ``(H_kv, L, D)`` and ``scale`` float32 ``(H_kv, L)``. The reference path;
    fast paths decompress in registers instead. Per-channel first-level scales
    (``KVQuantConfig.k_channel_scale``) have no such form: read :func:`float_rows`."""
    _check_seq(view, b)
    n_buf = int(view.buffer_len[b])
    out = []
    for side, buf in (("k", view.buffer_k), ("v", view.buffer_v)):
        values, scale = _pages(view, b, side)
        if scale.dim() == 3:
            raise ValueError("per-channel first-level scales (k_channel_scale) have one scale per "
                             "channel, not per row: read float_rows")
        out.append(Int8Rows(torch.cat([values, buf.values[b, :, :n_buf]], dim=1),
                            torch.cat([scale, buf.scale[b, :, :n_buf]], dim=1)))
    return out[0], out[1]


def float_rows(view: PackedKV, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence ``b``'s K and V as float32 ``(H_kv, L, D)`` in token order, whatever the
    first-level scales (per (chunk, head) or per channel)."""
    _check_seq(view, b)
    n_buf = int(view.buffer_len[b])
    out = []
    for side, buf in (("k", view.buffer_k), ("v", view.buffer_v)):
        values, scale = _pages(view, b, side)
        pages = values.float() * (scale if scale.dim() == 3 else scale.unsqueeze(-1))
        recent = Int8Rows(buf.values[b, :, :n_buf], buf.scale[b, :, :n_buf]).dequantize()
        out.append(torch.cat([pages, recent], dim=1))
    return out[0], out[1]
