"""``turbo bench attention | sas | train | kernels | decode | model | agreement | serve | load``: benchmarks
that print a table and write JSON (and Markdown where asked)."""

from __future__ import annotations

import argparse
import sys

from turbo_core.cli.common import write_json, write_markdown
from turbo_core.cli.evaluate import add_measure_args


def _emit(args: argparse.Namespace, doc: dict, title: str, table) -> None:
    """Print ``table(doc)``; write the JSON and the Markdown table where asked."""
    print(table(doc))
    if args.json:
        write_json(args.json, doc)
    if getattr(args, "markdown", None):
        write_markdown(args.markdown, title, table(doc, "github"))


def _bench_attention(args: argparse.Namespace) -> int:
    import torch

    from turbo_core.bench import attention

    if args.quick and args.long:
        raise ValueError("--quick and --long exclude each other")
    preset = "quick" if args.quick else "long" if args.long else "article"
    shape = attention.PRESETS[preset]
    overrides = {k: getattr(args, k) for k in ("batch", "seq", "embed", "heads")
                 if getattr(args, k) is not None}
    if overrides:
        shape = attention.Shape(**(shape.__dict__ | overrides))
    repeats = args.repeats if args.repeats is not None else (10 if args.quick else 5)
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("turbo bench attention: --device cuda but no CUDA device is available")
    doc = attention.run(shape, repeats=repeats, warmup=args.warmup, causal=args.causal,
                        device=args.device, dtype=dtypes[args.dtype], cases=args.case)
    doc["mode"] = preset
    if args.crossover:
        lengths = [int(n) for n in args.crossover.split(",")]
        if not lengths or min(lengths) < 1:
            raise ValueError(f"--crossover takes positive lengths like 256,512,1024; got {args.crossover!r}")
        doc["crossover"] = attention.crossover(shape, lengths, repeats=repeats, warmup=args.warmup,
                                               device=args.device, dtype=dtypes[args.dtype])
    _emit(args, doc, "Attention benchmark", attention.table)
    return 0


def _bench_sas(args: argparse.Namespace) -> int:
    from turbo_core.bench import sas_forms

    _emit(args, sas_forms.run(), "SAS exponent forms", sas_forms.table)
    return 0


def _bench_train(args: argparse.Namespace) -> int:
    from turbo_core.bench import train

    setup = train.TrainSetup(steps=30, batch=8, seq=64, eval_batches=2) if args.quick else train.TrainSetup()
    if args.steps is not None:
        setup = train.TrainSetup(**(setup.__dict__ | {"steps": args.steps}))
    doc = train.run(setup, args.text, log=lambda m: print(m, file=sys.stderr, flush=True))
    _emit(args, doc, "Training with each attention option", train.table)
    if args.png:
        print(f"wrote {train.plot(doc, args.png)}", file=sys.stderr)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from turbo_core.bench import kernels

    doc = kernels.run(repeats=args.repeats)
    _emit(args, doc, "Kernel benchmark", kernels.tables)
    return 0


def _bench_decode(args: argparse.Namespace) -> int:
    import torch

    from turbo_core.bench import decode

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("turbo bench decode: --device cuda but no CUDA device is available")
    if args.no_e2e and args.e2e_only:
        raise ValueError("--no-e2e and --e2e-only exclude each other")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    doc = ({"benchmark": "decode", "results": []} if args.e2e_only else
           decode.run(quick=args.quick, repeats=args.repeats, device=args.device, log=log))
    if args.instructions:
        if args.e2e_only:
            raise ValueError("--instructions counts the attention ops: not with --e2e-only")
        from turbo_core.bench import instructions

        doc["instructions"] = instructions.rows(log)
    if not args.no_e2e:
        from turbo_core.bench import decode_e2e

        doc["end_to_end"] = decode_e2e.run(quick=args.quick, repeats=args.repeats, model=args.model,
                                           log=log)
    if args.e2e_only:
        from turbo_core.bench.common import describe_device

        doc["device"] = describe_device(torch.device("cpu"))
        _emit(args, doc, "Decode benchmark (end to end)", lambda d, fmt="simple": decode_e2e.table(
            d["end_to_end"], fmt))
        return 0
    _emit(args, doc, "Decode benchmark", decode.table)
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    from turbo_core.bench import model
    from turbo_core.cli.evaluate import settings_from

    if args.replot:  # re-render a measured report (tables, plots); measures nothing
        import json
        from pathlib import Path

        doc = json.loads(Path(args.replot).read_text())
    else:
        settings = settings_from(args)
        variants = args.variants.split(",") if args.variants else None
        if args.ablation:
            from turbo_core.bench import ablation

            levers = args.levers.split(",") if args.levers else None
            doc = ablation.run(args.model, variants, args.peer, settings, args.text, levers,
                               start="defaults" if args.from_defaults else "off",
                               exact_qk=args.exact_qk)
        else:
            doc = model.run(args.model, variants, args.peer, args.random_seeds, settings, args.text)
    if doc.get("benchmark") == "ablation":
        from turbo_core.bench import ablation

        _emit(args, doc, "Accuracy levers (ablation)", ablation.table)
        return 0
    _emit(args, doc, "Model benchmark", model.table)
    if args.plots:
        for path in model.plots(doc, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _bench_agreement(args: argparse.Namespace) -> int:
    from turbo_core.bench import agreement

    doc = agreement.run(model=args.model, variants=tuple(args.variants.split(",")),
                        prompt=args.prompt, chunk=args.chunk, decode=args.decode, text=args.text)
    _emit(args, doc, "Engine agreement", agreement.table)
    return 0


def _bench_serve(args: argparse.Namespace) -> int:
    from turbo_core.bench import serve

    doc = serve.run(quick=args.quick, model=args.model, plan=args.plan,
                    peers=tuple(args.peer or ()), url=args.url)
    print(serve.table(doc))
    if args.json:
        write_json(args.json, doc)
    if args.markdown:
        write_markdown(args.markdown, "Serving benchmark", serve.table(doc))
    return 0 if all(r["errors"] == 0 for sc in doc["scenarios"] for r in sc["results"]) else 1


def _outputs(p: argparse.ArgumentParser) -> None:
    """The ``--json`` / ``--markdown`` pair every benchmark takes (written by :func:`_emit`)."""
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    att = bench_sub.add_parser(
        "attention", help="TurboAttention vs nn.MultiheadAttention and SDPA",
        description="Default: the article's setup (batch 32, seq 512, embed 1024, 8 heads).")
    att.add_argument("--quick", action="store_true", help="small shape (4 x 128, embed 256, 4 heads)")
    att.add_argument("--long", action="store_true",
                     help="the article's layer at L 4096 (batch 1, embed 1024, 8 heads)")
    att.add_argument("--crossover", metavar="L,L,...",
                     help="also time MHA against kernel attention at these lengths (the cross-over)")
    for name in ("batch", "seq", "embed", "heads"):
        att.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    att.add_argument("--repeats", type=int, help="timed runs per contender (default 5, quick 10)")
    att.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    att.add_argument("--causal", action="store_true", help="causal self-attention")
    att.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    att.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    att.add_argument("--case", action="append",
                     help="TurboAttention case to include (repeatable; default all)")
    _outputs(att)
    att.set_defaults(func=_bench_attention)

    sf = bench_sub.add_parser("sas", help="the SAS exponent's forms: error and operations per weight")
    _outputs(sf)
    sf.set_defaults(func=_bench_sas)

    tr = bench_sub.add_parser(
        "train", help="a ~1M-parameter causal byte LM trained with each attention option",
        description="Same seed, data and steps per option; kernel attention trains as itself, "
                    "the inference approximations are applied to the exact run's weights.")
    tr.add_argument("--quick", action="store_true", help="30 short steps (a smoke run)")
    tr.add_argument("--steps", type=int, help="optimiser steps per run (default 1200)")
    tr.add_argument("--text", help="a UTF-8 text file instead of the bundled text")
    _outputs(tr)
    tr.add_argument("--png", metavar="PATH", help="write the loss curves")
    tr.set_defaults(func=_bench_train)

    ker = bench_sub.add_parser(
        "kernels", help="Triton kernels vs SDPA fp16 (GPU; tiny interpreter smoke run on CPU)")
    ker.add_argument("--repeats", type=int, help="timed runs per case (default 10 GPU, 1 CPU)")
    _outputs(ker)
    ker.set_defaults(func=_bench_kernels)

    dec = bench_sub.add_parser(
        "decode", help="one decode step over each cache (ours, float SDPA, quanto) + end to end",
        description="Attention-layer decode step at SmolLM2 (9/3/64) and Llama-8B-like (32/8/128) "
                    "shapes, batch 1 and 8, contexts 1k/4k/16k; then SmolLM2 greedy decode after "
                    "a long prompt with each cache (tokens/s, peak memory).")
    dec.add_argument("--quick", action="store_true",
                     help="SmolLM2 shape, contexts 1k and 4k; end to end after a 1024-token prompt")
    dec.add_argument("--repeats", type=int, default=5, help="timed steps per contender (default 5)")
    dec.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    dec.add_argument("--model", default="smollm2", help="model for the end-to-end rows")
    dec.add_argument("--no-e2e", action="store_true", help="attention-layer rows only")
    dec.add_argument("--e2e-only", action="store_true", help="end-to-end rows only")
    dec.add_argument("--threads", type=int,
                     help="torch threads for every contender (default: torch's; 1 compares "
                          "kernels on a shared machine where a descheduled worker stalls a pool)")
    dec.add_argument("--instructions", action="store_true",
                     help="also count each C++ op's instructions per element under valgrind's "
                          "callgrind (small fixed shape, one thread; adds ~5 min)")
    _outputs(dec)
    dec.set_defaults(func=_bench_decode)

    b = bench_sub.add_parser("model", help="all variants + peer + INT2-choice controls (report)")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--variants", help="comma-separated (default: all registered)")
    b.add_argument("--peer", action="append", choices=["quanto", "hqq"], default=None,
                   help="transformers quantized-cache backend to compare (repeatable)")
    b.add_argument("--random-seeds", type=int, default=2, help="random INT2 controls per mix variant")
    b.add_argument("--ablation", action="store_true",
                   help="each cache accuracy lever on/off on top of --variants (default: "
                        "turbo-int4,turbo-mix), all levers together, and the --peer caches")
    b.add_argument("--levers", help="with --ablation: comma-separated levers to measure "
                                    "(default: all; see the report's 'Levers')")
    b.add_argument("--exact-qk", action="store_true",
                   help="with --ablation, a diagnostic: INT8 Q·Kᵀ off in every row, so rows "
                        "differ in what the cache stores only")
    b.add_argument("--from-defaults", action="store_true",
                   help="with --ablation: add each lever to the variant as shipped instead of "
                        "starting from every lever off")
    b.add_argument("--text", help="UTF-8 text file (default: the stdlib's pydoc topics)")
    b.add_argument("--max-tokens", type=int, default=8192)
    b.add_argument("--window", type=int, default=1024)
    add_measure_args(b)
    b.add_argument("--plots", metavar="DIR",
                   help="write accuracy- and speed-vs-KV-bytes PNGs (green: passes the default gates)")
    b.add_argument("--replot", metavar="JSON", help="render an earlier report's JSON; no measuring")
    _outputs(b)
    b.set_defaults(func=_bench_model)

    ag = bench_sub.add_parser(
        "agreement", help="the serving engine's cache path against the plain forward's logits",
        description="A held-out prompt in chunks, then decode steps, through each variant's cache "
                    "as the server runs it; logits compared with one plain forward.")
    ag.add_argument("--model", default="smollm2")
    ag.add_argument("--variants", default="fp16,turbo-int4", help="comma-separated")
    ag.add_argument("--prompt", type=int, default=1536, help="prompt tokens (default 1536)")
    ag.add_argument("--chunk", type=int, default=512, help="prompt tokens per forward (default 512)")
    ag.add_argument("--decode", type=int, default=8, help="decode steps (default 8)")
    ag.add_argument("--text", help="UTF-8 text file (default: the stdlib's pydoc topics)")
    _outputs(ag)
    ag.set_defaults(func=_bench_agreement)

    sb = bench_sub.add_parser(
        "serve", help="concurrent streaming clients against our server per variant (and vLLM)",
        description="Starts each server itself (or uses --url); steady-state decode tokens/s, "
                    "TTFT and inter-token latency, peak concurrency and KV bytes.")
    sb.add_argument("--quick", action="store_true",
                    help="8 clients x 2048-token prompts x 32 new tokens: fp16 and turbo-int4")
    sb.add_argument("--model", default="smollm2")
    sb.add_argument("--plan", help="turbo-mix bit plan (the full run includes turbo-mix)")
    sb.add_argument("--peer", action="append", choices=["vllm"],
                    help="also run vLLM's CPU build (own venv via scripts/vllm_peer.sh)")
    sb.add_argument("--url", help="measure a running server instead of starting contenders")
    _outputs(sb)
    sb.set_defaults(func=_bench_serve)
