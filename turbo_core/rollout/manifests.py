"""Render the kustomize overlays in ``k8s/`` for one release and validate every object.

A release is the overlay plus the image (by digest), the namespace, and labels/annotations
naming the model, variant and MLflow version. They are added the kustomize way: a generated
``kustomization.yaml`` layered on the overlay inside a temporary copy of ``k8s/``, rendered
by ``kubectl kustomize`` (or a standalone ``kustomize``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from turbo_core.rollout import RolloutError

K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ("gpu", "cpu-dev")
PLACEHOLDER_IMAGE = "turbo-attention-server"  # the image name in k8s/base/deployment.yaml
# Validated against the newest schemas kubernetes-validate ships and the oldest release we
# support (unhealthyPodEvictionPolicy is GA from 1.31).
SCHEMA_VERSIONS = ("1.31.0", "latest")


def split_image(ref: str) -> tuple[str, str | None, str | None]:
    """``repo[:tag][@sha256:…]`` → (repo, tag, digest)."""
    if not ref or any(c.isspace() for c in ref):
        raise RolloutError(f"image reference {ref!r} is empty or has spaces")
    name, _, digest = ref.partition("@")
    if digest and not digest.startswith("sha256:"):
        raise RolloutError(f"image reference {ref!r}: the digest must be sha256:…")
    repo, tag = name, None
    if ":" in name.rsplit("/", 1)[-1]:
        repo, tag = name.rsplit(":", 1)
    return repo, tag, digest or None


def _kustomize_cmd(path: Path) -> list[str]:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(path)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(path)]
    raise RolloutError("neither kubectl nor kustomize is on PATH: cannot render k8s/")


def render(overlay: str, *, image: str | None = None, namespace: str | None = None,
           labels: dict[str, str] | None = None,
           annotations: dict[str, str] | None = None) -> list[dict]:
    """The overlay's objects for one release, in apply order (Service, PDB, Deployment)."""
    if overlay not in OVERLAYS:
        raise RolloutError(f"unknown overlay {overlay!r}; choose from {', '.join(OVERLAYS)}")
    release: dict = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [f"../overlays/{overlay}"]}
    if namespace:
        release["namespace"] = namespace
    if image:
        repo, tag, digest = split_image(image)
        entry = {"name": PLACEHOLDER_IMAGE, "newName": repo}
        entry |= {"digest": digest} if digest else {"newTag": tag or "latest"}
        release["images"] = [entry]
    if labels:  # never in selectors: a Deployment's selector is immutable
        release["labels"] = [{"pairs": labels, "includeSelectors": False,
                              "includeTemplates": True}]
    if annotations:
        release["commonAnnotations"] = annotations
    with tempfile.TemporaryDirectory(prefix="turbo-k8s-") as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(K8S_DIR, tree)
        (tree / "release").mkdir()
        (tree / "release" / "kustomization.yaml").write_text(yaml.safe_dump(release))
        res = subprocess.run(_kustomize_cmd(tree / "release"), capture_output=True, text=True)
    if res.returncode != 0:
        raise RolloutError(f"kustomize failed for overlay {overlay!r}: {res.stderr.strip()}")
    objs = [o for o in yaml.safe_load_all(res.stdout) if o]
    order = {"Namespace": 0, "Service": 1, "PodDisruptionBudget": 2, "Deployment": 3}
    return sorted(objs, key=lambda o: order.get(o["kind"], 9))


def validate(objs: list[dict], versions: tuple[str, ...] = SCHEMA_VERSIONS) -> list[str]:
    """Check every object against the real Kubernetes JSON schemas (strict: unknown fields
    are errors). Returns the schema versions used; raises RolloutError naming each problem."""
    import kubernetes_validate

    used = [kubernetes_validate.latest_version() if v == "latest" else v for v in versions]
    problems = []
    for obj in objs:
        for version in used:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(p) for p in exc.path)
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} (k8s {version}) "
                                f"at {where or '.'}: {exc.message}")
    if problems:
        raise RolloutError("manifests do not validate:\n  " + "\n  ".join(problems))
    return used


def to_yaml(objs: list[dict]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False)


def deployment_of(objs: list[dict]) -> dict:
    deps = [o for o in objs if o["kind"] == "Deployment"]
    if len(deps) != 1:
        raise RolloutError(f"expected one Deployment in the manifests, found {len(deps)}")
    return deps[0]
