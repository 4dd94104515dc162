"""The orthogonal rotation of K and V per head (``KVQuantConfig.rotate``), and RoPE applied and
undone for K stored before RoPE (``KVQuantConfig.pre_rope``).

``R = diag(s) · H / sqrt(D)``: ``H`` the Sylvester Hadamard matrix of size ``D`` (a power of
two), ``s`` fixed random signs (seed 0, so every process, plan and image rotates alike).
``R`` is orthogonal, so ``(q R)(k R)ᵀ = q kᵀ`` and ``(P · V R) Rᵀ = P · V``: attention over a
rotated cache equals attention over the plain one up to rounding. What it changes is what the
quantizer sees: an outlier channel of K or V is spread over all ``D`` channels (each rotated
channel is a ±1 mix of all of them), so one INT8 scale per (chunk, head) and the INT4/INT2
groups resolve the other channels instead of spending their levels on the outlier (QuaRot).

RoPE (the half-split form transformers uses): ``rope(x) = x·cos + half(x)·sin`` with
``half([x1, x2]) = [-x2, x1]``; both halves of a pair share one angle, so it is a rotation of
each pair scaled by ``a = sqrt(cos² + sin²)`` (1 unless the model scales its RoPE) and
``x = (rope(x)·cos - half(rope(x))·sin) / a²``.
"""

from __future__ import annotations

import functools

import torch

SIGN_SEED = 0


@functools.lru_cache(maxsize=16)
def _matrix(head_dim: int) -> torch.Tensor:
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(SIGN_SEED)
    signs = torch.randint(0, 2, (head_dim,), generator=gen, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h / head_dim ** 0.5).float()


def rotation(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``R`` float32 ``(D, D)``, orthogonal; one copy per device (it is read every step)."""
    return _on_device(head_dim, torch.device(device))


@functools.lru_cache(maxsize=16)
def _on_device(head_dim: int, device: torch.device) -> torch.Tensor:
    return _matrix(head_dim).to(device)


def rotate(x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """``x R`` over the last axis (``(..., D)``), in float32 whatever ``x``'s dtype; ``matrix``:
    ``R`` itself, from :func:`rotation` (what a compiled graph passes: it cannot call the
    cached lookup)."""
    return x.float() @ (rotation(x.shape[-1], x.device) if matrix is None else matrix)


def unrotate(x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """``x Rᵀ``: undoes :func:`rotate`."""
    return x.float() @ (rotation(x.shape[-1], x.device) if matrix is None else matrix).t()


def _half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x (..., L, D)`` with ``cos, sin`` broadcastable to it, in float32."""
    x, cos, sin = x.float(), cos.float(), sin.float()
    return x * cos + _half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The ``x`` whose :func:`apply_rope` is the given ``x``, in float32."""
    x, cos, sin = x.float(), cos.float(), sin.float()
    return (x * cos - _half(x) * sin) / (cos * cos + sin * sin)
