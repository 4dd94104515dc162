"""``turbo bench model --ablation``: each accuracy lever of the packed cache on and off on top
of the INT4 and mixed variants, all levers together, and transformers' quantized caches, in
one table (perplexity, KL, top-1, recall, measured KV bytes per token).

A lever is a change of :class:`~turbo_core.attention.config.KVQuantConfig`. By default every
row starts from its base variant with every lever off (the layout bit plans of version 1 were
made for), so the rows of one base differ in the levers only; ``start="defaults"`` instead adds
each lever alone to the variant as shipped (the question a new lever answers: is it worth
adding?). Mixed rows calibrate their own plan.
"""

from __future__ import annotations

import dataclasses
import sys

from tabulate import tabulate

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.variants import Variant, get_variant
from turbo_core.bench.common import describe_device
from turbo_core.hf import calibrate, data, evaluate, lowrank, models

# the levers, as the settings each turns on; one number per lever (docs/design.md §5: measure)
LEVERS: dict[str, dict[str, object]] = {
    "rotate": {"rotate": True},
    "sinks": {"sinks": 16},
    "int2-groups-32": {"int2_k_group": 32, "int2_v_group": 32},
    "k-channel-scale": {"k_channel_scale": True},
    "pre-rope": {"pre_rope": True},
    # the calibrated low-rank cache (KVQuantConfig.low_rank): r of SmolLM2's 64 channels
    "low-rank-48": {"low_rank": 48},
    "low-rank-32": {"low_rank": 32},
}
# levers that exclude others (low_rank: not with rotate or pre_rope) stay out of "all together"
ALONE = ("low-rank-48", "low-rank-32")
STARTS = ("off", "defaults")
BASES = ("turbo-int4", "turbo-mix")

COLUMNS = [
    ("variant", "base", "{}"),
    ("levers", "levers", "{}"),
    ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
    ("kl_mean", "KL mean", "{:.4f}"),
    ("kl_p99", "KL p99", "{:.3f}"),
    ("kv_bytes_per_token", "KV B/token", "{:.0f}"),
    ("kv_compression", "KV vs fp16", "{:.2f}x"),
    ("retrieval_accuracy", "recall", "{:.2f}"),
    ("retrieval_kept", "recall kept", "{:.2f}"),
]


def levers_off(variant: Variant) -> Variant:
    """``variant`` with every lever off (its chunk and group sizes kept)."""
    return variant.with_overrides(kv=dataclasses.replace(variant.kv, **KVQuantConfig().levers()))


def configurations(base: Variant, levers: list[str] | None = None, start: str = "off",
                   exact_qk: bool = False) -> list[tuple[str, Variant]]:
    """``(levers label, variant)``. From ``"off"``: none, each lever that applies alone, then all
    of them. From ``"defaults"``: the variant as shipped, then each lever that applies and is
    not on already, added alone. ``exact_qk`` (a diagnostic) turns INT8 Q·Kᵀ off in every row,
    so the rows differ in what the cache stores only (the reference path, which serves the
    reference-only levers, re-quantizes float K per block for INT8 Q·Kᵀ where the kernels
    read the stored INT8 codes)."""
    unknown = sorted(set(levers or ()) - set(LEVERS))
    if unknown or start not in STARTS:
        raise ValueError(f"unknown levers {unknown} (known: {', '.join(LEVERS)}) or start "
                         f"{start!r} (known: {', '.join(STARTS)})")
    origin = levers_off(base) if start == "off" else base
    if exact_qk:
        origin = origin.with_overrides(math=dataclasses.replace(origin.math, qk_int8=False))
    on = origin.kv.levers()
    applicable = [n for n in (levers or LEVERS)
                  if not (n.startswith("int2") and not base.needs_calibration and base.kv_bits != 2)
                  and not (n in ALONE and (on["rotate"] or on["pre_rope"]))  # low_rank excludes them
                  and any(on[k] != v for k, v in LEVERS[n].items())]
    combos = [[]] + [[n] for n in applicable]
    together = [n for n in applicable if n not in ALONE]
    if start == "off" and len(together) > 1:
        combos.append(together)
    out = []
    for combo in combos:
        changes: dict[str, object] = {}
        for n in combo:
            changes |= LEVERS[n]
        label = "+".join(([] if start == "off" else ["defaults"]) + combo) or "none"
        name = ".".join([base.name, *combo, *(["exact-qk"] if exact_qk else [])])
        out.append((label, origin.with_overrides(name=name,
                                                 kv=dataclasses.replace(origin.kv, **changes))))
    return out


def run(model: str | None = None, bases: list[str] | None = None, peers: list[str] | None = None,
        settings: evaluate.EvalSettings | None = None, text: str | None = None,
        levers: list[str] | None = None, start: str = "off", exact_qk: bool = False) -> dict:
    settings = settings or evaluate.EvalSettings()
    chosen = [get_variant(n) for n in (bases or BASES)]
    for base in chosen:
        configurations(base, levers, start, exact_qk)  # refuse unknown levers before loading
    lm = models.load(model)
    split = data.load_split(text)
    rows = []
    for base in chosen:
        for label, variant in configurations(base, levers, start, exact_qk):
            plan = calibrate.calibrate(lm, variant) if variant.needs_calibration else None
            extra = {}
            if variant.kv.low_rank is not None:  # the bases ride on a plan (uniform bits if none)
                plan = plan or calibrate.calibrate(lm, variant, progress=False)
                bases, extra["low_rank"] = lowrank.calibrate_bases(lm, variant.kv.low_rank,
                                                                   text_path=text, progress=False)
                plan = plan.with_bases(bases)
            row = evaluate.evaluate(lm, variant, split, plan=plan, settings=settings)
            row |= {"variant": base.name, "levers": label, "kv": variant.kv.levers(), **extra}
            rows.append(row)
            print(f"{base.name} [{label}]: Δppl {row['ppl_delta_pct']:+.2f} %, top-1 "
                  f"{row['top1_agreement']:.3f}, KV {row['kv_compression']:.2f}x",
                  file=sys.stderr, flush=True)
    for backend in peers or []:
        for bits in (4, 2):
            row = evaluate.evaluate_peer(lm, backend, bits, split, settings=settings)
            rows.append(row | {"levers": ""})
    return {
        "benchmark": "ablation",
        "model": lm.name,
        "weights_sha256": lm.weights_sha256,
        "data_source": split.source,
        "data_sha256": split.sha256,
        "levers": {n: LEVERS[n] for n in (levers or LEVERS)},
        "start": start,
        "exact_qk": exact_qk,
        "settings": rows[0]["settings"] if rows else None,
        "device": describe_device(lm.model.device),
        "results": rows,
    }


def table(doc: dict, fmt: str = "simple") -> str:
    body = [[spec.format(r[key]) if r.get(key) is not None else "" for key, _, spec in COLUMNS]
            for r in doc["results"]]
    s = doc["settings"] or {}
    levers = "; ".join(f"{n} = {', '.join(f'{k}={v}' for k, v in c.items())}"
                       for n, c in doc["levers"].items())
    head = (f"{doc['model']} on {doc['data_source']} ({s.get('max_tokens')} held-out tokens, windows "
            f"of {s.get('window')}, KV bytes at {s.get('window')} tokens), device "
            f"{doc['device']['type']}. Levers: {levers}. " + (
                "Every row of a base adds one lever to the variant as shipped."
                if doc.get("start") == "defaults" else
                "Every row of a base starts from it with every lever off.")) + (
                " Diagnostic: INT8 Q·Kᵀ off in every row (the cache's storage alone)."
                if doc.get("exact_qk") else "")
    return head + "\n\n" + tabulate(body, headers=[h for _, h, _ in COLUMNS], tablefmt=fmt,
                                    disable_numparse=True)
