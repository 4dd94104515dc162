"""``turbo compare``: variants side by side from MLflow runs (table, JSON, PNG, Markdown)."""

from __future__ import annotations

import argparse
import sys

from turbo_core.cli.common import write_json, write_markdown


def _compare(args: argparse.Namespace) -> int:
    from turbo_core.tracking import compare, plots

    rows = compare.collect(args.experiment, args.runs, latest_only=not args.all_runs)
    print(compare.table(rows))
    if args.json:
        write_json(args.json, {"rows": rows, "differing_params": compare.differing_params(rows)})
    if args.png:
        plots.accuracy_vs_bytes(rows, args.png, title="turbo compare: accuracy vs KV memory")
        print(f"wrote {args.png}", file=sys.stderr)
    if args.speed_png:
        plots.speed_vs_bytes(rows, args.speed_png, title="turbo compare: speed vs KV memory")
        print(f"wrote {args.speed_png}", file=sys.stderr)
    if args.markdown:
        write_markdown(args.markdown, "turbo compare", compare.table(rows, "github"))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    cmp = sub.add_parser("compare", help="variants side by side from MLflow runs")
    cmp.add_argument("--experiment", action="append",
                     help="experiment name (repeatable; default: every turbo-attention/* one)")
    cmp.add_argument("--runs", nargs="+", help="explicit run ids instead")
    cmp.add_argument("--all-runs", action="store_true",
                     help="every finished run, not only the newest per variant")
    cmp.add_argument("--json", metavar="PATH")
    cmp.add_argument("--png", metavar="PATH", help="accuracy vs KV bytes chart")
    cmp.add_argument("--speed-png", metavar="PATH", help="speed-up vs KV bytes chart")
    cmp.add_argument("--markdown", metavar="PATH")
    cmp.set_defaults(func=_compare)
