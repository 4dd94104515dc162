"""``turbo variants``: the registered variants."""

from __future__ import annotations

import argparse

from turbo_core.cli.common import write_json


def _variants(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from turbo_core.attention.variants import VARIANTS

    if args.json:
        write_json(args.json, {name: v.params() | {"description": v.description}
                               for name, v in VARIANTS.items()})
    rows = [[v.name, v.kv_bits or "float", f"{v.int2_fraction:.0%}", _levers(v), v.description]
            for v in VARIANTS.values()]
    print(tabulate(rows, headers=["variant", "kv bits", "int2 heads", "levers", "description"]))
    return 0


def _levers(v) -> str:
    """The cache levers a variant turns on, e.g. ``rotate, sinks=16``."""
    if not v.quantized_cache:
        return ""
    on = [k if val is True else f"{k}={val}" for k, val in v.kv.levers().items() if val]
    return ", ".join(on) or "none"


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("variants", help="list the registered variants")
    v.add_argument("--json", metavar="PATH", help="also write them as JSON")
    v.set_defaults(func=_variants)
