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
    rows = [[v.name, v.kv_bits or "float", f"{v.int2_fraction:.0%}", v.description]
            for v in VARIANTS.values()]
    print(tabulate(rows, headers=["variant", "kv bits", "int2 heads", "description"]))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("variants", help="list the registered variants")
    v.add_argument("--json", metavar="PATH", help="also write them as JSON")
    v.set_defaults(func=_variants)
