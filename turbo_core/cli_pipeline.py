"""``turbo pipeline run``: the nightly DAG once, locally (Airflow on SQLite, in-process)."""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from turbo_core.fileio import write_atomic
    from turbo_core.pipeline import local
    from turbo_core.pipeline.params import validate

    conf = json.loads(args.conf) if args.conf else {}
    if not isinstance(conf, dict):
        raise ValueError("--conf must be a JSON object")
    for key in ("model", "variants", "deploy_target", "image_repository", "serve_port"):
        value = getattr(args, key)
        if value is not None:
            conf[key] = value
    if conf.get("deploy_target", "auto") == "auto":
        conf["deploy_target"] = local.default_target()
        print(f"deploy target: {conf['deploy_target']} "
              f"({'a Docker engine answers' if conf['deploy_target'] == 'docker' else 'no Docker engine'})")
    validate(conf)
    result = local.run(conf)
    print(local.report(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2, default=str))
    return 0 if result["state"].endswith("success") else 1


def add_parser(sub) -> None:
    p = sub.add_parser("pipeline", help="the nightly pipeline (Airflow DAG turbo_nightly)")
    psub = p.add_subparsers(dest="pipeline", required=True)
    r = psub.add_parser("run", help="run turbo_nightly once here (Airflow on SQLite)",
                        description="Parameters default to the DAG's; deploy target 'auto' "
                                    "picks docker when an engine answers, else none.")
    r.add_argument("--conf", help="DAG run conf as a JSON object")
    r.add_argument("--model", help="'smollm2' or a local Hugging Face directory")
    r.add_argument("--variants", nargs="+", help="variants to calibrate and evaluate")
    r.add_argument("--deploy-target", dest="deploy_target",
                   choices=["auto", "kubernetes", "docker", "none"])
    r.add_argument("--image-repository", dest="image_repository")
    r.add_argument("--serve-port", dest="serve_port", type=int)
    r.add_argument("--json", metavar="PATH", help="write run state, task states and summary")
    r.set_defaults(func=_run)
