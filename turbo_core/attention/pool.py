"""The page pool of the KV heads of one cache layer stored at one bit width: one preallocated
tensor per part of a page (codes, second-level scales and offsets, first-level scales) with a
leading page axis, grown by whole blocks and written in place (see ``kvcache``)."""

from __future__ import annotations

import math

import torch

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.packed import PackedHeads
from turbo_core.attention.quant import (
    Int8Rows,
    pack,
    quantize_int8_blockwise,
    quantize_int8_channels,
    quantize_lowbit,
)


class PagePool:
    """The pages of the KV heads stored at one bit width: tensors with a leading page axis."""

    def __init__(self, bits: int, heads: list[int], head_dim: int, cfg: KVQuantConfig,
                 device: torch.device):
        self.bits, self.heads = bits, torch.tensor(heads, device=device)
        self.k_group, self.v_group = k_group, v_group = cfg.groups_for(bits, head_dim)
        n, d, c = len(heads), head_dim, cfg.chunk
        packed = (n, d, c * bits // 8)
        shapes = {"k_packed": (packed, torch.uint8), "v_packed": (packed, torch.uint8),
                  "k_first": ((n, d) if cfg.k_channel_scale else (n,), torch.float32),
                  "v_first": ((n,), torch.float32)}
        if bits != 8:
            shapes |= {"k_scale": ((n, d, c // k_group), torch.uint8),
                       "k_low": ((n, d, c // k_group), torch.int8),
                       "v_scale": ((n, d // v_group, c), torch.uint8),
                       "v_low": ((n, d // v_group, c), torch.int8)}
        self.t = {name: torch.empty(0, *shape, dtype=dt, device=device)
                  for name, (shape, dt) in shapes.items()}
        self._view: PackedHeads | None = None  # until the tensors are replaced (grow)

    @property
    def capacity(self) -> int:
        return self.t["k_packed"].shape[0]

    def grow(self, pages: int) -> None:
        for name, old in self.t.items():
            new = torch.empty(pages, *old.shape[1:], dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old
            self.t[name] = new
        self._view = None

    def write(self, pages: torch.Tensor, sides: dict[str, torch.Tensor]) -> None:
        for name, value in sides.items():
            self.t[name].index_copy_(0, pages, value)

    def page_nbytes(self) -> int:
        return sum(math.prod(t.shape[1:]) * t.element_size() for t in self.t.values())

    def heads_view(self) -> PackedHeads:
        """The pool's tensors as readers take them; one object until the pool grows (what the
        C++ ops' argument lists are cached on)."""
        if self._view is None:
            self._view = PackedHeads(bits=self.bits, heads=self.heads, k_group=self.k_group,
                                     v_group=self.v_group, **{
                name: self.t.get(name) for name in ("k_packed", "k_scale", "k_low", "k_first",
                                                    "v_packed", "v_scale", "v_low", "v_first")})
        return self._view


def compress_pages(k: torch.Tensor, v: torch.Tensor, pools: dict[int, PagePool],
                   cfg: KVQuantConfig) -> dict[int, dict[str, torch.Tensor]]:
    """``k, v`` float ``(N, H, c, D)`` (N full chunks) -> per bit width, the page tensors of N
    pages of ``pools``: INT8 with one scale per (chunk, head) — or per channel for K with
    ``cfg.k_channel_scale`` — in the protective range, then the head's bits (docs/design.md §1.2)."""
    if cfg.k_channel_scale:  # one scale per (chunk, head, channel)
        k8 = Int8Rows(*quantize_int8_channels(k, qmax=cfg.protect))
    else:
        k8 = quantize_int8_blockwise(k, block_size=cfg.chunk, qmax=cfg.protect)
    v8 = quantize_int8_blockwise(v, block_size=cfg.chunk, qmax=cfg.protect)
    out = {}
    for bits, pool in pools.items():
        idx = pool.heads
        sides = {}
        for name, q8, dim, group in (("k", k8, -1, pool.k_group), ("v", v8, -2, pool.v_group)):
            # (N, n, c, D) -> (N, n, D, c): channels-major so packing runs along tokens
            codes = q8.values.index_select(1, idx).transpose(-1, -2)
            first = q8.scale.index_select(1, idx)  # (N, n, c) per row, (N, n, D) per channel
            sides[f"{name}_first"] = (first if name == "k" and cfg.k_channel_scale
                                      else first[..., 0]).contiguous()
            if bits == 8:
                sides[f"{name}_packed"] = codes.contiguous().view(torch.uint8)
                continue
            lb = quantize_lowbit(codes, bits, dim=dim, group=group)
            sides |= {f"{name}_packed": pack(lb.codes, bits), f"{name}_scale": lb.scale,
                      f"{name}_low": lb.low}
        out[bits] = sides
    return out
