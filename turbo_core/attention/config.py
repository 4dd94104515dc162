"""Frozen, validated configuration dataclasses for the attention math and the KV cache.

No torch import here: configs are built and validated at DAG parse time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

SUPPORTED_KV_BITS = (2, 4, 8)
SUPPORTED_SAS_DEGREES = (2, 3)


class Scope(StrEnum):
    """How INT2 heads are picked: one ranking across all layers, per layer, or at random."""

    GLOBAL = "global"
    PER_LAYER = "per_layer"
    RANDOM = "random"


@dataclass(frozen=True)
class SASConfig:
    """Sparsity-based softmax approximation (DESIGN §1.1).

    ``e^x`` for ``x = s - rowmax <= 0`` is ``LUT[n] * P(f)`` with ``-x = n + f``, ``n`` integer,
    ``f in [0, 1)``. The LUT holds ``e^{-0} .. e^{-lut_max}``; where ``n > lut_max`` the weight
    is exactly zero (the sparsity cut-off ``T``).

    Attributes:
        degree: polynomial degree for ``e^{-f}`` (2 or 3).
        lut_max: ``T``, the last LUT exponent; scores more than ``T + 1`` below the row max drop.
        coeffs: polynomial coefficients in ascending powers; ``None`` means the reproducible
            least-squares fit of ``degree`` on [0, 1) (see ``turbo_core.attention.sas.fit_exp_poly``).
    """

    degree: int = 3
    lut_max: int = 8
    coeffs: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.degree not in SUPPORTED_SAS_DEGREES:
            raise ValueError(
                f"SASConfig.degree must be one of {SUPPORTED_SAS_DEGREES}, got {self.degree!r}"
            )
        if not isinstance(self.lut_max, int) or not 0 <= self.lut_max <= 64:
            raise ValueError(f"SASConfig.lut_max (T) must be an int in [0, 64], got {self.lut_max!r}")
        if self.coeffs is not None:
            if len(self.coeffs) != self.degree + 1:
                raise ValueError(
                    f"SASConfig.coeffs needs degree + 1 = {self.degree + 1} values, "
                    f"got {len(self.coeffs)}"
                )
            if not all(math.isfinite(c) for c in self.coeffs):
                raise ValueError(f"SASConfig.coeffs must be finite, got {self.coeffs!r}")


@dataclass(frozen=True)
class AttentionMath:
    """Which approximations the attention applies. All off = exact softmax attention.

    Attributes:
        sas: SAS exponent (``None`` = exact ``exp``).
        qk_int8: quantize Q and K to symmetric INT8 per token block and per head, so Q·Kᵀ is an
            int8×int8→int32 product rescaled by ``s_q * s_k``.
        pv_int8: quantize the unnormalised probabilities to a fixed 1/127 grid and V to INT8
            per token block, so P·V is an int8 product too.
        block_size: tokens per INT8 quantization block (aligned with the kernel tile).
        sparse_ratio: keep only the top ``ceil(sparse_ratio * Lk)`` keys per query
            (the source article's top-k sparsity); ``None`` keeps every key.
        smooth_k: before INT8 Q·Kᵀ, subtract from K its mean over the keys (per batch, head
            and channel). Exact for softmax (every score of a row shifts by the same
            ``q · mean``) and it removes the channel-wise offsets that dominate K outliers in
            LLMs, so the per-block INT8 scale resolves the remaining signal (SageAttention).
    """

    sas: SASConfig | None = None
    qk_int8: bool = False
    pv_int8: bool = False
    block_size: int = 64
    sparse_ratio: float | None = None
    smooth_k: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"AttentionMath.block_size must be a positive int, got {self.block_size!r}")
        if self.sparse_ratio is not None and not 0.0 < self.sparse_ratio <= 1.0:
            raise ValueError(
                f"AttentionMath.sparse_ratio must be in (0, 1] or None, got {self.sparse_ratio!r}"
            )

    @property
    def is_exact(self) -> bool:
        return (
            self.sas is None and not self.qk_int8 and not self.pv_int8 and self.sparse_ratio is None
        )


EXACT = AttentionMath()


@dataclass(frozen=True)
class KVQuantConfig:
    """Layout of the progressively quantized KV cache (DESIGN §1.2, stage 2).

    Attributes:
        chunk: tokens compressed at once; also the capacity of the INT8 recent-token buffer
            (the paper uses 64).
        k_group: tokens per K group (K is grouped per channel, along tokens); divides ``chunk``.
        v_group: channels per V group (V is grouped per token, along channels); divides head_dim.
        protect: the first-level INT8 range ``±protect`` used before INT4/INT2 compression;
            119 keeps INT4→INT8 integer decompression inside int8 without saturation.
    """

    chunk: int = 64
    k_group: int = 64
    v_group: int = 64
    protect: int = 119

    def __post_init__(self) -> None:
        if self.chunk < 4 or self.chunk % 4:
            raise ValueError(f"KVQuantConfig.chunk must be a multiple of 4, got {self.chunk}")
        if self.k_group < 1 or self.chunk % self.k_group:
            raise ValueError(
                f"KVQuantConfig.k_group ({self.k_group}) must divide chunk ({self.chunk})"
            )
        if self.v_group < 1:
            raise ValueError(f"KVQuantConfig.v_group must be positive, got {self.v_group}")
        if not 1 <= self.protect <= 127:
            raise ValueError(f"KVQuantConfig.protect must be in [1, 127], got {self.protect}")

    def v_group_for(self, head_dim: int) -> int:
        group = min(self.v_group, head_dim)
        if head_dim % group:
            raise ValueError(
                f"KVQuantConfig.v_group ({self.v_group}) must divide head_dim ({head_dim})"
            )
        return group


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_KV_BITS:
        raise ValueError(f"unsupported KV bits {bits!r}; supported: {SUPPORTED_KV_BITS}")
    return bits


# What ``TurboAttention`` applies unless told otherwise: SAS (cubic, T = 8) and INT8 Q·Kᵀ.
# INT8 P·V stays opt-in until its accuracy is validated on real models (DESIGN §1.2).
TURBO_DEFAULT = AttentionMath(sas=SASConfig(), qk_int8=True)
