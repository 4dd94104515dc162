"""``turbo pipeline run``: the nightly DAG once, locally (Airflow on SQLite, in-process)."""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from turbo_core.fileio import write_atomic
    from turbo_core.pipeline import local

    conf = json.loads(args.conf) if args.conf else {}
    if not isinstance(conf, dict):
        raise ValueError("--conf must be a JSON object")
    for key in ("model", "variants", "deploy_target", "image_repository", "serve_port",
                *FIELD_PARAMS):
        value = getattr(args, key)
        if value is not None:
            conf[key] = value
    note = None
    if conf.get("deploy_target", "auto") == "auto":
        conf["deploy_target"], note = local.default_target()
        print(f"deploy target: {conf['deploy_target']} ({note})")
    result = local.run(conf)  # validates conf before Airflow starts
    print(local.report(result, note))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2, default=str))
    return 0 if result["state"].endswith("success") else 1


FIELD_PARAMS = ("max_ppl_delta_pct", "min_top1_agreement", "min_kv_compression", "max_kl",
                "min_decode_speedup", "min_prefill_speedup", "min_retrieval",
                "min_retrieval_kept", "max_p95_latency_s", "speed_context", "speed_batch",
                "speed_repeats", "retrieval_lengths", "retrieval_samples")


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
    from turbo_core.pipeline.params import PARAMS

    for key in FIELD_PARAMS:  # the gates and what they measure, as in the Airflow form
        spec = PARAMS[key]
        kind = {"number": float, "integer": int}[spec.get("items", spec)["type"]]
        r.add_argument("--" + key.replace("_", "-"), dest=key, type=kind,
                       nargs="+" if spec["type"] == "array" else None,
                       help=f"{spec['title']} (default {spec['default']})".replace("%", "%%"))
    r.add_argument("--json", metavar="PATH", help="write run state, task states and summary")
    r.set_defaults(func=_run)
    c = psub.add_parser("clear", help="clear one task (and what follows) in one run, to rerun it",
                        description="The scheduler (scripts/ui.sh, or your deployment's) then "
                                    "runs the cleared tasks again with the run's parameters.")
    c.add_argument("--run-id", required=True, help="the DAG run (airflow dags list-runs turbo_nightly)")
    c.add_argument("--task", required=True, help="task id, e.g. evaluate or verify")
    c.add_argument("--only-failed", action="store_true", help="leave tasks that succeeded alone")
    c.add_argument("--no-downstream", dest="downstream", action="store_false",
                   help="clear the task alone, not the tasks after it")
    c.set_defaults(func=_clear)
    add_step_parser(psub)


def _clear(args: argparse.Namespace) -> int:
    from turbo_core.pipeline import local

    n = local.clear(args.run_id, args.task, downstream=args.downstream,
                    only_failed=args.only_failed)
    print(f"cleared {n} task instance(s) of {args.run_id}; the scheduler runs them again")
    return 0


def _step(args: argparse.Namespace) -> int:
    """One heavy step in a pod: prep from the DAG, the model from the image, the result as
    the pod's XCom."""
    import os
    import tempfile
    from pathlib import Path

    from turbo_core.fileio import write_atomic
    from turbo_core.pipeline import tasks

    prep = json.loads(args.prep)
    if os.environ.get("TURBO_MODEL_DIR"):  # the image's own copy of the model
        prep["model_dir"] = os.environ["TURBO_MODEL_DIR"]
    prep["work_dir"] = tempfile.mkdtemp(prefix="turbo-step-")
    if args.step == "calibrate":
        if not args.variant:
            raise ValueError("turbo pipeline step calibrate needs --variant")
        out = tasks.calibrate(prep, args.variant)
    else:
        if not args.calibrated:
            raise ValueError("turbo pipeline step evaluate needs --calibrated")
        calibrated = json.loads(args.calibrated)
        if not Path(calibrated["plan"]).is_file():  # made in another pod: fetch from MLflow
            calibrated["plan"] = tasks.fetch_plan(calibrated, prep["work_dir"])
        out = tasks.evaluate(prep, calibrated)
    write_atomic(args.xcom, json.dumps(out))
    print(json.dumps(out))
    return 0


def add_step_parser(psub) -> None:
    s = psub.add_parser("step", help="one pipeline step (what a worker pod runs)")
    s.add_argument("step", choices=["calibrate", "evaluate"])
    s.add_argument("--prep", required=True, help="the prepare task's output (JSON)")
    s.add_argument("--variant", help="calibrate: the variant")
    s.add_argument("--calibrated", help="evaluate: the calibrate step's output (JSON)")
    s.add_argument("--xcom", default="/airflow/xcom/return.json",
                   help="where the result goes (KubernetesPodOperator's XCom file)")
    s.set_defaults(func=_step)
