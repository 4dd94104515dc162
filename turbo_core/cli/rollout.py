"""``turbo rollout``: deploy a serving image to Kubernetes, one Docker host, or nowhere
(render + validate only), verify it, roll back on failure, report JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rollout(args: argparse.Namespace) -> int:
    from turbo_core.fileio import write_atomic
    from turbo_core.rollout import run as rollout_run
    from turbo_core.rollout.dockerhost import DockerOptions
    from turbo_core.rollout.kube import KubeOptions
    from turbo_core.rollout.verify import VerifyConfig, served_model_id

    expected = args.expect_model or served_model_id(args.model, args.variant)
    result = rollout_run.run(
        args.target, args.image, overlay=args.overlay, model=args.model, variant=args.variant,
        mlflow_version=args.mlflow_version, mlflow_run_id=args.mlflow_run_id,
        kube=KubeOptions(namespace=args.namespace, kubeconfig=args.kubeconfig,
                         context=args.context, timeout_s=args.timeout),
        docker=DockerOptions(name=args.name, host=args.host, port=args.port,
                             ready_timeout_s=args.timeout),
        verify_cfg=VerifyConfig(expected_model=expected, max_latency_s=args.max_latency),
        check_image=not args.skip_image_check, out_dir=args.out)
    doc = result.to_dict()
    if args.json:
        write_atomic(args.json, json.dumps(doc, indent=2))
    if args.mlflow_run_id:
        rollout_run.log_to_mlflow(result, args.mlflow_run_id)
    print(f"rollout {result.target}: {result.status}"
          + (f" (previous {result.previous_revision})" if result.previous_revision else "")
          + (f": {result.reason}" if result.reason else ""))
    for check in (result.verify or {}).get("checks", []):
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {check['name']:<10} {check['detail']}")
    if not args.json:
        json.dump(doc, sys.stdout, indent=2)
        print()
    return 0 if result.ok else 1


def add_parser(sub) -> None:
    r = sub.add_parser(
        "rollout", help="deploy a serving image, verify it, roll back on failure",
        description="Exit status: 0 deployed / unchanged / rendered, 1 failed or rolled back, "
                    "2 bad input (nothing running was changed).")
    r.add_argument("--target", required=True, choices=["kubernetes", "docker", "none"])
    r.add_argument("--image", required=True,
                   help="repo@sha256:… (tags are resolved to digests in the registry)")
    r.add_argument("--overlay", default="gpu", choices=["gpu", "cpu-dev"])
    r.add_argument("--namespace", default="default")
    r.add_argument("--kubeconfig", help="default: $KUBECONFIG, ~/.kube/config, or in-cluster")
    r.add_argument("--context", help="kubeconfig context (default: the current one)")
    r.add_argument("--name", default="turbo-attention", help="docker: container name")
    r.add_argument("--host", default="127.0.0.1", help="docker: address of the serving port")
    r.add_argument("--port", type=int, default=8000, help="docker: serving port")
    r.add_argument("--timeout", type=float, default=900.0,
                   help="seconds to wait for a rollout / a container to be ready")
    r.add_argument("--max-latency", type=float, default=30.0,
                   help="bound on the verification completion's latency (s)")
    r.add_argument("--model", help="model name (labels; expected in /v1/models)")
    r.add_argument("--variant", help="variant name (labels; expected in /v1/models)")
    r.add_argument("--expect-model", help="model id /v1/models must list "
                                          "(default MODEL:VARIANT)")
    r.add_argument("--mlflow-version", help="registered model version (label)")
    r.add_argument("--mlflow-run-id", help="MLflow run to attach the report to")
    r.add_argument("--skip-image-check", action="store_true",
                   help="do not ask the registry whether the image exists")
    r.add_argument("--out", type=Path, help="folder for manifests.yaml and rollout.json")
    r.add_argument("--json", metavar="PATH", help="write the report here (else stdout)")
    r.set_defaults(func=_rollout)
