"""The bit plan: which KV heads are stored at which precision, as a versioned JSON document.

No torch import: plans are read and validated in lightweight processes (DAG tasks, the CLI).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from turbo_core.fileio import write_atomic

PLAN_SCHEMA = "turbo-attention/bit-plan"
PLAN_VERSION = 3
# version 1 predates the layout record (it loads as every lever off); version 2's layout lacks
# k_channel_scale and pre_rope (it loads with both off, which is what it was made with)
READABLE_VERSIONS = (1, 2, 3)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelShape(_Frozen):
    """What a plan is for: the model's name and attention geometry."""

    name: str = Field(min_length=1)
    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)

    def describe(self) -> str:
        return (f"{self.name!r} ({self.num_layers} layers x {self.num_kv_heads} KV heads, "
                f"head_dim {self.head_dim})")


class HeadEntry(_Frozen):
    head: int = Field(ge=0)
    bits: Literal[2, 4, 8, 16]  # 16 = float cache (no KV quantization)
    priority: float
    key_priority: float | None = None
    value_priority: float | None = None

    @field_validator("priority", "key_priority", "value_priority")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("priorities must be finite numbers")
        return v


class LayerEntry(_Frozen):
    layer: int = Field(ge=0)
    heads: list[HeadEntry]


class Selection(_Frozen):
    """How the plan was chosen (recorded for provenance, not re-applied)."""

    scope: Literal["global", "per_layer", "random", "uniform"]
    int2_heads: int = Field(ge=0)
    default_bits: Literal[2, 4, 8, 16] = 4
    source: Literal["key", "value", "kv"] = "kv"
    seed: int | None = None


class Layout(_Frozen):
    """The cache levers a plan was calibrated for (``KVQuantConfig.levers``): rotation changes
    what the head scores see, so a plan only serves a cache with the same levers. ``low_rank``
    is not recorded: heads are scored on the plain K/V either way, and its bases ride on the
    plan in memory (:meth:`BitPlan.with_bases`), so plans stay readable by older readers."""

    rotate: bool = False
    sinks: int = Field(0, ge=0)
    int2_k_group: int | None = None
    int2_v_group: int | None = None
    k_channel_scale: bool = False
    pre_rope: bool = False

    @classmethod
    def of(cls, levers: dict[str, object]) -> Layout:
        """The layout of a cache with these levers (``KVQuantConfig.levers``), the unrecorded
        ones left out."""
        return cls(**{k: v for k, v in levers.items() if k in cls.model_fields})

    def differences(self, levers: dict[str, object]) -> list[str]:
        mine = self.model_dump()
        return [f"{k}={mine[k]!r} (cache: {levers[k]!r})" for k in mine if mine[k] != levers.get(k)]


class BitPlan(_Frozen):
    """Per (layer, KV head) bits and scores. Validated on construction and on load."""

    schema_: Literal["turbo-attention/bit-plan"] = Field(PLAN_SCHEMA, alias="schema")
    version: Literal[3] = PLAN_VERSION
    model: ModelShape
    selection: Selection
    layout: Layout = Field(default_factory=Layout)
    calibration: dict[str, str | int | float] = Field(default_factory=dict)
    layers: list[LayerEntry]
    # per layer (U_K, U_V) of a low-rank cache (KVQuantConfig.low_rank): calibration output
    # that travels with the plan in memory, not in its JSON (see with_bases)
    _bases: list | None = PrivateAttr(default=None)

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    def with_bases(self, bases: list) -> BitPlan:
        """A copy that carries per-layer low-rank bases ``[(U_K, U_V), ...]`` for the cache
        (not saved with :meth:`save`: the lever is measured in the ablation, not shipped)."""
        if len(bases) != self.model.num_layers:
            raise ValueError(f"{len(bases)} low-rank bases for {self.model.num_layers} layers")
        plan = self.model_copy()
        plan._bases = list(bases)
        return plan

    @property
    def low_rank_bases(self) -> list | None:
        return self._bases

    @model_validator(mode="after")
    def _consistent(self) -> BitPlan:
        m = self.model
        if len(self.layers) != m.num_layers:
            raise ValueError(f"plan lists {len(self.layers)} layers but model {m.describe()} "
                             f"has {m.num_layers}")
        _in_order([layer.layer for layer in self.layers], "layer entries")
        for i, layer in enumerate(self.layers):
            if len(layer.heads) != m.num_kv_heads:
                raise ValueError(f"layer {i} lists {len(layer.heads)} heads, model has "
                                 f"{m.num_kv_heads} KV heads")
            _in_order([head.head for head in layer.heads], f"layer {i}: head entries")
        n2 = sum(h.bits == 2 for layer in self.layers for h in layer.heads)
        if n2 != self.selection.int2_heads:
            raise ValueError(f"selection says {self.selection.int2_heads} INT2 heads but the "
                             f"layers mark {n2}")
        return self

    # -- queries ---------------------------------------------------------------------------
    def bits(self, layer: int) -> list[int]:
        return [h.bits for h in self.layers[layer].heads]

    def bits_grid(self) -> list[list[int]]:
        return [self.bits(i) for i in range(len(self.layers))]

    def int2_fraction(self) -> float:
        return self.selection.int2_heads / (self.model.num_layers * self.model.num_kv_heads)

    def check_layout(self, levers: dict[str, object]) -> None:
        """Raise ``ValueError`` unless this plan was made for a cache with these levers."""
        diff = self.layout.differences(levers)
        if diff:
            raise ValueError(f"bit plan was calibrated for a different cache layout: "
                             f"{'; '.join(diff)}; calibrate a plan for this variant")

    def check_compatible(self, shape: ModelShape) -> None:
        """Raise ``ValueError`` unless this plan was made for a model of ``shape``."""
        mine = self.model
        same_geometry = (mine.num_layers, mine.num_kv_heads, mine.head_dim) == (
            shape.num_layers, shape.num_kv_heads, shape.head_dim)
        if mine.name != shape.name or not same_geometry:
            raise ValueError(f"bit plan is for model {mine.describe()}, not for {shape.describe()}")

    # -- I/O ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temp file + rename): a crash never leaves a half-written plan."""
        return write_atomic(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BitPlan:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"bit plan file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"bit plan {path} is not valid JSON: {exc}") from None
        return cls.parse(raw, origin=str(path))

    @classmethod
    def parse(cls, raw: object, origin: str = "<data>") -> BitPlan:
        if isinstance(raw, dict) and raw.get("schema") not in (None, PLAN_SCHEMA):
            raise ValueError(f"{origin} is not a bit plan (schema {raw.get('schema')!r}, "
                             f"expected {PLAN_SCHEMA!r})")
        if isinstance(raw, dict) and raw.get("version") not in (None, *READABLE_VERSIONS):
            raise ValueError(f"{origin}: unsupported bit plan version {raw.get('version')!r}; "
                             f"this code reads versions {', '.join(map(str, READABLE_VERSIONS))}")
        if isinstance(raw, dict) and raw.get("version") == 1:
            if "layout" in raw:
                raise ValueError(f"{origin}: a version 1 bit plan has no 'layout' (added in version 2)")
            raw = {**raw, "version": PLAN_VERSION}  # version 1 = every lever off, the default layout
        if isinstance(raw, dict) and raw.get("version") == 2:
            extra = sorted(set(raw.get("layout") or {}) & {"k_channel_scale", "pre_rope"})
            if extra:
                raise ValueError(f"{origin}: a version 2 bit plan has no {', '.join(extra)} in its "
                                 f"layout (added in version 3)")
            raw = {**raw, "version": PLAN_VERSION}
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(f"invalid bit plan {origin}: {exc}") from None


def build_plan(
    shape: ModelShape,
    priority: list[list[float]],
    int2_mask: list[list[bool]],
    *,
    scope: str,
    default_bits: int = 4,
    key_priority: list[list[float]] | None = None,
    value_priority: list[list[float]] | None = None,
    source: str = "kv",
    seed: int | None = None,
    calibration: dict[str, str | int | float] | None = None,
    layout: dict[str, object] | None = None,
) -> BitPlan:
    """Assemble and validate a plan from per-(layer, head) scores and the INT2 choice."""
    layers = []
    for li, (prow, mrow) in enumerate(zip(priority, int2_mask, strict=True)):
        heads = [
            HeadEntry(
                head=hi,
                bits=2 if m else default_bits,
                priority=float(p),
                key_priority=None if key_priority is None else float(key_priority[li][hi]),
                value_priority=None if value_priority is None else float(value_priority[li][hi]),
            )
            for hi, (p, m) in enumerate(zip(prow, mrow, strict=True))
        ]
        layers.append(LayerEntry(layer=li, heads=heads))
    n2 = sum(h.bits == 2 for layer in layers for h in layer.heads)
    return BitPlan(
        model=shape,
        selection=Selection(scope=scope, int2_heads=n2, default_bits=default_bits,
                            source=source, seed=seed),
        calibration=calibration or {},
        layout=Layout.of(layout or {}),
        layers=layers,
    )


def _in_order(numbers: list[int], what: str) -> None:
    for i, n in enumerate(numbers):
        if n != i:
            raise ValueError(f"{what} must be in order 0..{len(numbers) - 1}; entry {i} says {n}")
