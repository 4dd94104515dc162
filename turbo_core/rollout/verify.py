"""Verify a running server the way a client sees it: ready, serves the expected model,
answers a deterministic completion within a latency bound, exposes metrics.

``request(method, path, body) -> (status, bytes)`` abstracts the transport: plain HTTP for
the docker target, the API server's Service proxy for Kubernetes.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

Request = Callable[[str, str, dict | None], tuple[int, bytes]]


def served_model_id(model: str | None, variant: str | None) -> str | None:
    """The id ``turbo serve`` lists in /v1/models for a model and variant (the serving
    engine's ``MODEL:VARIANT``); None when either is unknown."""
    return f"{model}:{variant}" if model and variant else None


@dataclass(frozen=True)
class VerifyConfig:
    expected_model: str | None = None  # None: accept whatever single model is served
    prompt: str = "The capital of France is"
    max_tokens: int = 8
    max_latency_s: float = 30.0
    metric: str = "turbo_requests_total"  # must appear in /metrics


API_KEY_ENV = "TURBO_API_KEY"  # the server's key, sent when set (as `turbo serve` reads it)


def auth_headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


def http_request(base_url: str, timeout_s: float = 60.0) -> Request:
    def request(method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **auth_headers()})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
    return request


def verify(request: Request, cfg: VerifyConfig = VerifyConfig()) -> dict:
    """Run every check (none stops the others); ``ok`` only if all pass."""
    checks: list[dict] = []
    out: dict = {"checks": checks}

    def check(name: str, fn: Callable[[], str]) -> None:
        start = time.monotonic()
        try:
            detail, ok = fn(), True
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        checks.append({"name": name, "ok": ok, "detail": detail,
                       "seconds": round(time.monotonic() - start, 3)})

    def ready() -> str:
        status, body = request("GET", "/ready", None)
        assert status == 200, f"/ready answered {status}: {body[:300]!r}"
        return "ready"

    def models() -> str:
        status, body = request("GET", "/v1/models", None)
        assert status == 200, f"/v1/models answered {status}"
        ids = [m["id"] for m in json.loads(body)["data"]]
        out["served_models"] = ids
        want = cfg.expected_model
        assert (want in ids) if want else len(ids) == 1, f"serves {ids}, expected {want!r}"
        return ", ".join(ids)

    def completion() -> str:
        texts, latencies = [], []
        for _ in range(2):  # temperature 0 twice: the same text both times
            start = time.monotonic()
            status, body = request("POST", "/v1/completions", {
                "prompt": cfg.prompt, "max_tokens": cfg.max_tokens, "temperature": 0})
            latencies.append(time.monotonic() - start)
            assert status == 200, f"/v1/completions answered {status}: {body[:300]!r}"
            texts.append(json.loads(body)["choices"][0]["text"])
        out["completion"], out["latency_s"] = texts[0], round(max(latencies), 3)
        assert texts[0], "empty completion"
        assert texts[0] == texts[1], f"temperature 0 gave two texts: {texts}"
        assert max(latencies) <= cfg.max_latency_s, (
            f"completion took {max(latencies):.2f} s > bound {cfg.max_latency_s:g} s")
        return f"{texts[0]!r} in {max(latencies):.2f} s"

    def metrics() -> str:
        status, body = request("GET", "/metrics", None)
        assert status == 200, f"/metrics answered {status}"
        assert cfg.metric.encode() in body, f"/metrics lacks {cfg.metric}"
        return f"{len(body)} bytes"

    for name, fn in (("ready", ready), ("models", models), ("completion", completion),
                     ("metrics", metrics)):
        check(name, fn)
    out["ok"] = all(c["ok"] for c in checks)
    out["failed"] = [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]
    return out
