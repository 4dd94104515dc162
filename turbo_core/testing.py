"""The one tensor-comparison helper used by the tests of turbo_core and kernels.

Every failure message carries shapes, max/mean absolute error, SQNR and cosine similarity.
"""

from __future__ import annotations

import itertools
import math

import torch


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(|ref|² / |ref - approx|²)`` in dB."""
    ref = reference.double()
    noise = (ref - approx.double()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def cosine(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(
        reference.double().flatten(), approx.double().flatten(), dim=0).item()


def report(reference: torch.Tensor, approx: torch.Tensor) -> str:
    err = (reference.double() - approx.double()).abs()
    return (f"shapes ref {tuple(reference.shape)} {reference.dtype} / approx "
            f"{tuple(approx.shape)} {approx.dtype}: max abs err {err.max().item():.3e}, "
            f"mean abs err {err.mean().item():.3e}, SQNR {sqnr_db(reference, approx):.1f} dB, "
            f"cosine {cosine(reference, approx):.7f}")


def assert_close(reference: torch.Tensor, approx: torch.Tensor, *, atol: float,
                 rtol: float = 0.0) -> None:
    """``|ref - approx| <= atol + rtol·|ref|`` elementwise, with a full report on failure."""
    assert reference.shape == approx.shape, report(reference, approx)
    ref, app = reference.double(), approx.double()
    bad = (ref - app).abs() > atol + rtol * ref.abs()
    assert not bool(bad.any()), f"{int(bad.sum())} elements out of tolerance; " + report(ref, app)


def assert_cosine(reference: torch.Tensor, approx: torch.Tensor, *, at_least: float) -> None:
    c = cosine(reference, approx)
    assert c >= at_least, f"cosine {c:.7f} < {at_least}; " + report(reference, approx)


def assert_sqnr(reference: torch.Tensor, approx: torch.Tensor, *, at_least_db: float) -> None:
    s = sqnr_db(reference, approx)
    assert s >= at_least_db, f"SQNR {s:.2f} dB < {at_least_db} dB; " + report(reference, approx)


def grow(store, tokens, pieces: int, new: int = 1) -> list[int]:
    """Open one sequence per entry of ``tokens`` (K, V ``(H, L, D)`` each) in a KV store and feed
    it the way ``TurboCache`` does — compress the last call's full chunks, then append the next
    piece uncompressed — in pieces of ``pieces`` tokens, the last ``new`` tokens as one final
    piece left buffered (the new tokens of an attention call). Returns the sequence ids."""
    seqs = [store.add_sequence() for _ in tokens]
    for s, (k, v) in zip(seqs, tokens, strict=True):
        n = k.shape[1]
        cuts = [*range(0, n - new, pieces), n - new, n]
        for a, b in itertools.pairwise(cuts):
            if b > a:
                store.compress_full_chunks([s])
                store.append(k[None, :, a:b], v[None, :, a:b], compress=False, seqs=[s])
    return seqs
