"""The ``turbo`` command line: one module per command group, each with ``add_parser``.
Subcommands import their heavy modules lazily, so ``turbo --help`` stays fast."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

GROUPS = ("variants", "calibrate", "evaluate", "compare", "registry", "bench", "serve", "image",
          "rollout", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="turbo", description="TurboAttention pipeline tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        importlib.import_module(f"turbo_core.cli.{group}").add_parser(sub)
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
