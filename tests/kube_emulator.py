"""A Kubernetes API for the rollout tests: kmock's emulator (HTTP server, object store with
history, GET/LIST/DELETE) plus what a real cluster adds and kmock leaves to tests:

* server-side apply (``PATCH`` with ``application/apply-patch+yaml``) creating or replacing
  the fields a single field manager owns, and ``metadata.generation`` bumped on spec changes;
* namespaces (``GET /api/v1/namespaces/NAME``);
* a test-side Deployment controller, ticking in the server's loop, that drives
  ``status`` (observedGeneration, updated/available replicas, revision annotation) and Pods
  by the behaviour the test assigns to each image: ``good``, ``stuck`` (never available),
  ``crash`` (CrashLoopBackOff) or ``wrong-model`` (available, but serves another model);
* the Service proxy (``/api/v1/namespaces/NS/services/NAME:PORT/proxy/PATH``) answering as
  the server of the image that is currently available would; as a real API server does, it
  authenticates the caller by ``Authorization`` and does not forward that header to the pod
  (kubernetes/kubernetes#38775), so a server started with an API key (``api_keys``) sees only
  the request's other headers.

No real API server can run on our machines (docs/design.md §4); this is the stand-in the issue names.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import threading

import aiohttp.web
import kmock

DEPLOYMENTS = kmock.resource("apps/v1/deployments")
PODS = kmock.resource("v1/pods")
REVISION = "deployment.kubernetes.io/revision"


def _removals(old: dict, new: dict) -> dict:
    """A kmock patch turning ``old`` into ``new`` (None deletes a key; lists are replaced)."""
    out: dict = {k: None for k in old if k not in new}
    for k, v in new.items():
        out[k] = _removals(old[k], v) if isinstance(v, dict) and isinstance(old.get(k), dict) else v
    return out


def _template_hash(dep: dict) -> str:
    return hashlib.sha256(json.dumps(dep["spec"]["template"], sort_keys=True).encode()).hexdigest()[:10]


class Cluster(kmock.KubernetesEmulator):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.namespaces: set[str] = {"default"}
        self.behaviour: dict[str, str] = {}  # image → good | stuck | crash | wrong-model
        self.models: dict[str, str] = {}  # image → model id its server reports
        self.api_keys: dict[str, str] = {}  # image → the API key its server requires on /v1
        self.token = "test-token"  # the bearer token the API server accepts (kubeconfig's)
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request
        self.serving: dict[str, str] = {}  # deployment name → image that serves traffic
        self._revisions: dict[str, dict[str, int]] = {}  # deployment → template hash → rev
        self._ticks: dict[str, int] = {}

    async def _handle(self, request):
        raw = request._raw_request
        self.calls.append((request.method, raw.path))
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)", raw.path)
        if m and request.method == "GET":
            if m.group(1) in self.namespaces:
                return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": m.group(1)}})
            return self._status(404, f'namespaces "{m.group(1)}" not found')
        if request.subresource and request.subresource.startswith("proxy"):
            return self._proxy(request)
        if request.method == "PATCH" and "apply-patch" in raw.headers.get("Content-Type", ""):
            return await self._apply(request)
        return await super()._handle(request)

    @staticmethod
    def _status(code: int, message: str):
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "code": code,
                                          "status": "Failure", "message": message}, status=code)

    async def _apply(self, request):
        body = request.data
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self.objects or self.objects[key].deleted:
                body["metadata"] |= {"namespace": request.namespace, "generation": 1,
                                     "uid": f"uid-{len(self.calls)}"}
                self.objects[key] = body
                return aiohttp.web.json_response(self.objects[key].raw, status=201)
            obj = self.objects[key]
            old = copy.deepcopy(obj.raw)
            new = copy.deepcopy(old)
            new["metadata"]["labels"] = body["metadata"].get("labels", {})
            kept = {k: v for k, v in (old["metadata"].get("annotations") or {}).items()
                    if k == REVISION}  # the controller's field, not the applier's
            new["metadata"]["annotations"] = kept | body["metadata"].get("annotations", {})
            new["spec"] = body["spec"]
            if new["spec"] != old["spec"]:
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            obj.patch(_removals(old, new))
            return aiohttp.web.json_response(obj.raw)

    def _proxy(self, request):
        path = "/" + request.subresource.removeprefix("proxy").lstrip("/")
        headers = request._raw_request.headers
        if headers.get("Authorization") != f"Bearer {self.token}":
            return self._status(401, "Unauthorized")
        forwarded = {k.lower(): v for k, v in headers.items() if k.lower() != "authorization"}
        image = self.serving.get(request.name.split(":")[0])
        if image is None:
            return self._status(503, "no endpoints available for service")
        key = self.api_keys.get(image)
        if key and path.startswith("/v1/") and forwarded.get("x-api-key") != key:
            return aiohttp.web.json_response(
                {"error": {"message": "missing or wrong API key", "type": "authentication_error"}},
                status=401)
        model = self.models[image]
        if path == "/ready":
            return aiohttp.web.json_response({"ready": True, "model": model})
        if path == "/v1/models":
            return aiohttp.web.json_response({"object": "list", "data": [{"id": model}]})
        if path == "/v1/completions":
            return aiohttp.web.json_response({"model": model, "choices": [{"text": " Paris."}]})
        if path == "/metrics":
            return aiohttp.web.Response(text='turbo_requests_total{endpoint="/ready"} 1.0\n')
        return self._status(404, f"no route {path}")

    # -- the controller -------------------------------------------------------------------
    async def control(self, period_s: float = 0.05) -> None:
        while True:
            async with self._lock:
                for key in list(self.objects):
                    resource, ns, name = key
                    if resource == DEPLOYMENTS and not self.objects[key].deleted:
                        self._reconcile(key, ns, name)
            await asyncio.sleep(period_s)

    def _reconcile(self, key, ns: str, name: str) -> None:
        obj = self.objects[key]
        dep = obj.raw
        want = dep["spec"].get("replicas", 1)
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        revs = self._revisions.setdefault(name, {})
        h = _template_hash(dep)
        st = dep.get("status") or {}
        if st.get("observedGeneration") != dep["metadata"]["generation"]:
            # a new template gets the next revision number (an old one re-used gets a new
            # number too, as a rollback does in Kubernetes)
            revs[h] = max(revs.values(), default=0) + 1
            self._ticks[name] = 0
            obj.patch({"metadata": {"annotations": {REVISION: str(revs[h])}},
                       "status": {"observedGeneration": dep["metadata"]["generation"],
                                  "replicas": want + (1 if name in self.serving else 0),
                                  "updatedReplicas": 0,
                                  "availableReplicas": want if name in self.serving else 0}})
            return
        self._ticks[name] += 1
        kind = self.behaviour.get(image, "stuck")
        pod_key = (PODS, ns, f"{name}-{h}")
        if kind in ("good", "wrong-model") and self._ticks[name] >= 2:
            obj.patch({"status": {"replicas": want, "updatedReplicas": want,
                                  "readyReplicas": want, "availableReplicas": want}})
            self.serving[name] = image
            for k in [k for k in self.objects if k[0] == PODS and not self.objects[k].deleted]:
                if k != pod_key:
                    self.objects[k].delete()
            self.objects[pod_key] = self._pod(dep, pod_key[2], image, None, 0)
        elif kind in ("stuck", "crash"):
            obj.patch({"status": {"updatedReplicas": 1}})
            restarts = self._ticks[name] // 2
            waiting = "CrashLoopBackOff" if kind == "crash" and restarts else "ContainerCreating"
            self.objects[pod_key] = self._pod(dep, pod_key[2], image, waiting, restarts)

    @staticmethod
    def _pod(dep: dict, name: str, image: str, waiting: str | None, restarts: int) -> dict:
        state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": dep["metadata"]["namespace"],
                             "labels": dep["spec"]["selector"]["matchLabels"]},
                "spec": {"containers": [{"name": "server", "image": image}]},
                "status": {"containerStatuses": [{"name": "server", "image": image,
                                                  "restartCount": restarts, "state": state}]}}


class RunningCluster:
    """The emulator served on 127.0.0.1 from a background thread (the rollout code under
    test is synchronous), with its controller ticking."""

    def __init__(self):
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with Cluster() as cluster, kmock.Server(cluster) as server:
            self.cluster, self.url = cluster, str(server.url).rstrip("/")
            task = asyncio.create_task(cluster.control())
            self._ready.set()
            await self._stop.wait()
            task.cancel()

    def __enter__(self) -> RunningCluster:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def kubeconfig(self, path, namespace: str = "default"):
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": self.cluster.token}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator",
                                                          "user": "tester",
                                                          "namespace": namespace}}]}))
        return path

    def deployment(self, ns: str, name: str = "turbo-attention") -> dict | None:
        key = (DEPLOYMENTS, ns, name)
        if key not in self.cluster.objects or self.cluster.objects[key].deleted:
            return None
        return copy.deepcopy(self.cluster.objects[key].raw)

    def patches(self) -> list[str]:
        """Paths of every write to the API (Service-proxy traffic excluded)."""
        return [p for m, p in self.cluster.calls
                if m in ("PATCH", "POST", "PUT", "DELETE") and "/proxy/" not in p]
