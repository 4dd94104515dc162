"""``turbo registry``: the registered versions of a model's variants in MLflow, and moving the
``champion`` alias by hand (what the pipeline's promote task does after a verified rollout)."""

from __future__ import annotations

import argparse


def _list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from turbo_core.tracking import model_registry as registry
    from turbo_core.tracking import runs as tracking

    tracking.configure()
    rows = registry.versions(args.model)
    if not rows:
        print(f"no registered versions of {registry.registered_name(args.model)} "
              f"in {tracking.tracking_uri()}")
        return 1
    print(tabulate([[r["version"], ",".join(r["aliases"]), r["variant"], r["status"], r["image"]]
                    for r in rows], headers=["version", "aliases", "variant", "status", "image"]))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from turbo_core.tracking import model_registry as registry
    from turbo_core.tracking import runs as tracking

    tracking.configure()
    known = {r["version"]: r for r in registry.versions(args.model)}
    if args.version not in known:
        raise ValueError(f"{registry.registered_name(args.model)} has no version {args.version} "
                         f"(it has: {', '.join(sorted(known, key=int)) or 'none'})")
    try:
        registry.promote(args.model, args.version)
    except MlflowException as exc:
        raise ValueError(f"promoting version {args.version}: {exc}") from None
    print(f"champion of {registry.registered_name(args.model)}: version {args.version} "
          f"({known[args.version]['variant']})")
    return 0


def _demote(args: argparse.Namespace) -> int:
    from turbo_core.tracking import model_registry as registry
    from turbo_core.tracking import runs as tracking

    tracking.configure()
    was = registry.demote(args.model)
    name = registry.registered_name(args.model)
    print(f"{name}: no champion now (was version {was})" if was else f"{name} had no champion")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser("registry", help="registered versions in MLflow; promote or demote by hand",
                         description="Reads and writes the store at MLFLOW_TRACKING_URI (default: "
                                     "the local store under $TURBO_HOME/mlflow).")
    reg_sub = reg.add_subparsers(dest="registry_command", required=True)
    ls = reg_sub.add_parser("list", help="versions, aliases, variant, status and deployed image")
    ls.add_argument("--model", required=True, help="base model name, e.g. SmolLM2-135M-Instruct")
    ls.set_defaults(func=_list)
    pr = reg_sub.add_parser("promote", help="make VERSION the champion")
    pr.add_argument("--model", required=True)
    pr.add_argument("--version", required=True)
    pr.set_defaults(func=_promote)
    de = reg_sub.add_parser("demote", help="take the champion alias off its version")
    de.add_argument("--model", required=True)
    de.set_defaults(func=_demote)
