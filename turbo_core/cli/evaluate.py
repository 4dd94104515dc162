"""``turbo evaluate``: perplexity, agreement, KV bytes and speed of a variant vs the baseline."""

from __future__ import annotations

import argparse
import sys

from turbo_core.cli.common import add_variant_args, run_context, variant_for, write_json


def plan_for(args: argparse.Namespace, lm, variant):
    """The bit plan from ``--plan``, else calibrated here when the variant needs one."""
    from turbo_core.attention.plan import BitPlan
    from turbo_core.hf import calibrate

    if args.plan:
        if getattr(args, "int2_scope", None) or getattr(args, "int2_fraction", None) is not None:
            raise ValueError("--plan fixes the INT2 heads; do not combine it with --int2-scope "
                             "or --int2-fraction")
        plan = BitPlan.load(args.plan)
        plan.check_compatible(lm.shape)
        return plan
    if variant.needs_calibration:
        print(f"no --plan given: calibrating {variant.name} ({variant.scope.value})", file=sys.stderr)
        return calibrate.calibrate(lm, variant, text_path=args.text, seed=args.seed)
    return None


def _evaluate(args: argparse.Namespace) -> int:
    from turbo_core.hf import data, evaluate, models

    variant = variant_for(args)
    settings = evaluate.EvalSettings(max_tokens=args.max_tokens, window=args.window)
    split = data.load_split(args.text)
    lm = models.load(args.model)
    plan = plan_for(args, lm, variant)
    if args.no_track:
        result = evaluate.evaluate(lm, variant, split, plan=plan, settings=settings)
    else:
        from turbo_core.pipeline import stages

        outcome = stages.evaluate_variant(lm, variant, plan=plan, base_model=args.model,
                                          settings=settings, text=args.text, ctx=run_context(args))
        result = outcome.result | {"mlflow_run_id": outcome.run_id,
                                   "gate_passed": outcome.decision.passed,
                                   "gate_reasons": list(outcome.decision.reasons),
                                   "model_version": outcome.version}
        verdict = "passed" if outcome.decision.passed else "FAILED: " + "; ".join(outcome.decision.reasons)
        print(f"gates {verdict} (MLflow run {outcome.run_id}"
              f"{', registered version ' + outcome.version if outcome.version else ''})",
              file=sys.stderr)
    if args.peer:
        bits = variant.kv_bits if variant.kv_bits in (2, 4) else 4
        result["peer"] = evaluate.evaluate_peer(lm, args.peer, bits, split, settings=settings)
    _print_result(result)
    if args.json:
        write_json(args.json, result)
    return 0


def _print_result(result: dict) -> None:
    from tabulate import tabulate

    keys = ["ppl_baseline", "ppl_variant", "ppl_delta_pct", "top1_agreement", "kv_bytes_per_token",
            "kv_compression", "sas_zero_fraction", "prefill_tokens_per_s", "decode_tokens_per_s"]
    rows = [result] + ([result["peer"]] if "peer" in result else [])
    print(tabulate([[r["variant"]] + [r[k] for k in keys] for r in rows],
                   headers=["variant", *keys], floatfmt=".4g"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="perplexity, agreement, KV bytes and speed vs baseline")
    add_variant_args(e)
    e.add_argument("--plan", help="bit plan JSON from `turbo calibrate` (else calibrated here)")
    e.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    e.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    e.add_argument("--peer", choices=["quanto", "hqq"],
                   help="also run transformers' quantized KV cache at the same bits")
    e.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    e.set_defaults(func=_evaluate)
