"""``turbo bench model``: every variant on the real model, the transformers peer at equal bits,
and the head-priority control (random INT2 heads), as one JSON + Markdown report."""

from __future__ import annotations

import sys
from pathlib import Path

from tabulate import tabulate

from turbo_core.attention.variants import VARIANTS, get_variant
from turbo_core.bench.common import describe_device
from turbo_core.hf import calibrate, data, evaluate, models

COLUMNS = [
    ("variant", "contender", "{}"),
    ("int2_scope", "INT2 choice", "{}"),
    ("ppl_variant", "ppl", "{:.3f}"),
    ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
    ("kv_bytes_per_token", "KV B/token", "{:.0f}"),
    ("kv_bytes_per_token_1k", "B/token 1k", "{:.0f}"),
    ("kv_bytes_per_token_8k", "8k", "{:.0f}"),
    ("kv_bytes_per_token_32k", "32k", "{:.0f}"),
    ("kv_compression", "KV vs fp16", "{:.2f}x"),
    ("kv_compression_ragged", "KV vs fp16 at w−c/2", "{:.2f}x"),
    ("kl_mean", "KL mean", "{:.4f}"),
    ("kl_p99", "KL p99", "{:.3f}"),
    ("sas_zero_fraction", "SAS zeros", "{:.1%}"),
    ("prefill_speedup", "prefill x", "{:.2f}"),
    ("decode_speedup", "decode x", "{:.2f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("retrieval_accuracy", "recall", "{:.2f}"),
    ("retrieval_kept", "recall kept", "{:.2f}"),
]


def run(
    model: str | None = None,
    variants: list[str] | None = None,
    peers: list[str] | None = None,
    random_seeds: int = 2,
    settings: evaluate.EvalSettings | None = None,
    text: str | None = None,
) -> dict:
    settings = settings or evaluate.EvalSettings()
    names = variants or list(VARIANTS)
    for n in names:
        get_variant(n)
    lm = models.load(model)
    split = data.load_split(text)
    rows = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for name in names:
        variant = get_variant(name)
        plan = calibrate.calibrate(lm, variant) if variant.needs_calibration else None
        rows.append(evaluate.evaluate(lm, variant, split, plan=plan, settings=settings))
        log(f"{name}: Δppl {rows[-1]['ppl_delta_pct']:+.2f} %, KV {rows[-1]['kv_compression']:.2f}x")
        if variant.needs_calibration:
            for scope in ["per_layer"] + ["random"] * random_seeds:
                seed = sum(r.get("int2_scope") == "random" for r in rows) if scope == "random" else 0
                control = variant.with_overrides(scope=scope)
                plan = calibrate.calibrate(lm, control, seed=seed)
                row = evaluate.evaluate(lm, control, split, plan=plan, settings=settings)
                row["seed"] = seed
                rows.append(row)
                log(f"{name} ({scope}, seed {seed}): Δppl {row['ppl_delta_pct']:+.2f} %")
    for backend in peers or []:
        for bits in (4, 2):
            rows.append(evaluate.evaluate_peer(lm, backend, bits, split, settings=settings))
            log(f"{rows[-1]['variant']}: Δppl {rows[-1]['ppl_delta_pct']:+.2f} %")
    return {
        "benchmark": "model",
        "model": lm.name,
        "weights_sha256": lm.weights_sha256,
        "data_source": split.source,
        "data_sha256": split.sha256,
        "settings": rows[0]["settings"] if rows else None,
        "device": describe_device(lm.model.device),
        "results": rows,
    }


def table(doc: dict, fmt: str = "simple") -> str:
    body = [[spec.format(r.get(key)) if r.get(key) is not None else "" for key, _, spec in COLUMNS]
            for r in doc["results"]]
    s = doc["settings"] or {}
    head = (f"{doc['model']} on {doc['data_source']} ({s.get('max_tokens')} held-out tokens, "
            f"windows of {s.get('window')}; KV bytes at {s.get('window')} tokens of context, "
            f"and per token of one sequence at 1k / 8k / 32k from the cache layout), "
            f"baseline ppl {doc['results'][0]['ppl_baseline']:.3f}, device {doc['device']['type']}")
    sp, rt = s.get("speed"), s.get("retrieval")
    head += ("\n\nSpeed: not measured in this run." if not sp else
             f"\n\nSpeed-ups: over the float engine in the same process, {sp.get('context')} "
             f"tokens of context, decode batch {sp.get('batch')}, median of {sp.get('repeats')} "
             "alternating rounds.")
    if rt:
        base = doc["results"][0].get("retrieval_accuracy_baseline")
        head += (f" Recall: passkey + multi-key needle at {', '.join(map(str, rt['lengths']))} "
                 f"tokens, {rt['samples']} prompts per task and length, greedy exact match; the "
                 f"float baseline recalls {base:.2f}; 'kept' = share of its correct answers the "
                 "contender also gets.")
    return head + "\n\n" + tabulate(body, headers=[h for _, h, _ in COLUMNS], tablefmt=fmt,
                                    disable_numparse=True)


def plots(doc: dict, out_dir: str | Path) -> list[Path]:
    """Accuracy and speed against KV bytes per token, one point per contender (green when it
    passes the pipeline's default gates)."""
    from turbo_core.pipeline.params import default_gates
    from turbo_core.tracking import plots as png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from turbo_core.hf.retrieval import kept

    gates = default_gates()
    # a report from before the recall gate read its confidence bound: the bound from its samples
    doc = doc | {"results": [r | kept(r["retrieval"]["baseline"], r["retrieval"]["variant"])
                             if "retrieval_kept_upper" not in r and "retrieval" in r else r
                             for r in doc["results"]]}
    rows = [r | {"variant": r["variant"] + (f" ({r['int2_scope']})" if r.get("int2_scope") not in
                                            (None, "global") else ""),
                 "gate_passed": gates.evaluate(r).passed} for r in doc["results"]]
    name = doc["model"].lower()
    return [png.accuracy_vs_bytes(rows, out / f"model-{name}-accuracy.png",
                                  title=f"{doc['model']}: perplexity vs KV memory"),
            png.speed_vs_bytes(rows, out / f"model-{name}-speed.png",
                               title=f"{doc['model']}: speed vs KV memory")]
