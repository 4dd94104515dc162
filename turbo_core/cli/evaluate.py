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
    settings = settings_from(args)
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
        if not args.no_track:
            from turbo_core.pipeline import stages

            result["peer"]["mlflow_run_id"] = stages.log_peer(lm, result["peer"],
                                                             ctx=run_context(args))
    _print_result(result)
    if args.json:
        write_json(args.json, result)
    return 0


def _print_result(result: dict) -> None:
    from tabulate import tabulate

    keys = ["ppl_delta_pct", "top1_agreement", "kl_mean", "kl_p99", "kv_bytes_per_token",
            "kv_bytes_per_token_1k", "kv_bytes_per_token_8k", "kv_bytes_per_token_32k",
            "kv_compression", "prefill_speedup", "decode_speedup", "retrieval_accuracy",
            "retrieval_accuracy_baseline", "retrieval_kept", "retrieval_kept_upper"]
    rows = [result] + ([result["peer"]] if "peer" in result else [])
    print(tabulate([[r["variant"]] + [r.get(k, "") for k in keys] for r in rows],
                   headers=["variant", *keys], floatfmt=".4g"))
    r = result
    if "speed_context" not in r:  # --no-speed
        print("speed: not measured in this run")
        return
    print(f"speed at {r['speed_context']} tokens of context, batch {r['speed_batch']}, median of "
          f"{r['speed_repeats']} rounds: decode {r['decode_tokens_per_s']:.1f} vs baseline "
          f"{r['decode_tokens_per_s_baseline']:.1f} tokens/s, prefill "
          f"{r['prefill_tokens_per_s']:.0f} vs {r['prefill_tokens_per_s_baseline']:.0f} tokens/s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="perplexity, agreement, KV bytes and speed vs baseline")
    add_variant_args(e)
    e.add_argument("--plan", help="bit plan JSON from `turbo calibrate` (else calibrated here)")
    e.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    e.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    add_measure_args(e)
    e.add_argument("--peer", choices=["quanto", "hqq"],
                   help="also run transformers' quantized KV cache at the same bits")
    e.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    e.set_defaults(func=_evaluate)


def settings_from(args: argparse.Namespace):
    """EvalSettings from the arguments :func:`add_measure_args` (and --max-tokens/--window) add."""
    from turbo_core.hf import evaluate
    from turbo_core.hf.retrieval import RetrievalSettings
    from turbo_core.hf.speed import SpeedSettings

    return evaluate.EvalSettings(
        max_tokens=args.max_tokens, window=args.window,
        speed=None if getattr(args, "no_speed", False) else SpeedSettings(
            context=args.speed_context, batch=args.speed_batch, repeats=args.speed_repeats),
        retrieval=None if args.no_retrieval else RetrievalSettings(
            lengths=tuple(args.retrieval_lengths), samples=args.retrieval_samples))


def add_measure_args(p: argparse.ArgumentParser) -> None:
    """Sizes of the speed and retrieval measurements (defaults: the pipeline's)."""
    from turbo_core.hf.retrieval import RetrievalSettings
    from turbo_core.hf.speed import SpeedSettings

    sp, rt = SpeedSettings(), RetrievalSettings()
    p.add_argument("--speed-context", type=int, default=sp.context,
                   help=f"speed: tokens of context per sequence (default {sp.context})")
    p.add_argument("--speed-batch", type=int, default=sp.batch,
                   help=f"speed: sequences decoded together (default {sp.batch})")
    p.add_argument("--speed-repeats", type=int, default=sp.repeats,
                   help=f"speed: rounds, medians reported (default {sp.repeats})")
    p.add_argument("--retrieval-lengths", type=int, nargs="+", default=list(rt.lengths),
                   help=f"retrieval prompt lengths in tokens (default {list(rt.lengths)})")
    p.add_argument("--retrieval-samples", type=int, default=rt.samples,
                   help=f"retrieval prompts per task and length (default {rt.samples})")
    p.add_argument("--no-retrieval", action="store_true", help="skip the retrieval tasks")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
