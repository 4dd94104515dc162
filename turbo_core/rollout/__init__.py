"""Rollout of a serving image: render + validate the manifests, deploy, verify, roll back.

Targets: ``kubernetes`` (server-side apply through the official client), ``docker`` (one
host: candidate container, verify, switch) and ``none`` (render and validate only). Every
target returns a :class:`RolloutResult`, written as JSON for the pipeline and MLflow.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

LABEL_PREFIX = "turbo-attention.dev"
TARGETS = ("kubernetes", "docker", "none")


class RolloutError(ValueError):
    """Bad input or an unusable environment, found before anything running was changed."""


@dataclass
class RolloutResult:
    target: str
    image: str
    image_digest: str | None = None
    status: str = "pending"  # deployed | unchanged | rolled_back | failed | rendered
    changed: bool = False
    previous_revision: str | None = None  # Deployment revision, or the previous container's image
    new_revision: str | None = None
    rolled_back: bool = False
    rollback_revision: str | None = None
    reason: str | None = None
    verify: dict | None = None
    rollback_verify: dict | None = None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("deployed", "unchanged", "rendered")

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


def label_value(text: str) -> str:
    """``text`` as a valid Kubernetes label value (≤ 63 chars, alphanumeric ends, ``-_.``)."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def release_metadata(model: str | None, variant: str | None, mlflow_version: str | None,
                     mlflow_run_id: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that name what a release serves; labels are sanitised, the
    annotations keep the exact values."""
    given = {"model": model, "variant": variant, "mlflow-version": mlflow_version,
             "mlflow-run-id": mlflow_run_id}
    labels = {f"{LABEL_PREFIX}/{k}": label_value(v) for k, v in given.items()
              if v and k != "mlflow-run-id"}
    annotations = {f"{LABEL_PREFIX}/{k}": v for k, v in given.items() if v}
    return labels, annotations
