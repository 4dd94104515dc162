"""Named, frozen TurboAttention variants (docs/design.md §1.4): one registry, validated, listable.

A variant fixes the attention math and the KV-cache precision. Torch-free: DAGs and the CLI
list and validate variants without loading torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from turbo_core.attention.config import (
    EXACT,
    TURBO_DEFAULT,
    AttentionMath,
    KVQuantConfig,
    SASConfig,
    Scope,
    check_bits,
)


@dataclass(frozen=True)
class Variant:
    """One deployable configuration.

    Attributes:
        name: registry key (also the MLflow / image tag component).
        description: one line for listings.
        math: attention approximations (SAS, INT8 Q·Kᵀ, ...).
        kv_bits: KV-cache precision of ordinary heads: ``None`` keeps the model's float cache,
            8 = INT8 only, 4 / 2 = progressive INT8 → INT4 / INT2.
        int2_fraction: share of (layer, KV head) pairs stored in INT2 (``kv_bits`` must be 4);
            chosen by head priority from calibration.
        scope: how INT2 heads are ranked (global across layers, per layer, or random).
        kv: chunk and group sizes of the quantized cache.
    """

    name: str
    description: str
    math: AttentionMath = EXACT
    kv_bits: int | None = None
    int2_fraction: float = 0.0
    scope: Scope = Scope.GLOBAL
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"variant name {self.name!r} must be non-empty [A-Za-z0-9._-]")
        if self.kv_bits is not None:
            check_bits(self.kv_bits)
        if not 0.0 <= self.int2_fraction <= 1.0:
            raise ValueError(f"variant {self.name}: int2_fraction {self.int2_fraction} outside [0, 1]")
        if self.int2_fraction > 0 and self.kv_bits != 4:
            raise ValueError(f"variant {self.name}: int2_fraction needs kv_bits=4 (mixed INT4/INT2)")
        if self.kv_bits is not None and self.math.qk_int8 and self.math.smooth_k:
            raise ValueError(f"variant {self.name}: smooth_k subtracts K's mean over the keys before "
                             f"INT8 Q·Kᵀ, but a quantized KV cache stores K at INT8 as it arrives, "
                             f"before that mean exists, so it would not apply; set smooth_k=False")
        if self.math.structural:
            raise ValueError(f"variant {self.name}: kernel and low-rank (Linformer) attention are "
                             f"layers of their own, trained as such (TurboAttention); a pretrained "
                             f"LLM's attention cannot be swapped for them")
        object.__setattr__(self, "scope", Scope(self.scope))

    @property
    def quantized_cache(self) -> bool:
        return self.kv_bits is not None

    @property
    def needs_calibration(self) -> bool:
        return self.int2_fraction > 0

    def params(self) -> dict[str, object]:
        """Flat, JSON/MLflow-friendly description of every setting."""
        m = self.math
        sas = m.sas
        return {
            "variant": self.name,
            "description": self.description,
            "sas": sas is not None,
            "sas_degree": sas.degree if sas else None,
            "sas_lut_max": sas.lut_max if sas else None,
            "sas_coeffs": list(sas.coeffs) if sas and sas.coeffs else None,
            "sas_pieces": sas.pieces if sas else None,
            "sas_lut_steps": sas.lut_steps if sas else None,
            "sas_head_lut_max": list(sas.head_lut_max) if sas and sas.head_lut_max else None,
            "top_p": m.top_p,
            "qk_int8": m.qk_int8,
            "pv_int8": m.pv_int8,
            "smooth_k": m.smooth_k,
            "block_size": m.block_size,
            "sparse_ratio": m.sparse_ratio,
            "kv_bits": self.kv_bits,
            "int2_fraction": self.int2_fraction,
            "int2_scope": self.scope.value,
            "kv_chunk": self.kv.chunk,
            "kv_k_group": self.kv.k_group,
            "kv_v_group": self.kv.v_group,
            "kv_protect": self.kv.protect,
            **{f"kv_{k}": v for k, v in self.kv.levers().items()},
        }

    @classmethod
    def from_params(cls, p: dict[str, object]) -> Variant:
        """The variant that :meth:`params` described (what a registered version logged), so a
        version loads as it was registered whatever today's registry holds. Settings that older
        versions did not log take their defaults then; their ``smooth_k`` never applied over a
        quantized cache, so it is off for those."""
        sas = None
        if p["sas"]:
            coeffs = p.get("sas_coeffs")
            cut = p.get("sas_head_lut_max")
            sas = SASConfig(degree=p["sas_degree"], lut_max=p["sas_lut_max"],
                            coeffs=tuple(coeffs) if coeffs else None,
                            pieces=p.get("sas_pieces") or 1, lut_steps=p.get("sas_lut_steps") or 1,
                            head_lut_max=tuple(cut) if cut else None)
        cached = p["kv_bits"] is not None
        math = AttentionMath(sas=sas, qk_int8=p["qk_int8"], pv_int8=p["pv_int8"],
                             block_size=p["block_size"], sparse_ratio=p["sparse_ratio"],
                             top_p=p.get("top_p"),
                             smooth_k=bool(p.get("smooth_k", True)) and not cached)
        levers = {k: p[f"kv_{k}"] for k in KVQuantConfig().levers() if f"kv_{k}" in p}
        kv = KVQuantConfig(chunk=p["kv_chunk"], k_group=p["kv_k_group"], v_group=p["kv_v_group"],
                           protect=p.get("kv_protect", KVQuantConfig.protect), **levers)
        return cls(name=p["variant"], description=p.get("description", ""), math=math,
                   kv_bits=p["kv_bits"], int2_fraction=p["int2_fraction"], scope=p["int2_scope"],
                   kv=kv)

    def with_overrides(self, **changes: object) -> Variant:
        return dataclasses.replace(self, **changes)


_SAS_ONLY = AttentionMath(sas=SASConfig())
# Over a quantized cache K reaches the attention already INT8 (per token in the buffer, per
# chunk in the pages), so K's mean cannot be taken out first: no smoothing (Variant refuses it).
_CACHED = dataclasses.replace(TURBO_DEFAULT, smooth_k=False)
_LEVERS = KVQuantConfig(rotate=True, sinks=16)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp16", "baseline: exact attention, float KV cache"),
        Variant("sas", "SAS softmax (LUT + cubic, T=8), float KV cache", math=_SAS_ONLY),
        Variant("int8", "SAS + INT8 Q·Kᵀ, INT8 KV cache", math=_CACHED, kv_bits=8),
        # the levers from the ablation (README "Accuracy levers"): rotation and 16 INT8 sinks
        Variant("turbo-int4", "SAS + INT8 Q·Kᵀ, INT4 KV cache (INT8 buffer of 64), rotated, 16 sinks",
                math=_CACHED, kv_bits=4, kv=_LEVERS),
        # 55 % INT2 (50 of SmolLM2's 90 KV heads) in groups of 32: with the sinks' shifted grid
        # the smallest share that clears 4.4x at 1024 tokens (+0.70 % ppl; 50 % in groups of
        # 64 measured +1.16 %); global priority on the plain K/V.
        Variant("turbo-mix", "turbo-int4 with the lowest-priority 55% of KV heads in INT2 (groups of 32)",
                math=_CACHED, kv_bits=4, int2_fraction=0.55,
                kv=dataclasses.replace(_LEVERS, int2_k_group=32, int2_v_group=32)),
        Variant("turbo-int2", "SAS + INT8 Q·Kᵀ, INT2 KV cache on every head, rotated, 16 sinks",
                math=_CACHED, kv_bits=2, kv=_LEVERS),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}") from None
