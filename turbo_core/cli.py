"""The ``turbo`` command line. Subcommands import their heavy modules lazily."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _bench_attention(args: argparse.Namespace) -> int:
    import torch

    from turbo_core.bench import attention
    from turbo_core.bench.common import write_json
    from turbo_core.fileio import write_atomic

    shape = attention.PRESETS["quick" if args.quick else "article"]
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
    doc["mode"] = "quick" if args.quick else "article"
    print(attention.table(doc))
    if args.json:
        print(f"wrote {write_json(args.json, doc)}", file=sys.stderr)
    if args.markdown:
        md = "# Attention benchmark\n\n" + attention.table(doc, fmt="github") + "\n"
        print(f"wrote {write_atomic(args.markdown, md)}", file=sys.stderr)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    from turbo_core.bench import kernels
    from turbo_core.bench.common import write_json
    from turbo_core.fileio import write_atomic

    doc = kernels.run(repeats=args.repeats)
    print(kernels.tables(doc))
    if args.json:
        print(f"wrote {write_json(args.json, doc)}", file=sys.stderr)
    if args.markdown:
        write_atomic(args.markdown, "# Kernel benchmark\n\n" + kernels.tables(doc, "github") + "\n")
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbo", description="TurboAttention pipeline tools")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    att = bench_sub.add_parser(
        "attention", help="TurboAttention vs nn.MultiheadAttention and SDPA",
        description="Default: the article's setup (batch 32, seq 512, embed 1024, 8 heads).")
    att.add_argument("--quick", action="store_true", help="small shape (4 x 128, embed 256, 4 heads)")
    for name in ("batch", "seq", "embed", "heads"):
        att.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    att.add_argument("--repeats", type=int, help="timed runs per contender (default 5, quick 10)")
    att.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    att.add_argument("--causal", action="store_true", help="causal self-attention")
    att.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    att.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    att.add_argument("--case", action="append",
                     help="TurboAttention case to include (repeatable; default all)")
    att.add_argument("--json", metavar="PATH", help="write the results as JSON")
    att.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    att.set_defaults(func=_bench_attention)

    ker = bench_sub.add_parser(
        "kernels", help="Triton kernels vs SDPA fp16 (GPU; tiny interpreter smoke run on CPU)")
    ker.add_argument("--repeats", type=int, help="timed runs per case (default 10 GPU, 1 CPU)")
    ker.add_argument("--json", metavar="PATH")
    ker.add_argument("--markdown", metavar="PATH")
    ker.set_defaults(func=_bench_kernels)

    from turbo_core import cli_model

    cli_model.add_parsers(sub, bench_sub)
    from turbo_core import cli_rollout

    cli_rollout.add_parser(sub)
    from turbo_core import cli_pipeline

    cli_pipeline.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        parser.exit(2, f"turbo: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
