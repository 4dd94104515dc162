"""Frozen, validated configuration dataclasses for the attention math and the KV cache.

No torch import here: configs are built and validated at DAG parse time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

SUPPORTED_KV_BITS = (2, 4, 8)
SUPPORTED_SAS_DEGREES = (2, 3)
MAX_SAS_PIECES = 64  # polynomial pieces on [0, 1), and LUT entries per unit of -x


class FeatureMap(StrEnum):
    """Kernel (linear) attention's feature map φ, with ``softmax(q·kᵀ) ≈ φ(q)·φ(k)ᵀ`` up to
    the row normalisation: Performer's positive random features (FAVOR+, an unbiased estimate
    of ``exp(q·k/√D)``) or ``elu(x) + 1`` (Katharopoulos et al.: a different, cheaper kernel,
    not an estimate of softmax)."""

    FAVOR = "favor+"
    ELU = "elu"


class Scope(StrEnum):
    """How INT2 heads are picked: one ranking across all layers, per layer, or at random."""

    GLOBAL = "global"
    PER_LAYER = "per_layer"
    RANDOM = "random"


@dataclass(frozen=True)
class SASConfig:
    """Sparsity-based softmax approximation (docs/design.md §1.1).

    ``e^x`` for ``x = s - rowmax <= 0`` is ``LUT[n] * P(f)`` with ``-x = n + f``, ``n`` integer,
    ``f in [0, 1)``. The LUT holds ``e^{-0} .. e^{-lut_max}``; where ``n > lut_max`` the weight
    is exactly zero (the sparsity cut-off ``T``).

    The article's next step, higher-order approximations: ``pieces`` polynomials on equal
    parts of [0, 1) and a finer LUT (``lut_steps`` entries per unit of ``-x``, ``e^{-j/s}``);
    the general form is ``LUT_s[n] * P_i(t)`` with ``-x * s * pieces = m + t``, ``n = m // pieces``,
    ``i = m % pieces`` (one floor, one table entry, one polynomial of ``degree``;
    ``turbo_core.attention.sas``). The fused kernels read the single polynomial and the unit
    LUT only; other forms run the reference and the dispatch says so.

    Attributes:
        degree: polynomial degree for ``e^{-f}`` (2 or 3).
        lut_max: ``T``, the last LUT exponent; scores more than ``T + 1`` below the row max drop.
        coeffs: polynomial coefficients in ascending powers; ``None`` means the reproducible
            least-squares fit of ``degree`` on [0, 1) (see ``turbo_core.attention.sas.fit_exp_poly``).
            Only for the single-piece, unit-LUT form.
        pieces: polynomial pieces on [0, 1), each its own least-squares fit.
        lut_steps: LUT entries per unit of ``-x`` (a finer table, a shorter polynomial range).
        head_lut_max: a cut-off ``T`` per query head (the article's adaptive sparsity: heads
            with flat attention keep more keys), chosen from calibration by
            ``turbo_core.attention.adaptive.calibrate_cutoffs``; overrides ``lut_max`` and must
            have one entry per query head of the call.
    """

    degree: int = 3
    lut_max: int = 8
    coeffs: tuple[float, ...] | None = None
    pieces: int = 1
    lut_steps: int = 1
    head_lut_max: tuple[int, ...] | None = None

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
        for name in ("pieces", "lut_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SAS_PIECES:
                raise ValueError(f"SASConfig.{name} must be an int in [1, {MAX_SAS_PIECES}], got {value!r}")
        if self.coeffs is not None and (self.pieces, self.lut_steps) != (1, 1):
            raise ValueError("SASConfig.coeffs sets the single polynomial; with pieces or lut_steps "
                             "> 1 the pieces are fitted (leave coeffs None)")
        if self.head_lut_max is not None:
            cut = self.head_lut_max
            if not isinstance(cut, tuple) or not cut or \
                    not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 64 for t in cut):
                raise ValueError(f"SASConfig.head_lut_max must be a non-empty tuple of ints in "
                                 f"[0, 64] (one per query head), got {cut!r}")

    @property
    def is_single_cubic(self) -> bool:
        """The form the fused kernels read: one polynomial, the unit LUT, one cut-off."""
        return self.pieces == 1 and self.lut_steps == 1 and self.head_lut_max is None

    def kernel_blocker(self) -> str | None:
        if self.pieces > 1 or self.lut_steps > 1:
            return f"piecewise SAS exponent (pieces={self.pieces}, lut_steps={self.lut_steps})"
        if self.head_lut_max is not None:
            return "per-head SAS cut-offs"
        return None


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
        top_p: adaptive sparsity: keep per query the smallest set of keys that holds at least
            this fraction of the softmax mass (ties at the boundary kept); ``None`` keeps all.
        kernel: kernel (linear) attention instead of softmax (``FeatureMap``); O(L) time and
            memory (``turbo_core.attention.linear``). It replaces the softmax, so SAS, INT8
            and sparsity do not apply with it.
        num_features: random features of FAVOR+ (Performer's ``m``).
        redraw_every: training forwards between two draws of FAVOR+'s features (Performer
            redraws during training; ``0`` never redraws). Eval keeps the features fixed.
        low_rank: Linformer: project K and V along the sequence to ``low_rank`` rows with
            learned ``(low_rank, max_seq_len)`` matrices (``TurboAttention`` holds them), then
            attend over those rows. Not causal. The other switches apply after the projection.
        max_seq_len: the longest sequence the low-rank projections cover (Linformer's ``n``).
    """

    sas: SASConfig | None = None
    qk_int8: bool = False
    pv_int8: bool = False
    block_size: int = 64
    sparse_ratio: float | None = None
    smooth_k: bool = True
    top_p: float | None = None
    kernel: FeatureMap | None = None
    num_features: int = 256
    redraw_every: int = 1000
    low_rank: int | None = None
    max_seq_len: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"AttentionMath.block_size must be a positive int, got {self.block_size!r}")
        if self.sparse_ratio is not None and not 0.0 < self.sparse_ratio <= 1.0:
            raise ValueError(
                f"AttentionMath.sparse_ratio must be in (0, 1] or None, got {self.sparse_ratio!r}"
            )
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"AttentionMath.top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.kernel is not None:
            object.__setattr__(self, "kernel", _feature_map(self.kernel))
            others = [name for name, on in (("sas", self.sas is not None), ("qk_int8", self.qk_int8),
                                            ("pv_int8", self.pv_int8), ("sparse_ratio", self.sparse_ratio),
                                            ("top_p", self.top_p), ("low_rank", self.low_rank)) if on]
            if others:
                raise ValueError(f"AttentionMath.kernel ({self.kernel.value}) replaces the softmax; "
                                 f"{', '.join(others)} cannot apply with it")
        for name, least in (("num_features", 1), ("redraw_every", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"AttentionMath.{name} must be an int >= {least}, got {value!r}")
        if (self.low_rank is None) != (self.max_seq_len is None):
            raise ValueError("AttentionMath.low_rank and max_seq_len go together (Linformer's k and n)")
        if self.low_rank is not None:
            ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                     for v in (self.low_rank, self.max_seq_len))
            if not ok or self.low_rank > self.max_seq_len:
                raise ValueError(f"AttentionMath.low_rank must be an int in [1, max_seq_len], got "
                                 f"low_rank={self.low_rank!r}, max_seq_len={self.max_seq_len!r}")

    @property
    def is_exact(self) -> bool:
        return (
            self.sas is None and not self.qk_int8 and not self.pv_int8 and self.sparse_ratio is None
            and self.top_p is None and self.kernel is None and self.low_rank is None
        )

    @property
    def structural(self) -> bool:
        """Kernel or low-rank attention: a different layer, trained as itself."""
        return self.kernel is not None or self.low_rank is not None

    def kernel_blocker(self) -> str | None:
        """Why the fused softmax kernels (C++, Triton) cannot apply this math, or ``None``."""
        if self.sparse_ratio is not None:
            return "top-k sparsity"
        if self.top_p is not None:
            return "top-p sparsity"
        if self.kernel is not None:
            return f"kernel attention ({self.kernel.value})"
        if self.low_rank is not None:
            return "low-rank (Linformer) projections"
        return self.sas.kernel_blocker() if self.sas is not None else None


def _feature_map(value: object) -> FeatureMap:
    try:
        return FeatureMap(value)
    except ValueError:
        raise ValueError(f"AttentionMath.kernel {value!r}: use one of "
                         f"{[m.value for m in FeatureMap]}") from None


EXACT = AttentionMath()


@dataclass(frozen=True)
class KVQuantConfig:
    """Layout of the progressively quantized KV cache (docs/design.md §1.2, stage 2) and its accuracy
    levers. The levers are all off by default: a config with only the sizes set is the layout
    bit plans of version 1 were made for.

    Attributes:
        chunk: tokens compressed at once; also the capacity of the INT8 recent-token buffer
            (the paper uses 64).
        k_group: tokens per K group (K is grouped per channel, along tokens); divides ``chunk``.
        v_group: channels per V group (V is grouped per token, along channels); divides head_dim.
        protect: the first-level INT8 range ``±protect`` used before INT4/INT2 compression;
            119 keeps INT4→INT8 integer decompression inside int8 without saturation.
        rotate: store K and V rotated by one orthogonal matrix per head (a Hadamard matrix
            with fixed random signs, ``R``), queries rotated alike and outputs rotated back:
            ``(qR)·(kR)ᵀ = q·kᵀ`` and ``P·(VR)·Rᵀ = P·V``, so it is exact without
            quantization, and it spreads outlier channels over all channels before they are
            quantized (QuaRot; llama.cpp's and vLLM's rotated KV caches). head_dim must be a
            power of two.
        sinks: the first ``sinks`` tokens of every sequence stay in the INT8 buffer and are
            never compressed to INT4/INT2 (attention sinks; KVQuant, IntactKV).
        int2_k_group / int2_v_group: group sizes of the heads stored in INT2 (``None``: the
            same as ``k_group`` / ``v_group``); smaller groups cost bytes and buy accuracy.
        k_channel_scale: the first-level INT8 scale of K per (chunk, head, channel) instead of
            per (chunk, head), so an outlier channel no longer takes the levels of the others
            (D float32 scales per page and head: +256 B per page of one head). The fused
            kernels read one scale per (page, head), so the reference path serves it.
        pre_rope: store K before RoPE (KVQuant): RoPE rotates channel pairs by a different
            angle at every position, which smears K's outlier channels along the tokens that
            one K group spans; the cache un-rotates incoming K with the model's RoPE and
            applies it again after decompression. The reference path serves it.
        low_rank: store ``r`` coordinates per head instead of ``head_dim`` channels: K and V
            projected on the top-``r`` directions of the calibration K / V of that (layer,
            KV head) by SVD (Palu, LoRC), quantized as usual, and reconstructed for the
            attention. The bases come from calibration (``turbo_core.hf.lowrank``) and ride on
            the bit plan; the reference path serves it. Not with ``rotate`` (the SVD basis is
            itself orthonormal) or ``pre_rope`` (the bases are of K after RoPE).
    """

    chunk: int = 64
    k_group: int = 64
    v_group: int = 64
    protect: int = 119
    rotate: bool = False
    sinks: int = 0
    int2_k_group: int | None = None
    int2_v_group: int | None = None
    k_channel_scale: bool = False
    pre_rope: bool = False
    low_rank: int | None = None

    def __post_init__(self) -> None:
        if self.low_rank is not None:
            if isinstance(self.low_rank, bool) or not isinstance(self.low_rank, int) or self.low_rank < 1:
                raise ValueError(f"KVQuantConfig.low_rank must be a positive int or None, "
                                 f"got {self.low_rank!r}")
            if self.rotate or self.pre_rope:
                raise ValueError("KVQuantConfig.low_rank stores coordinates in a calibrated "
                                 "orthonormal basis of K after RoPE: not with rotate or pre_rope")
        if self.chunk < 4 or self.chunk % 4:
            raise ValueError(f"KVQuantConfig.chunk must be a multiple of 4, got {self.chunk}")
        for name in ("k_group", "int2_k_group"):
            group = getattr(self, name)
            if group is not None and (group < 1 or self.chunk % group):
                raise ValueError(f"KVQuantConfig.{name} ({group}) must divide chunk ({self.chunk})")
        for name in ("v_group", "int2_v_group"):
            group = getattr(self, name)
            if group is not None and group < 1:
                raise ValueError(f"KVQuantConfig.{name} must be positive, got {group}")
        if not 1 <= self.protect <= 127:
            raise ValueError(f"KVQuantConfig.protect must be in [1, 127], got {self.protect}")
        for name in ("rotate", "k_channel_scale", "pre_rope"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KVQuantConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.sinks, int) or not 0 <= self.sinks <= 4096:
            raise ValueError(f"KVQuantConfig.sinks must be an int in [0, 4096], got {self.sinks!r}")

    def groups_for(self, bits: int, head_dim: int) -> tuple[int, int]:
        """``(k_group, v_group)`` of the heads stored at ``bits``."""
        k = self.int2_k_group if bits == 2 and self.int2_k_group else self.k_group
        v_name = "int2_v_group" if bits == 2 and self.int2_v_group else "v_group"
        return k, self._v_fit(v_name, head_dim)

    def check_head_dim(self, head_dim: int) -> None:
        """Refuse a head_dim this layout cannot hold (V groups, the rotation's size)."""
        if self.low_rank is not None and self.low_rank > head_dim:
            raise ValueError(f"KVQuantConfig.low_rank ({self.low_rank}) exceeds head_dim ({head_dim})")
        for bits in (2, 4):
            self.groups_for(bits, self.low_rank or head_dim)
        if self.rotate and head_dim & (head_dim - 1):
            raise ValueError(f"KVQuantConfig.rotate needs a power-of-two head_dim (a Hadamard "
                             f"matrix), got {head_dim}")

    def _v_fit(self, name: str, head_dim: int) -> int:
        group = min(getattr(self, name), head_dim)
        if head_dim % group:
            raise ValueError(f"KVQuantConfig.{name} ({getattr(self, name)}) must divide head_dim "
                             f"({head_dim})")
        return group

    def levers(self) -> dict[str, object]:
        """The accuracy levers, as bit plans and MLflow record them."""
        return {"rotate": self.rotate, "sinks": self.sinks,
                "int2_k_group": self.int2_k_group, "int2_v_group": self.int2_v_group,
                "k_channel_scale": self.k_channel_scale, "pre_rope": self.pre_rope,
                "low_rank": self.low_rank}

    def reference_only(self) -> list[str]:
        """The levers on that only the reference path reads (the fused kernels refuse them)."""
        return [name for name in ("k_channel_scale", "pre_rope", "low_rank") if getattr(self, name)]


def check_window(window: int | None) -> int | None:
    """A layer's sliding window (keys a query sees, itself included) or ``None``."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"sliding window must be a positive int or None, got {window!r}")
    return window


def check_bits(bits: int) -> int:
    if bits not in SUPPORTED_KV_BITS:
        raise ValueError(f"unsupported KV bits {bits!r}; supported: {SUPPORTED_KV_BITS}")
    return bits


# What ``TurboAttention`` applies unless told otherwise: SAS (cubic, T = 8) and INT8 Q·Kᵀ.
# INT8 P·V stays opt-in until its accuracy is validated on real models (docs/design.md §1.2).
TURBO_DEFAULT = AttentionMath(sas=SASConfig(), qk_int8=True)
