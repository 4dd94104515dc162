"""Kernel (linear) attention: ``softmax(q kᵀ) v`` replaced by ``φ(q) (φ(k)ᵀ v)`` normalised by
``φ(q) Σ φ(k)``, O(L) in time and memory instead of O(L²) (the source article's
kernel-function attention).

Feature maps (``FeatureMap``):

* ``favor+`` — Performer's positive orthogonal random features (Choromanski et al., 2021):
  ``φ(x) = exp(W x' - |x'|² / 2) / √m`` with ``x' = x √scale`` and ``W`` the ``(m, D)`` rows
  of stacked random orthogonal blocks, each row's norm drawn from the χ(D) law of a Gaussian
  row. ``E[φ(q)·φ(k)] = exp(q·k·scale)``: an unbiased estimate of the softmax kernel that
  converges to softmax attention as ``m`` grows.
* ``elu`` — ``φ(x) = elu(x) + 1`` (Katharopoulos et al., 2020): a different positive kernel,
  not an estimate of softmax; cheap, deterministic.

Each row and each key is shifted by a constant before the ``exp`` of FAVOR+ (the row's max for
queries, the (batch, head)'s max for keys): the constants cancel between numerator and
denominator, and they keep ``exp`` finite. Causal attention runs in chunks: inside a chunk the
masked quadratic form, across chunks the prefix sums ``S = Σ φ(k)ᵀ v`` and ``z = Σ φ(k)`` —
memory ``O(L·m + chunk²)``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from turbo_core.attention.config import FeatureMap

CAUSAL_CHUNK = 128
FEATURE_EPS = 1e-4


def draw_features(num: int, dim: int, *, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(num, dim)`` orthogonal random features: blocks of ``dim`` orthonormal rows (QR of a
    Gaussian matrix), each row rescaled to the norm of an independent Gaussian row."""
    if num < 1 or dim < 1:
        raise ValueError(f"random features need num >= 1 and dim >= 1, got {num}, {dim}")
    blocks = []
    for _ in range(math.ceil(num / dim)):
        gauss = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        qm, _ = torch.linalg.qr(gauss)
        blocks.append(qm.T)
    rows = torch.cat(blocks)[:num]
    norms = torch.randn(num, dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).to(dtype)


@functools.lru_cache(maxsize=16)
def _default(num: int, dim: int, seed: int) -> torch.Tensor:
    return draw_features(num, dim, generator=torch.Generator().manual_seed(seed))


def default_features(num: int, dim: int, device: torch.device, dtype: torch.dtype,
                     seed: int = 0) -> torch.Tensor:
    """The fixed features the functional API uses when none are passed (seeded, reproducible)."""
    return _default(num, dim, seed).to(device=device, dtype=dtype)


def feature_map(x: torch.Tensor, kind: FeatureMap, features: torch.Tensor | None, scale: float,
                is_query: bool) -> torch.Tensor:
    """``φ(x)`` for ``x (B, H, L, D)``: ``(B, H, L, m)`` for FAVOR+, ``(B, H, L, D)`` for elu."""
    if kind is FeatureMap.ELU:
        return F.elu(x) + 1.0
    if features is None or features.dim() != 2 or features.shape[1] != x.shape[-1]:
        raise ValueError(f"FAVOR+ needs features of shape (m, {x.shape[-1]}), got "
                         f"{None if features is None else tuple(features.shape)}")
    xs = x * math.sqrt(scale)
    proj = xs @ features.to(x.dtype).T  # (B, H, L, m)
    # the constant shift: per query row, or one per (batch, head) over all keys and features
    shift = proj.amax(dim=-1, keepdim=True) if is_query else proj.amax(dim=(-2, -1), keepdim=True)
    # one pass over (B, H, L, m): |x'|²/2, the shift and the 1/√m all go in one small tensor;
    # + FEATURE_EPS (relative to the largest feature, 1 before the 1/√m) keeps every feature
    # and so every denominator away from 0, whose reciprocal overflowed the gradient in
    # training (NaN at step 282 of `turbo bench train` without it; Performer's stabiliser)
    small = 0.5 * (xs * xs).sum(dim=-1, keepdim=True) + shift.detach() \
        + 0.5 * math.log(features.shape[0])
    phi = (proj - small).exp_()
    eps = FEATURE_EPS / math.sqrt(features.shape[0])
    return phi + eps if phi.requires_grad else phi.add_(eps)  # exp's backward reads phi


def padding_keep(mask: torch.Tensor | None, b: int, lk: int, what: str = "kernel attention"
                 ) -> torch.Tensor | None:
    """A padding mask (bool True = attend, or additive with ``-inf`` = drop) of shape
    broadcastable to ``(B, 1, 1, L_k)`` as a ``(B, 1, L_k, 1)`` float keep-factor; other masks
    cannot be factored through the features (or the projections) and are refused, naming
    ``what`` refuses them."""
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != lk \
            or mask.shape[0] not in (1, b):
        raise ValueError(f"{what} takes a key padding mask (B, 1, 1, L_k) only, got "
                         f"{tuple(mask.shape)}: an arbitrary score mask does not factor through it")
    keep = mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask == 0)
    if mask.dtype != torch.bool and bool(((mask != 0) & torch.isfinite(mask)).any()):
        raise ValueError(f"{what} takes a 0 / -inf padding mask, not a float bias")
    return keep.reshape(mask.shape[0], 1, lk, 1).float()


def _expand(k: torch.Tensor, heads: int) -> torch.Tensor:
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: FeatureMap,
                     features: torch.Tensor | None = None, causal: bool = False,
                     scale: float | None = None, mask: torch.Tensor | None = None,
                     chunk: int = CAUSAL_CHUNK) -> torch.Tensor:
    """Kernel attention over ``q (B, H_q, L, D)``, ``k, v (B, H_kv, L_k, D)`` (GQA allowed);
    returns ``(B, H_q, L, D_v)`` in ``q``'s dtype. ``causal`` needs ``L == L_k``."""
    b, hq, lq, d = q.shape
    if causal and lq != k.shape[2]:
        raise ValueError(f"causal kernel attention needs as many queries as keys, got {lq} "
                         f"and {k.shape[2]}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    fq = feature_map(q.to(work), kind, features, scale, True)
    fk = feature_map(_expand(k, hq).to(work), kind, features, scale, False)
    vv = _expand(v, hq).to(work)
    keep = padding_keep(mask, b, k.shape[2])
    if keep is not None:
        fk = fk * keep
    if not causal:
        num = fq @ (fk.transpose(-1, -2) @ vv)
        den = fq @ fk.sum(dim=-2, keepdim=True).transpose(-1, -2)
        return (num / den.clamp_min(torch.finfo(work).tiny)).to(q.dtype)
    state = fq.new_zeros(b, hq, fq.shape[-1], vv.shape[-1])
    total = fq.new_zeros(b, hq, fq.shape[-1], 1)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    outs = []
    for lo in range(0, lq, chunk):
        qc, kc, vc = (t[:, :, lo:lo + chunk] for t in (fq, fk, vv))
        n = qc.shape[2]
        local = (qc @ kc.transpose(-1, -2)).masked_fill(~tri[:n, :n], 0.0)
        num = qc @ state + local @ vc
        den = qc @ total + local.sum(dim=-1, keepdim=True)
        outs.append(num / den.clamp_min(torch.finfo(work).tiny))
        state = state + kc.transpose(-1, -2) @ vc
        total = total + kc.sum(dim=-2, keepdim=True).transpose(-1, -2)
    return torch.cat(outs, dim=2).to(q.dtype)


def _quadratic(q: torch.Tensor, k: torch.Tensor, kind: FeatureMap, features: torch.Tensor | None,
               causal: bool, scale: float | None, work: torch.dtype,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    hq, d = q.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    feats = None if features is None else features.to(work)
    fq = feature_map(q.to(work), kind, feats, scale, True)
    fk = feature_map(_expand(k, hq).to(work), kind, feats, scale, False)
    keep = padding_keep(mask, q.shape[0], k.shape[2])
    if keep is not None:
        fk = fk * keep.to(work)
    a = fq @ fk.transpose(-1, -2)
    return a.tril() if causal else a


def implied_weights(q: torch.Tensor, k: torch.Tensor, *, kind: FeatureMap,
                    features: torch.Tensor | None = None, causal: bool = False,
                    scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention weights kernel attention applies, ``A / A 1``, float32 ``(B, H, L, L_k)``."""
    a = _quadratic(q, k, kind, features, causal, scale, torch.float32, mask)
    return a / a.sum(dim=-1, keepdim=True)


def kernel_attention_quadratic(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               kind: FeatureMap, features: torch.Tensor | None = None,
                               causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The same attention in its O(L²) form, ``A = φ(q) φ(k)ᵀ`` (lower-triangular when causal),
    ``out = A v / A 1``, in float64: the closed form the prefix-sum path is tested against."""
    a = _quadratic(q, k, kind, features, causal, scale, torch.float64)
    return (a @ _expand(v, q.shape[1]).double()) / a.sum(dim=-1, keepdim=True)
