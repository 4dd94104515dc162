"""Head priority from calibration activations, and the choice of INT2 heads (docs/design.md §1.2).

For one (layer, KV head) with activations ``x (T, C)``:
    r_c = max_t x[t, c] - min_t x[t, c]            per-channel range
    gap = max_c r_c - min_c r_c,   std = std_c(r_c)  (population std)
    priority = gap * std
Heads whose channels have very uneven ranges (outlier channels) are the hardest to quantize
and keep INT4; the lowest-priority heads go to INT2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turbo_core.attention.config import Scope
from turbo_core.attention.plan import BitPlan, ModelShape, build_plan


def head_priority(x: torch.Tensor) -> torch.Tensor:
    """Priority of each head from activations.

    Args:
        x: ``(H, T, C)`` activations of ``H`` heads over ``T`` calibration tokens.

    Returns:
        float64 ``(H,)``: ``gap * std`` of the per-channel ranges.
    """
    if x.dim() != 3:
        raise ValueError(f"head_priority needs (H, T, C) activations, got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"head_priority needs at least 2 tokens, got {x.shape[1]}")
    xf = x.double()
    r = xf.amax(dim=1) - xf.amin(dim=1)  # (H, C)
    gap = r.amax(dim=-1) - r.amin(dim=-1)
    std = r.std(dim=-1, unbiased=False)
    return gap * std


def layer_priorities(
    keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value priorities for every layer.

    Args:
        keys, values: one tensor per layer, ``(H_kv, T, D)`` (batch and tokens flattened).

    Returns:
        ``(key_priority, value_priority)``, each float64 ``(layers, H_kv)``.
    """
    if len(keys) != len(values) or not keys:
        raise ValueError(f"need the same non-zero number of key and value layers, "
                         f"got {len(keys)} and {len(values)}")
    kp = torch.stack([head_priority(k) for k in keys])
    vp = torch.stack([head_priority(v) for v in values])
    return kp, vp


def combined_priority(key_priority: torch.Tensor, value_priority: torch.Tensor) -> torch.Tensor:
    """One score per head: key and value priorities, each normalised by its mean over all
    heads of the model so neither side dominates by scale, then summed."""
    def norm(p: torch.Tensor) -> torch.Tensor:
        mean = p.mean()
        return p / mean if mean > 0 else p
    return norm(key_priority) + norm(value_priority)


def int2_count(total_heads: int, *, count: int | None, fraction: float | None) -> int:
    """Resolve a head count or fraction to a number of INT2 heads, with validation."""
    if (count is None) == (fraction is None):
        raise ValueError("give exactly one of int2 count or int2 fraction")
    if count is not None:
        if not 0 <= count <= total_heads:
            raise ValueError(f"int2 count {count} outside [0, {total_heads}] heads")
        return count
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"int2 fraction {fraction} outside [0, 1]")
    return round(fraction * total_heads)


def select_int2(priority: torch.Tensor, n_int2: int, scope: Scope | str, seed: int = 0) -> torch.Tensor:
    """Mark the ``n_int2`` heads to store in INT2.

    Args:
        priority: ``(layers, H_kv)`` scores (higher = more sensitive = keep INT4).
        n_int2: how many heads in total go to INT2.
        scope: ``global`` ranks all heads together; ``per_layer`` spreads the count evenly over
            layers (remainder to the first layers) and ranks within each; ``random`` draws with
            ``seed`` (a control for the priority's value).

    Returns:
        bool ``(layers, H_kv)``, True = INT2. Ties break by lower (layer, head) index first.
    """
    scope = Scope(scope)
    n_layers, n_heads = priority.shape
    if not 0 <= n_int2 <= n_layers * n_heads:
        raise ValueError(f"cannot put {n_int2} of {n_layers * n_heads} heads in INT2")
    flat = priority.flatten().double()
    chosen = torch.zeros(n_layers * n_heads, dtype=torch.bool)
    if scope is Scope.GLOBAL:
        order = torch.argsort(flat, stable=True)
        chosen[order[:n_int2]] = True
    elif scope is Scope.RANDOM:
        gen = torch.Generator().manual_seed(seed)
        chosen[torch.randperm(flat.numel(), generator=gen)[:n_int2]] = True
    else:
        base, extra = divmod(n_int2, n_layers)  # fits: n_int2 <= n_layers * n_heads
        for layer in range(n_layers):
            take = base + (1 if layer < extra else 0)
            order = torch.argsort(priority[layer].double(), stable=True)
            chosen[layer * n_heads + order[:take]] = True
    return chosen.reshape(n_layers, n_heads)


def make_plan(
    shape: ModelShape,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    int2_count_: int | None = None,
    int2_fraction: float | None = None,
    scope: Scope | str = Scope.GLOBAL,
    source: str = "kv",
    seed: int = 0,
    default_bits: int = 4,
    calibration: dict[str, str | int | float] | None = None,
    layout: dict[str, object] | None = None,
) -> BitPlan:
    """Score every (layer, KV head) from calibration activations and build the bit plan.

    Args:
        keys, values: per layer ``(H_kv, T, D)`` activations; must match ``shape``.
        int2_count_ / int2_fraction: how many heads go to INT2 (give one).
        scope: see :func:`select_int2`.
        source: score heads by ``key``, ``value`` or both (``kv``, :func:`combined_priority`).
        default_bits: bits of the heads not chosen for INT2 (16 = float cache).
        layout: the cache levers (``KVQuantConfig.levers()``) the activations were taken for.
    """
    if len(keys) != shape.num_layers:
        raise ValueError(f"activations cover {len(keys)} layers, model {shape.describe()} "
                         f"has {shape.num_layers}")
    for i, k in enumerate(keys):
        if k.dim() != 3 or k.shape[0] != shape.num_kv_heads or k.shape[2] != shape.head_dim:
            raise ValueError(f"layer {i} key activations have shape {tuple(k.shape)}, expected "
                             f"({shape.num_kv_heads}, T, {shape.head_dim})")
    kp, vp = layer_priorities(keys, values)
    pick = {"key": kp, "value": vp, "kv": combined_priority(kp, vp)}
    if source not in pick:
        raise ValueError(f"unknown priority source {source!r}; use one of {sorted(pick)}")
    priority = pick[source]
    n2 = int2_count(priority.numel(), count=int2_count_, fraction=int2_fraction)
    mask = select_int2(priority, n2, scope, seed=seed)
    return build_plan(
        shape, priority.tolist(), mask.tolist(), scope=Scope(scope).value, default_bits=default_bits,
        key_priority=kp.tolist(), value_priority=vp.tolist(), source=source,
        seed=seed if Scope(scope) is Scope.RANDOM else None, calibration=calibration, layout=layout,
    )
