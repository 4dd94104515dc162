"""One layer of the progressively quantized KV cache (DESIGN §1.2, stage 2), in pure PyTorch.

Layout, per layer:
* **recent-token buffer** — the newest tokens (fewer than ``chunk``) in INT8 with one float
  scale per token and head: ``x ~= q8 * s_t``.
* **compressed chunks** — every full ``chunk`` of tokens is re-quantized to INT8 with one scale
  per (chunk, head) in the protective range ``±119``, then, per head, to the head's bits:
  K grouped per channel along tokens (``k_group`` tokens), V grouped per token along channels
  (``v_group`` channels), codes packed along the token axis (planar, see ``quant.pack``).
  Heads at 8 bits keep the INT8 codes unpacked.

``dequantize_int8`` performs the integer-only partial decompression (low-bit → INT8) and
returns INT8 rows with per-token scales, which is exactly what an INT8 Q·Kᵀ consumes.
The tensors held are the real storage: ``nbytes`` sums them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from turbo_core.attention.config import KVQuantConfig, check_bits
from turbo_core.attention.packed import PackedHeads, PackedKV
from turbo_core.attention.quant import (
    Int8Rows,
    LowBit,
    dequantize_lowbit,
    pack,
    quantize_int8_blockwise,
    quantize_lowbit,
    unpack,
)


@dataclass
class _PackedSide:
    """One side (K or V) of one chunk for the heads sharing one bit width."""

    packed: torch.Tensor  # uint8 (B, n_heads, D, chunk * bits / 8), packed along tokens
    scale: torch.Tensor | None  # uint8 second-level scales (None at 8 bits)
    low: torch.Tensor | None  # int8 group offsets (None at 8 bits)
    first_scale: torch.Tensor  # float32 (B, n_heads): the chunk's INT8 scale

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scale, self.low, self.first_scale) if t is not None]


class QuantizedKVLayer:
    """Packed INT4/INT2 (+ INT8) KV storage of one attention layer with a per-head bit plan.

    Args:
        head_bits: bits per KV head (2, 4 or 8), length = number of KV heads.
        head_dim: channels per head.
        cfg: chunk and group sizes.
    """

    def __init__(self, head_bits: Sequence[int], head_dim: int, cfg: KVQuantConfig | None = None):
        self.cfg = cfg or KVQuantConfig()
        self.head_bits = tuple(check_bits(int(b)) for b in head_bits)
        if not self.head_bits:
            raise ValueError("QuantizedKVLayer needs at least one KV head in head_bits")
        self.head_dim = head_dim
        self.v_group = self.cfg.v_group_for(head_dim)
        # heads grouped by bit width so each group packs into one dense tensor
        self.groups: dict[int, list[int]] = {}
        for h, b in enumerate(self.head_bits):
            self.groups.setdefault(b, []).append(h)
        self._chunks: list[dict[int, tuple[_PackedSide, _PackedSide]]] = []
        self._buf_k: Int8Rows | None = None
        self._buf_v: Int8Rows | None = None
        self.batch: int | None = None

    @property
    def num_heads(self) -> int:
        return len(self.head_bits)

    @property
    def buffered(self) -> int:
        return 0 if self._buf_k is None else self._buf_k.values.shape[-2]

    @property
    def seq_len(self) -> int:
        return len(self._chunks) * self.cfg.chunk + self.buffered

    def _check(self, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, t in (("key", k), ("value", v)):
            if t.dim() != 4:
                raise ValueError(f"{name} must be (B, H_kv, T, D), got shape {tuple(t.shape)}")
            if t.shape[1] != self.num_heads or t.shape[3] != self.head_dim:
                raise ValueError(
                    f"{name} has {t.shape[1]} heads of dim {t.shape[3]}, but this cache layer "
                    f"holds {self.num_heads} heads of dim {self.head_dim}"
                )
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"key {tuple(k.shape)} and value {tuple(v.shape)} shapes differ")
        if self.batch is not None and k.shape[0] != self.batch:
            raise ValueError(f"batch size changed from {self.batch} to {k.shape[0]}")

    def append(self, k: torch.Tensor, v: torch.Tensor, compress: bool = True) -> None:
        """Add new tokens to the INT8 buffer. ``k, v``: float ``(B, H_kv, T, D)``.

        With ``compress`` (default) every full chunk is compressed at once; otherwise call
        :meth:`compress_full_chunks` later (e.g. after the new tokens attended at INT8).
        """
        self._check(k, v)
        self.batch = k.shape[0]
        new_k = quantize_int8_blockwise(k, block_size=1)
        new_v = quantize_int8_blockwise(v, block_size=1)
        self._buf_k = new_k if self._buf_k is None else _cat_rows(self._buf_k, new_k)
        self._buf_v = new_v if self._buf_v is None else _cat_rows(self._buf_v, new_v)
        if compress:
            self.compress_full_chunks()

    def compress_full_chunks(self) -> None:
        """Move every full ``chunk`` of buffered tokens into packed low-bit storage."""
        if self._buf_k is None:
            return
        c = self.cfg.chunk
        while self.buffered >= c:
            head_k, self._buf_k = _split_rows(self._buf_k, c)
            head_v, self._buf_v = _split_rows(self._buf_v, c)
            self._chunks.append(self._compress(head_k.dequantize(), head_v.dequantize()))
        if self.buffered == 0:
            self._buf_k = self._buf_v = None

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> dict[int, tuple[_PackedSide, _PackedSide]]:
        c = self.cfg.chunk
        k8 = quantize_int8_blockwise(k, block_size=c, qmax=self.cfg.protect)
        v8 = quantize_int8_blockwise(v, block_size=c, qmax=self.cfg.protect)
        out = {}
        for bits, heads in self.groups.items():
            idx = torch.tensor(heads, device=k.device)
            # (B, n, c, D) -> (B, n, D, c): channels-major so packing runs along tokens
            kq = k8.values.index_select(1, idx).transpose(-1, -2)
            vq = v8.values.index_select(1, idx).transpose(-1, -2)
            k_first = k8.scale.index_select(1, idx)[..., 0]
            v_first = v8.scale.index_select(1, idx)[..., 0]
            out[bits] = (
                _side(kq, bits, dim=-1, group=self.cfg.k_group, first=k_first),
                _side(vq, bits, dim=-2, group=self.v_group, first=v_first),
            )
        return out

    def dequantize_int8(self) -> tuple[Int8Rows, Int8Rows]:
        """Integer-only decompression of everything held: K and V as INT8 rows, token order.

        Returns:
            ``(k, v)`` with ``values`` int8 ``(B, H_kv, L, D)`` and ``scale`` float32 ``(B, H_kv, L)``.
        """
        if self.seq_len == 0:
            raise ValueError("the KV cache layer is empty")
        parts_k, parts_v = [], []
        for chunk in self._chunks:
            parts_k.append(self._restore(chunk, side=0))
            parts_v.append(self._restore(chunk, side=1))
        if self._buf_k is not None:
            parts_k.append(self._buf_k)
            parts_v.append(self._buf_v)
        return _cat_rows(*parts_k), _cat_rows(*parts_v)

    def _restore(self, chunk: dict[int, tuple[_PackedSide, _PackedSide]], side: int) -> Int8Rows:
        c = self.cfg.chunk
        any_side = next(iter(chunk.values()))[side]
        batch = any_side.packed.shape[0]
        values = torch.empty(batch, self.num_heads, c, self.head_dim, dtype=torch.int8,
                             device=any_side.packed.device)
        scale = torch.empty(batch, self.num_heads, c, dtype=torch.float32, device=values.device)
        for bits, heads in self.groups.items():
            s = chunk[bits][side]
            codes = unpack(s.packed, bits)  # (B, n, D, c)
            if bits == 8:
                q8 = codes.view(torch.int8)
            else:
                dim, group = (-1, self.cfg.k_group) if side == 0 else (-2, self.v_group)
                lb = LowBit(codes, s.scale, s.low, bits, group, dim % codes.dim())
                q8 = dequantize_lowbit(lb)
            idx = torch.tensor(heads, device=values.device)
            values.index_copy_(1, idx, q8.transpose(-1, -2))
            scale.index_copy_(1, idx, s.first_scale.unsqueeze(-1).expand(-1, -1, c))
        return Int8Rows(values, scale)

    def view(self) -> PackedKV:
        """This layer as a :class:`PackedKV` (codes still packed: the compressed chunks of each
        bit group concatenated along tokens, never a dequantized cache)."""
        if self.seq_len == 0:
            raise ValueError("the KV cache layer is empty")
        groups = []
        for bits, heads in self.groups.items() if self._chunks else ():
            sides = [chunk[bits] for chunk in self._chunks]
            parts = {}
            for i, name in enumerate(("k", "v")):
                side = [s[i] for s in sides]
                parts[f"{name}_packed"] = torch.cat([p.packed for p in side], dim=-1)
                parts[f"{name}_first"] = torch.stack([p.first_scale for p in side], dim=-1)
                low_bit = bits != 8
                parts[f"{name}_scale"] = torch.cat([p.scale for p in side], dim=-1) if low_bit else None
                parts[f"{name}_low"] = torch.cat([p.low for p in side], dim=-1) if low_bit else None
            device = parts["k_packed"].device
            groups.append(PackedHeads(bits=bits, heads=torch.tensor(heads, device=device), **parts))
        return PackedKV(groups=tuple(groups), buffer_k=self._buf_k, buffer_v=self._buf_v,
                        batch=self.batch, num_heads=self.num_heads, head_dim=self.head_dim,
                        n_chunks=len(self._chunks), chunk=self.cfg.chunk,
                        k_group=self.cfg.k_group, v_group=self.v_group)

    def tensors(self) -> list[torch.Tensor]:
        held = []
        for chunk in self._chunks:
            for k_side, v_side in chunk.values():
                held += k_side.tensors() + v_side.tensors()
        for rows in (self._buf_k, self._buf_v):
            if rows is not None:
                held += [rows.values, rows.scale]
        return held

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds (codes, scales, offsets, buffer)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _side(q8: torch.Tensor, bits: int, dim: int, group: int, first: torch.Tensor) -> _PackedSide:
    """Compress one side; ``q8`` is int8 ``(B, n, D, chunk)``."""
    if bits == 8:
        return _PackedSide(q8.contiguous().view(torch.uint8), None, None, first.contiguous())
    lb = quantize_lowbit(q8, bits, dim=dim, group=group)
    return _PackedSide(pack(lb.codes, bits), lb.scale, lb.low, first.contiguous())


def _cat_rows(*rows: Int8Rows) -> Int8Rows:
    return Int8Rows(
        torch.cat([r.values for r in rows], dim=-2), torch.cat([r.scale for r in rows], dim=-1)
    )


def _split_rows(rows: Int8Rows, n: int) -> tuple[Int8Rows, Int8Rows]:
    head = Int8Rows(rows.values[..., :n, :], rows.scale[..., :n])
    tail = Int8Rows(rows.values[..., n:, :].clone(), rows.scale[..., n:].clone())
    return head, tail
