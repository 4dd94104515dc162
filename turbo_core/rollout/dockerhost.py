"""The one-host target: a candidate container is started beside the serving one, verified,
then traffic is switched (old stopped, new started on the serving port). The previous
container is kept, stopped, as ``<name>-previous`` for rollback.

A single host port cannot be handed over atomically, so the switch has a short gap (the
new container's model load); it is measured and reported as ``downtime_s``. Containers run
like the Kubernetes pods: non-root (the image's user), read-only root filesystem, ``/tmp``
as tmpfs (``exec``, as an emptyDir is: Docker mounts tmpfs ``noexec`` by default, and the
compiled decode step and Triton load the code they compiled into ``$TURBO_HOME`` there),
1 GiB ``/dev/shm``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from turbo_core.http import wait_ok
from turbo_core.rollout import LABEL_PREFIX, RolloutError, RolloutResult
from turbo_core.rollout.verify import VerifyConfig, http_request, verify

log = logging.getLogger("turbo.rollout")
ROLE = f"{LABEL_PREFIX}/role"
DEPLOYMENT = f"{LABEL_PREFIX}/deployment"


@dataclass(frozen=True)
class DockerOptions:
    name: str = "turbo-attention"
    host: str = "127.0.0.1"  # address the serving port binds to ("0.0.0.0": all interfaces)
    port: int = 8000
    ready_timeout_s: float = 600.0


def _client():
    import docker

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise RolloutError(f"no Docker engine reachable: {exc}") from None
    return client


def _get(client, name: str):
    import docker

    try:
        return client.containers.get(name)
    except docker.errors.NotFound:
        return None


def _remove(container) -> None:
    if container is not None:
        container.remove(force=True)


def _start(client, image, name: str, role: str, opts: DockerOptions, host_port: int | None,
           labels: dict[str, str]):
    _remove(_get(client, name))
    return client.containers.run(
        image.id, name=name, detach=True,
        ports={"8000/tcp": (opts.host if host_port else "127.0.0.1", host_port)},
        labels=labels | {ROLE: role, DEPLOYMENT: opts.name},
        read_only=True, tmpfs={"/tmp": "rw,exec,size=2g"}, shm_size="1g",
        restart_policy={"Name": "unless-stopped"} if role == "serving" else None)


def _url(container) -> str:
    container.reload()
    binding = container.ports["8000/tcp"][0]
    host = "127.0.0.1" if binding["HostIp"] in ("0.0.0.0", "") else binding["HostIp"]
    return f"http://{host}:{binding['HostPort']}"


def _ready_and_verified(container, opts: DockerOptions, cfg: VerifyConfig) -> dict:
    def alive() -> str | None:
        container.reload()
        if container.status not in ("created", "running"):
            return f"container {container.name} {container.status}: " \
                   + container.logs(tail=20).decode(errors="replace")
        return None

    url = _url(container)
    try:
        took = wait_ok(f"{url}/ready", opts.ready_timeout_s, alive)
    except (TimeoutError, RuntimeError) as exc:
        return {"ok": False, "failed": [f"ready: {exc}"], "checks": []}
    report = verify(http_request(url), cfg)
    report["ready_after_s"] = round(took, 2)
    return report


def rollout(image_ref: str, opts: DockerOptions, cfg: VerifyConfig,
            labels: dict[str, str] | None = None) -> RolloutResult:
    import docker

    client = _client()
    try:
        image = client.images.get(image_ref)
    except docker.errors.ImageNotFound:
        raise RolloutError(f"image {image_ref} does not exist on this Docker engine") from None
    repo_digests = image.attrs.get("RepoDigests") or []  # ["repo@sha256:…"] once pushed/pulled
    result = RolloutResult(target="docker", image=image_ref,
                           image_digest=repo_digests[0].split("@")[1] if repo_digests else None)
    labels = labels or {}
    serving = _get(client, opts.name)
    if serving is not None:
        result.previous_revision = serving.image.id
        result.details["previous_image"] = (serving.image.tags or [serving.image.id])[0]
    if serving is not None and serving.status == "running" and serving.image.id == image.id:
        result.verify = verify(http_request(_url(serving)), cfg)
        result.status = "unchanged" if result.verify["ok"] else "failed"
        result.reason = None if result.verify["ok"] else "; ".join(result.verify["failed"])
        return result

    # 1. the candidate, beside what serves now, on a free port
    candidate = _start(client, image, f"{opts.name}-candidate", "candidate", opts, None, labels)
    result.changed = True
    report = _ready_and_verified(candidate, opts, cfg)
    if not report["ok"]:
        result.details["candidate_logs"] = candidate.logs(tail=40).decode(errors="replace")
        _remove(candidate)
        result.verify, result.rolled_back = report, True
        result.reason = "candidate failed verification: " + "; ".join(report["failed"])
        if serving is not None and serving.status == "running":
            result.rollback_verify = verify(http_request(_url(serving)), cfg)
        result.status = "rolled_back"
        return result
    _remove(candidate)

    # 2. switch: stop the old one (kept as <name>-previous), serve the new one on the port
    gap_start = time.monotonic()
    if serving is not None:
        serving.stop(timeout=30)
        _remove(_get(client, f"{opts.name}-previous"))
        serving.rename(f"{opts.name}-previous")
    new = _start(client, image, opts.name, "serving", opts, opts.port, labels)
    result.verify = _ready_and_verified(new, opts, cfg)
    result.details["downtime_s"] = round(time.monotonic() - gap_start, 2)
    if result.verify["ok"]:
        result.status, result.new_revision = "deployed", image.id
        return result

    # 3. the new one failed on the serving port: bring the previous one back
    result.rolled_back = True
    result.reason = "failed after the switch: " + "; ".join(result.verify["failed"])
    _remove(new)
    if serving is None:
        result.status = "rolled_back"
        return result
    serving.rename(opts.name)
    serving.start()
    result.rollback_revision = serving.image.id
    result.rollback_verify = _ready_and_verified(serving, opts, cfg)
    result.status = "rolled_back" if result.rollback_verify["ok"] else "failed"
    return result
