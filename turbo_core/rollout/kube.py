"""The Kubernetes target: record → server-side apply → wait → verify → (roll back → verify).

Uses the official ``kubernetes`` client (kubeconfig or in-cluster config, auth, TLS, REST) and
speaks the REST paths directly with JSON bodies, so a rollback re-applies exactly what was
read, with no model round trip. Verification goes through the API server's Service proxy
(``/api/v1/namespaces/NS/services/NAME:http/proxy/...``): it works from outside the cluster
with the same credentials and reaches pods exactly as the Service routes traffic; the
server's API key goes as ``X-API-Key``, since the proxy keeps ``Authorization`` for itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from turbo_core.rollout import LABEL_PREFIX, RolloutError, RolloutResult
from turbo_core.rollout.manifests import deployment_of
from turbo_core.rollout.verify import VerifyConfig, auth_headers, verify

log = logging.getLogger("turbo.rollout")
FIELD_MANAGER = "turbo-rollout"
HASH_KEY = f"{LABEL_PREFIX}/manifest-hash"
REVISION_KEY = "deployment.kubernetes.io/revision"
FAILING_WAIT_REASONS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull",
                        "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}


@dataclass(frozen=True)
class KubeOptions:
    namespace: str = "default"
    kubeconfig: str | None = None
    context: str | None = None
    timeout_s: float = 900.0  # bound on waiting for a rollout (and for a rollback)
    poll_s: float = 2.0
    crashloop_restarts: int = 2  # restarts of a new pod in CrashLoopBackOff that fail a rollout


class Kube:
    """Thin JSON-over-REST access with the official client's configuration and auth."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None):
        import kubernetes

        try:
            if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ \
                    and "KUBECONFIG" not in os.environ:
                cfg = kubernetes.client.Configuration()
                kubernetes.config.load_incluster_config(client_configuration=cfg)
                self.api = kubernetes.client.ApiClient(cfg)
                self.where = "in-cluster"
                return
            path = Path(kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config").expanduser()
            if not path.is_file():
                raise RolloutError(f"no kubeconfig at {path}: pass --kubeconfig or set KUBECONFIG")
            self.api = kubernetes.config.new_client_from_config(config_file=str(path),
                                                                 context=context)
        except kubernetes.config.ConfigException as exc:
            raise RolloutError(f"kubeconfig {kubeconfig or ''} unusable: {exc}") from None
        self.where = self.api.configuration.host

    def call(self, method: str, path: str, body: dict | None = None,
             content_type: str = "application/json", query: dict | None = None,
             timeout_s: float = 60.0, extra_headers: dict[str, str] | None = None,
             ) -> tuple[int, bytes]:
        import urllib3

        headers = {"Accept": "application/json, */*", **(extra_headers or {})}
        if body is not None:
            headers["Content-Type"] = content_type
        _, url, headers, payload, _ = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers,
            body=body, auth_settings=["BearerToken"])
        try:
            resp = self.api.call_api(method, url, header_params=headers, body=payload,
                                     _request_timeout=timeout_s)
        except urllib3.exceptions.HTTPError as exc:
            raise RolloutError(f"Kubernetes API at {self.where} unreachable: {exc}") from None
        return resp.status, resp.read()

    def get(self, path: str) -> dict | None:
        status, body = self.call("GET", path)
        if status == 404:
            return None
        if status != 200:
            raise RolloutError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def apply(self, obj: dict) -> dict:
        """Server-side apply (creates or updates; we own the fields we set)."""
        status, body = self.call("PATCH", object_path(obj), obj,
                                 content_type="application/apply-patch+yaml",
                                 query={"fieldManager": FIELD_MANAGER, "force": "true"})
        if status not in (200, 201):
            raise RolloutError(f"apply {obj['kind']}/{obj['metadata']['name']}: HTTP {status}: "
                               f"{body[:300]!r}")
        return json.loads(body)

    def delete(self, obj: dict) -> None:
        status, _ = self.call("DELETE", object_path(obj))
        if status not in (200, 202, 404):
            raise RolloutError(f"delete {obj['kind']}/{obj['metadata']['name']}: HTTP {status}")


def object_path(obj: dict, namespace: str | None = None) -> str:
    api = obj["apiVersion"]
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    ns = namespace or obj["metadata"].get("namespace") or "default"
    return f"{prefix}/namespaces/{ns}/{obj['kind'].lower()}s/{obj['metadata']['name']}"


def manifest_hash(objs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(objs, sort_keys=True).encode()).hexdigest()[:16]


def _annotation(obj: dict, key: str) -> str | None:
    return (obj["metadata"].get("annotations") or {}).get(key)


def _image(dep: dict) -> str:
    return dep["spec"]["template"]["spec"]["containers"][0]["image"]


def _progress(dep: dict) -> tuple[bool, str]:
    """(complete, description) of a Deployment's rollout, the way ``kubectl rollout status``
    judges it."""
    meta, spec, st = dep["metadata"], dep["spec"], dep.get("status") or {}
    want = spec.get("replicas", 1)
    if st.get("observedGeneration", 0) < meta.get("generation", 1):
        return False, "waiting for the controller to observe the new generation"
    for cond in st.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            raise RolloutError(f"progress deadline exceeded: {cond.get('message', '')}")
    updated, available = st.get("updatedReplicas", 0), st.get("availableReplicas", 0)
    total = st.get("replicas", 0)
    if updated < want:
        return False, f"{updated} of {want} replicas updated"
    if total > updated:
        return False, f"{total - updated} old replicas pending termination"
    if available < updated:
        return False, f"{available} of {updated} updated replicas available"
    return True, f"{available}/{want} available"


def _crashing(kube: Kube, dep: dict, restarts: int) -> str | None:
    """A pod of the new template that cannot start (crash loop, image pull), if any."""
    ns = dep["metadata"]["namespace"]
    sel = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
    status, body = kube.call("GET", f"/api/v1/namespaces/{ns}/pods",
                             query={"labelSelector": sel})
    if status != 200:
        return None
    for pod in json.loads(body).get("items", []):
        images = [c.get("image") for c in pod.get("spec", {}).get("containers", [])]
        if _image(dep) not in images:
            continue  # a pod of the previous revision
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
            if reason in FAILING_WAIT_REASONS and (
                    reason != "CrashLoopBackOff" or cs.get("restartCount", 0) >= restarts):
                return (f"pod {pod['metadata']['name']}: {reason} "
                        f"(restarts {cs.get('restartCount', 0)})")
    return None


def wait_rollout(kube: Kube, dep_path: str, opts: KubeOptions) -> dict:
    """Wait (bounded) until the Deployment's rollout completes; RuntimeError on failure."""
    deadline = time.monotonic() + opts.timeout_s
    last = ""
    while True:
        dep = kube.get(dep_path)
        if dep is None:
            raise RuntimeError(f"{dep_path} disappeared during the rollout")
        try:
            done, last = _progress(dep)
        except RolloutError as exc:
            raise RuntimeError(str(exc)) from None
        if done:
            return dep
        crash = _crashing(kube, dep, opts.crashloop_restarts)
        if crash:
            raise RuntimeError(f"new pods cannot start: {crash}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"rollout not complete after {opts.timeout_s:g} s ({last})")
        log.info("rollout: %s", last)
        time.sleep(opts.poll_s)


def service_request(kube: Kube, ns: str, service: str, port: str = "http"):
    """Requests to the Service through the API server's proxy. The server's API key travels
    as ``X-API-Key``: the API server authenticates the caller with ``Authorization`` and does
    not forward it (kubernetes/kubernetes#38775), other headers reach the pod."""
    base = f"/api/v1/namespaces/{ns}/services/{service}:{port}/proxy"

    def request(method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        return kube.call(method, base + path, body, extra_headers=auth_headers("X-API-Key"))
    return request


def _reapplicable(live: dict) -> dict:
    """The live Deployment as an apply body: spec + our metadata, without server fields."""
    meta = live["metadata"]
    keep = {k: v for k, v in (meta.get("annotations") or {}).items()
            if k != REVISION_KEY and not k.startswith("kubectl.kubernetes.io/")}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                         "labels": meta.get("labels") or {}, "annotations": keep},
            "spec": live["spec"]}


def rollout(objs: list[dict], image: str, opts: KubeOptions, verify_cfg: VerifyConfig,
            image_digest: str | None = None) -> RolloutResult:
    """Deploy ``objs`` (rendered for ``image``); every failure after the apply rolls back."""
    result = RolloutResult(target="kubernetes", image=image, image_digest=image_digest)
    kube = Kube(opts.kubeconfig, opts.context)
    ns = opts.namespace
    if kube.get(f"/api/v1/namespaces/{ns}") is None:
        raise RolloutError(f"namespace {ns!r} does not exist on {kube.where}")
    objs = [o | {"metadata": o["metadata"] | {"namespace": ns}} for o in objs]
    dep = deployment_of(objs)
    digest = manifest_hash(objs)
    dep["metadata"]["annotations"] = (dep["metadata"].get("annotations") or {}) | {HASH_KEY: digest}
    dep_path = object_path(dep)
    live = kube.get(dep_path)
    existed = {object_path(o): kube.get(object_path(o)) is not None for o in objs}
    if live is not None:
        result.previous_revision = _annotation(live, REVISION_KEY)
        result.details["previous_image"] = _image(live)
    svc = next(o["metadata"]["name"] for o in objs if o["kind"] == "Service")
    request = service_request(kube, ns, svc)

    unchanged = live is not None and _annotation(live, HASH_KEY) == digest
    try:
        if not unchanged:
            for obj in objs:
                kube.apply(obj)
            result.changed = True
            log.info("applied %d objects to %s/%s", len(objs), kube.where, ns)
        live_new = wait_rollout(kube, dep_path, opts)
        result.new_revision = _annotation(live_new, REVISION_KEY)
        result.verify = verify(request, verify_cfg)
        if not result.verify["ok"]:
            raise RuntimeError("verification failed: " + "; ".join(result.verify["failed"]))
    except RuntimeError as exc:
        result.reason = str(exc)
        log.error("rollout of %s failed: %s", image, exc)
        if not result.changed:  # nothing of ours to undo: report what we found
            result.status = "failed"
            return result
        _roll_back(kube, objs, live, existed, opts, verify_cfg, request, result)
        return result
    result.status = "deployed" if result.changed else "unchanged"
    return result


def _roll_back(kube: Kube, objs: list[dict], live: dict | None, existed: dict[str, bool],
               opts: KubeOptions, verify_cfg: VerifyConfig, request, result: RolloutResult) -> None:
    result.rolled_back = True
    if live is None:  # first rollout: nothing ran before, so remove what we created
        for obj in reversed(objs):
            if not existed[object_path(obj)]:
                kube.delete(obj)
        result.status = "rolled_back"
        result.details["rollback"] = "first rollout: created objects deleted"
        return
    kube.apply(_reapplicable(live))
    try:
        back = wait_rollout(kube, object_path(live), opts)
        result.rollback_revision = _annotation(back, REVISION_KEY)
        result.rollback_verify = verify(request, verify_cfg)
        result.status = "rolled_back" if result.rollback_verify["ok"] else "failed"
    except RuntimeError as exc:
        result.status = "failed"
        result.details["rollback_error"] = str(exc)
