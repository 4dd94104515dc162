"""The tensor-only view of one layer of the packed KV cache: what the kernels read.

Kernels (``turbo_kernels``) and fast paths take a :class:`PackedKV` — tensors, lengths and the
bit groups — never the cache class itself, so storage can change without touching a kernel.
Layout (``n`` = KV heads at one width, ``C`` = compressed chunks, ``c`` = tokens per chunk):

* K codes ``k_packed`` uint8 ``(B, n, D, C·c·bits/8)``, packed along tokens (planar, see
  ``quant.pack``); second-level ``k_scale`` uint8 / ``k_low`` int8 ``(B, n, D, C·c/k_group)``
  (K is grouped per channel along tokens);
* V codes ``v_packed`` uint8 ``(B, n, D, C·c·bits/8)``; ``v_scale`` / ``v_low``
  ``(B, n, D/v_group, C·c)`` (V is grouped per token along channels);
* first-level INT8 scales ``k_first`` / ``v_first`` float32 ``(B, n, C)``.

INT8 of a code: ``q8 = clamp(code·scale + low, ±127)``; float: ``q8 · first``. Heads at 8 bits
hold the INT8 codes unpacked and no second level (``k_scale`` … are ``None``). The newest
tokens (fewer than a chunk) wait in the INT8 buffer with a float scale per token and head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turbo_core.attention.quant import Int8Rows


@dataclass(frozen=True)
class PackedHeads:
    """The compressed chunks of the KV heads stored at one bit width (shapes above)."""

    bits: int
    heads: torch.Tensor  # int64 (n,): which KV heads of the layer these rows are
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
    """One cache layer as tensors: compressed chunks per bit group, then the INT8 buffer."""

    groups: tuple[PackedHeads, ...]  # empty while no chunk is compressed
    buffer_k: Int8Rows | None  # values int8 (B, H_kv, L_buf, D), scale float32 (B, H_kv, L_buf)
    buffer_v: Int8Rows | None
    batch: int
    num_heads: int
    head_dim: int
    n_chunks: int
    chunk: int
    k_group: int
    v_group: int

    @property
    def buffered(self) -> int:
        return 0 if self.buffer_k is None else self.buffer_k.values.shape[-2]

    @property
    def seq_len(self) -> int:
        return self.n_chunks * self.chunk + self.buffered
