"""``turbo calibrate``: head priorities → bit plan JSON (tracked in MLflow unless --no-track)."""

from __future__ import annotations

import argparse
import sys

from turbo_core.cli.common import add_variant_args, run_context, variant_for


def _calibrate(args: argparse.Namespace) -> int:
    from turbo_core.hf import calibrate, models

    variant = variant_for(args)
    lm = models.load(args.model)
    if args.no_track:
        plan = calibrate.calibrate(lm, variant, text_path=args.text, max_tokens=args.max_tokens,
                                   seed=args.seed)
        plan.save(args.out)
    else:
        from turbo_core.pipeline import stages

        plan, run_id = stages.calibrate_variant(lm, variant, args.out, text=args.text,
                                                max_tokens=args.max_tokens, seed=args.seed,
                                                ctx=run_context(args))
        print(f"MLflow run {run_id}", file=sys.stderr)
    print(f"wrote {args.out}: {plan.selection.int2_heads} INT2 heads of "
          f"{lm.shape.num_layers * lm.shape.num_kv_heads} ({variant.name})", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="head priorities → bit plan JSON")
    add_variant_args(c)
    c.add_argument("--out", required=True, help="where to write the plan JSON")
    c.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    c.set_defaults(func=_calibrate)
