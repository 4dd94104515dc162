"""The page pool of the KV heads of one cache layer stored at one bit width: one preallocated
tensor per part of a page (codes, second-level scales and offsets, first-level scales) with a
leading page axis, grown by whole blocks and written in place (see ``kvcache``)."""

from __future__ import annotations

import math

import torch

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.packed import PackedHeads


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

    @property
    def capacity(self) -> int:
        return self.t["k_packed"].shape[0]

    def grow(self, pages: int) -> None:
        for name, old in self.t.items():
            new = torch.empty(pages, *old.shape[1:], dtype=old.dtype, device=old.device)
            new[: old.shape[0]] = old
            self.t[name] = new

    def write(self, pages: torch.Tensor, sides: dict[str, torch.Tensor]) -> None:
        for name, value in sides.items():
            self.t[name].index_copy_(0, pages, value)

    def page_nbytes(self) -> int:
        return sum(math.prod(t.shape[1:]) * t.element_size() for t in self.t.values())

    def heads_view(self) -> PackedHeads:
        return PackedHeads(bits=self.bits, heads=self.heads, k_group=self.k_group,
                           v_group=self.v_group, **{
            name: self.t.get(name) for name in ("k_packed", "k_scale", "k_low", "k_first",
                                                "v_packed", "v_scale", "v_low", "v_first")})
