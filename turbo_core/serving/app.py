"""FastAPI app: ``POST /v1/completions`` (OpenAI-compatible, SSE streaming), ``GET /v1/models``,
``/health`` (liveness), ``/ready`` (a real forward pass works), ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from turbo_core.serving.engine import Engine, Limits


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    seed: int | None = None
    stop: str | list[str] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v


def _error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status,
                        headers=headers or None)


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("turbo_requests_total", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.errors = Counter("turbo_request_errors_total", "requests answered with an error",
                              ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("turbo_request_latency_seconds", "completion latency",
                                 registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("turbo_generated_tokens_total", "generated tokens",
                              registry=self.registry)
        self.kv_bytes = Gauge("turbo_kv_cache_bytes", "bytes held by KV caches in use",
                              registry=self.registry)


def create_app(engine: Engine, limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    app = FastAPI(title="TurboAttention server", version="1")
    metrics = _Metrics()
    metrics.kv_bytes.set_function(lambda: engine.kv_bytes_in_use)
    slots = asyncio.Semaphore(limits.max_concurrency)
    state = {"waiting": 0, "ready": None}
    app.state.engine, app.state.limits, app.state.slots = engine, limits, slots

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path if request.url.path in _PATHS else "other"
        metrics.requests.labels(path, str(response.status_code)).inc()
        if response.status_code >= 400:
            metrics.errors.labels(path, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "request body is not valid JSON")
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                 for e in errors]
        return _error(422, "; ".join(parts))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if slots.locked():  # every slot generating: the model demonstrably works
            return JSONResponse({"ready": bool(state["ready"]), "busy": True},
                                status_code=200 if state["ready"] else 503)
        async with slots:
            try:
                ok = await asyncio.wait_for(asyncio.to_thread(engine.self_test), timeout=30)
            except (TimeoutError, RuntimeError) as exc:
                state["ready"] = False
                return JSONResponse({"ready": False, "error": str(exc)}, status_code=503)
        state["ready"] = ok
        return JSONResponse({"ready": ok, "model": engine.model_id}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "owned_by": "turbo-attention"}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        if req.model is not None and req.model != engine.model_id:
            return _error(404, f"model {req.model!r} is not served here; use {engine.model_id!r}",
                          "model_not_found")
        if req.max_tokens > limits.max_new_tokens:
            return _error(422, f"max_tokens {req.max_tokens} exceeds the limit "
                               f"{limits.max_new_tokens}")
        prompt = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        ids = engine.encode(prompt)
        if ids.shape[1] == 0:
            return _error(422, "prompt is empty")
        if ids.shape[1] > limits.max_prompt_tokens:
            return _error(400, f"prompt has {ids.shape[1]} tokens, the limit is "
                               f"{limits.max_prompt_tokens}")
        if slots.locked() and state["waiting"] >= limits.max_queue:
            return _error(429, "server busy: generation slots and queue are full", "overloaded",
                          **{"Retry-After": "1"})
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        state["waiting"] += 1
        try:
            await asyncio.wait_for(slots.acquire(), timeout=limits.request_timeout_s)
        except TimeoutError:
            return _error(503, "timed out waiting for a generation slot", "overloaded",
                          **{"Retry-After": "1"})
        finally:
            state["waiting"] -= 1
        cancel = threading.Event()
        deadline = time.monotonic() + limits.request_timeout_s
        gen = engine.stream(ids, req.max_tokens, req.temperature, req.top_p, req.seed, stops,
                            cancel, deadline)
        started = time.monotonic()

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": engine.model_id,
                    "choices": [{"index": 0, "text": text, "finish_reason": finish,
                                 "logprobs": None}]}

        def finish_metrics(n: int) -> None:
            metrics.tokens.inc(n)
            metrics.latency.observe(time.monotonic() - started)

        if req.stream:
            async def events():
                n = 0
                try:
                    while True:
                        item = await asyncio.to_thread(next, gen, None)
                        if item is None:
                            break
                        delta, finish = item
                        n += 0 if finish else 1
                        yield f"data: {json.dumps(chunk(delta, finish))}\n\n"
                        if finish:
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    cancel.set()
                    slots.release()
                    finish_metrics(n)
            return StreamingResponse(events(), media_type="text/event-stream")

        try:
            pieces = await asyncio.to_thread(lambda: list(gen))
        finally:
            cancel.set()
            slots.release()
        text = "".join(p for p, _ in pieces)
        n_out = sum(1 for _, f in pieces if f is None)
        finish_metrics(n_out)
        finish = next((f for _, f in pieces if f), "length")
        if finish == "timeout":
            return _error(504, f"generation exceeded the request timeout "
                               f"({limits.request_timeout_s:g} s)", "timeout")
        body = chunk(text, finish)
        body["usage"] = {"prompt_tokens": int(ids.shape[1]), "completion_tokens": n_out,
                         "total_tokens": int(ids.shape[1]) + n_out}
        return body

    return app


_PATHS = {"/v1/completions", "/v1/models", "/health", "/ready", "/metrics"}
