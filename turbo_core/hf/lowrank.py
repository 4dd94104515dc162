"""The low-rank K/V cache lever's calibration (``KVQuantConfig.low_rank``; Palu, LoRC): per
layer and KV head, the top-``r`` right singular vectors of the calibration K and V (after RoPE,
as the cache sees them), and how much of their energy (squared Frobenius norm) ``r`` keeps."""

from __future__ import annotations

import os

import torch

from turbo_core.hf.calibrate import collect_kv, token_ids
from turbo_core.hf.data import load_split
from turbo_core.hf.models import LoadedModel


def top_directions(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (H, T, D)`` -> the ``(H, D, rank)`` orthonormal top right singular vectors per head
    and the fraction of each head's energy they keep ``(H,)``."""
    if not 1 <= rank <= x.shape[-1]:
        raise ValueError(f"rank must be in [1, {x.shape[-1]}], got {rank}")
    _, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    energy = s.pow(2)
    kept = energy[:, :rank].sum(-1) / energy.sum(-1)
    return vh[:, :rank].transpose(-1, -2).float().contiguous(), kept.float()


def calibrate_bases(lm: LoadedModel, rank: int, *, text_path: str | os.PathLike[str] | None = None,
                    max_tokens: int = 4096, window: int = 512, progress: bool = True
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict]:
    """Per layer ``(U_K, U_V)`` for a cache storing ``rank`` coordinates, from the same
    calibration text as the bit plan; and a report (energy kept, per layer and head)."""
    split = load_split(text_path)
    ids = token_ids(lm.tokenizer, split.calibration)[:max_tokens]
    keys, values = collect_kv(lm, ids, window, progress=progress)
    bases, kept_k, kept_v = [], [], []
    for k, v in zip(keys, values, strict=True):
        uk, ek = top_directions(k, rank)
        uv, ev = top_directions(v, rank)
        bases.append((uk, uv))
        kept_k.append(ek.tolist())
        kept_v.append(ev.tolist())
    flat_k = [e for row in kept_k for e in row]
    flat_v = [e for row in kept_v for e in row]
    report = {"rank": rank, "head_dim": lm.shape.head_dim, "tokens": int(ids.numel()),
              "source": split.source, "energy_kept_k": kept_k, "energy_kept_v": kept_v,
              "energy_kept_k_min": min(flat_k), "energy_kept_v_min": min(flat_v),
              "energy_kept_k_mean": sum(flat_k) / len(flat_k),
              "energy_kept_v_mean": sum(flat_v) / len(flat_v)}
    return bases, report
