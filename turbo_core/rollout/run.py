"""One entry point for every target: check the image, render + validate, deploy, report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from turbo_core.fileio import write_atomic
from turbo_core.rollout import TARGETS, RolloutError, RolloutResult, release_metadata
from turbo_core.rollout.dockerhost import DockerOptions
from turbo_core.rollout.kube import KubeOptions
from turbo_core.rollout.verify import VerifyConfig, served_model_id

log = logging.getLogger("turbo.rollout")


def run(target: str, image: str, *, overlay: str = "gpu", model: str | None = None,
        variant: str | None = None, mlflow_version: str | None = None,
        mlflow_run_id: str | None = None, kube: KubeOptions | None = None,
        docker: DockerOptions | None = None, verify_cfg: VerifyConfig | None = None,
        check_image: bool = True, out_dir: Path | None = None) -> RolloutResult:
    """Roll ``image`` out to ``target``. Bad input raises RolloutError before anything
    running is touched; failures after that are rolled back and reported in the result."""
    kube, docker = kube or KubeOptions(), docker or DockerOptions()
    if target not in TARGETS:
        raise RolloutError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if verify_cfg is None:
        verify_cfg = VerifyConfig(expected_model=served_model_id(model, variant))
    labels, annotations = release_metadata(model, variant, mlflow_version, mlflow_run_id)
    if target == "docker":
        from turbo_core.rollout import dockerhost

        result = dockerhost.rollout(image, docker, verify_cfg, labels | annotations)
    else:
        from turbo_core.rollout import manifests, oci_registry

        digest = manifests.split_image(image)[2]
        if check_image:
            digest = oci_registry.resolve_digest(image)
        elif target == "kubernetes" and not digest:
            raise RolloutError(f"image {image!r} has no digest: deploys use repo@sha256:…, or "
                               "drop --skip-image-check to resolve the tag in its registry")
        ref = oci_registry.pinned(image, digest) if digest else image
        objs = manifests.render(overlay, image=ref, namespace=kube.namespace, labels=labels,
                                annotations=annotations)
        versions = manifests.validate(objs)
        if out_dir is not None:
            write_atomic(Path(out_dir) / "manifests.yaml", manifests.to_yaml(objs))
        if target == "none":
            result = RolloutResult(target="none", image=ref, image_digest=digest,
                                   status="rendered")
        else:
            from turbo_core.rollout import kube as kube_target

            result = kube_target.rollout(objs, ref, kube, verify_cfg, image_digest=digest)
        result.details |= {"overlay": overlay, "objects": [f"{o['kind']}/{o['metadata']['name']}"
                                                           for o in objs],
                           "schema_versions": versions}
    if out_dir is not None:
        write_atomic(Path(out_dir) / "rollout.json", json.dumps(result.to_dict(), indent=2))
    return result


def log_to_mlflow(result: RolloutResult, run_id: str) -> None:
    """Attach the rollout report to an MLflow run (artifact + metrics + tags)."""
    from mlflow.tracking import MlflowClient

    from turbo_core.tracking import runs as tracking

    tracking.configure()
    client = MlflowClient()
    client.log_dict(run_id, result.to_dict(), "rollout/rollout.json")
    client.log_metric(run_id, "rollout_ok", float(result.ok))
    client.log_metric(run_id, "rollout_rolled_back", float(result.rolled_back))
    if result.verify and "latency_s" in result.verify:
        client.log_metric(run_id, "rollout_verify_latency_s", result.verify["latency_s"])
    client.set_tag(run_id, "rollout.target", result.target)
    client.set_tag(run_id, "rollout.status", result.status)
    client.set_tag(run_id, "rollout.image", result.image)
    if result.image_digest:
        client.set_tag(run_id, "rollout.image_digest", result.image_digest)
