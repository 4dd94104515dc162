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

from turbo_core.stats import percentile

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
    # the bounded load: `load_requests` completions from `load_clients` concurrent clients,
    # `load_max_tokens` each; gated on the p95 request latency (None: no load step)
    max_p95_latency_s: float | None = None
    load_clients: int = 4
    load_requests: int = 8
    load_max_tokens: int = 16
    load_prompt: str = ("Summarize the following in one sentence: the nightly pipeline "
                        "calibrates, evaluates, gates, builds, rolls out and verifies.")


API_KEY_ENV = "TURBO_API_KEY"  # the server's key, sent when set (as `turbo serve` reads it)


def auth_headers(header: str = "Authorization") -> dict[str, str]:
    """The server's key as ``Authorization: Bearer`` (direct HTTP) or as ``X-API-Key`` (through
    the Kubernetes Service proxy, which keeps ``Authorization`` for the API server); none when
    no key is set."""
    key = os.environ.get(API_KEY_ENV)
    if not key:
        return {}
    return {"Authorization": f"Bearer {key}"} if header == "Authorization" else {header: key}


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

    def load() -> str:
        report = bounded_load(request, cfg)
        out["load"] = report
        assert report["errors"] == 0, f"{report['errors']} of {report['requests']} requests " \
            f"failed under load: {report['first_error']}"
        assert report["p95_latency_s"] <= cfg.max_p95_latency_s, (
            f"p95 latency {report['p95_latency_s']:.2f} s > bound {cfg.max_p95_latency_s:g} s "
            f"({report['requests']} requests, {cfg.load_clients} concurrent, "
            f"{cfg.load_max_tokens} tokens each)")
        return f"p95 {report['p95_latency_s']:.2f} s, p50 {report['p50_latency_s']:.2f} s"

    steps = [("ready", ready), ("models", models), ("completion", completion),
             ("metrics", metrics)]
    if cfg.max_p95_latency_s is not None:
        steps.append(("load", load))
    for name, fn in steps:
        check(name, fn)
    out["ok"] = all(c["ok"] for c in checks)
    out["failed"] = [f"{c['name']}: {c['detail']}" for c in checks if not c["ok"]]
    return out


def bounded_load(request: Request, cfg: VerifyConfig) -> dict:
    """``cfg.load_requests`` greedy completions of ``cfg.load_max_tokens`` tokens (EOS ignored)
    from ``cfg.load_clients`` threads through ``request``; latency percentiles as
    ``turbo bench serve`` computes them (:func:`turbo_core.stats.percentile`)."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": cfg.load_prompt, "max_tokens": cfg.load_max_tokens, "temperature": 0,
            "ignore_eos": True}

    def one(i: int) -> tuple[float, int, bytes]:
        start = time.monotonic()
        try:
            status, reply = request("POST", "/v1/completions", body | {"seed": i})
        except OSError as exc:
            status, reply = 0, str(exc).encode()
        return time.monotonic() - start, status, reply

    t0 = time.monotonic()
    with ThreadPoolExecutor(cfg.load_clients) as pool:
        results = list(pool.map(one, range(cfg.load_requests)))
    wall = time.monotonic() - t0
    lat = [t for t, status, _ in results if status == 200]
    bad = [(status, reply[:200]) for _, status, reply in results if status != 200]
    return {"requests": len(results), "clients": cfg.load_clients, "errors": len(bad),
            "first_error": f"{bad[0][0]}: {bad[0][1]!r}" if bad else None,
            "p50_latency_s": percentile(lat, 0.5),
            "p95_latency_s": percentile(lat, 0.95) if lat else float("inf"),
            "tokens_per_s": len(lat) * cfg.load_max_tokens / wall if wall > 0 else 0.0}
