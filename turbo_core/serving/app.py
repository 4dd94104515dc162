"""FastAPI app over the batching scheduler: OpenAI ``POST /v1/completions`` and
``/v1/chat/completions`` (SSE streaming, ``usage``), ``GET /v1/models``, ``/health``
(liveness), ``/ready`` (the engine demonstrably generates), ``/metrics`` (Prometheus).

With an API key (``--api-key`` / ``TURBO_API_KEY``) every ``/v1`` route needs
``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (401 otherwise); probes and metrics stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from turbo_core.serving.engine import Engine, Limits, Sampling
from turbo_core.serving.metrics import ServerMetrics
from turbo_core.serving.protocol import ChatRequest, CompletionRequest, GenerationRequest
from turbo_core.serving.scheduler import QueueFull, Scheduler, TooLarge

READY_FRESH_S = 30.0  # a scheduler step this recent proves the engine works


def _error(status: int, message: str, kind: str = "invalid_request_error", **headers: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status,
                        headers=headers or None)


def create_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    limits = limits or Limits()
    metrics = ServerMetrics()
    holder: dict[str, Scheduler] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler = Scheduler(engine, limits, metrics.hooks())
        holder["s"] = app.state.scheduler = scheduler
        metrics.bind(scheduler)
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="TurboAttention server", version="2", lifespan=lifespan)
    app.state.engine, app.state.limits = engine, limits

    @app.middleware("http")
    async def guard_and_count(request: Request, call_next):
        path = request.url.path if request.url.path in _PATHS else "other"
        if api_key and request.url.path.startswith("/v1/") and not _authorized(request, api_key):
            response = _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                              "or 'X-API-Key: <key>'",
                              "authentication_error")
        else:
            response = await call_next(request)
        metrics.count(path, response.status_code)
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
        scheduler = holder["s"]
        last = scheduler.last_step_ok
        if last is not None and time.monotonic() - last < READY_FRESH_S:
            return JSONResponse({"ready": True, "model": engine.model_id, "running": scheduler.running})
        probe = engine.encode("ready")[:2] or [0]
        try:
            _, finish, _ = await asyncio.wait_for(asyncio.to_thread(
                scheduler.generate, probe, Sampling(max_tokens=1)), timeout=30)
        except (TimeoutError, QueueFull, ValueError) as exc:
            return JSONResponse({"ready": False, "error": f"{type(exc).__name__}: {exc}"},
                                status_code=503)
        ok = finish in ("length", "stop")
        return JSONResponse({"ready": ok, "model": engine.model_id, "probe": finish},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "owned_by": "turbo-attention"}]}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        return await _serve(req, request, lambda: engine.encode(prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [m.model_dump() for m in req.messages]
        return await _serve(req, request, lambda: engine.encode_chat(messages), chat=True)

    async def _serve(req: GenerationRequest, request: Request, encode, chat: bool):
        if req.model is not None and req.model != engine.model_id:
            return _error(404, f"model {req.model!r} is not served here; use {engine.model_id!r}",
                          "model_not_found")
        max_tokens = req.max_new_tokens()
        if max_tokens > limits.max_new_tokens:
            return _error(422, f"max_tokens {max_tokens} exceeds the limit {limits.max_new_tokens}")
        try:
            ids = encode()
        except ValueError as exc:
            return _error(400, str(exc))
        if not ids:
            return _error(422, "prompt is empty")
        if len(ids) > limits.max_prompt_tokens:
            return _error(400, f"prompt has {len(ids)} tokens, the limit is {limits.max_prompt_tokens}")
        sampling = Sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                            seed=req.seed, stop=tuple(req.stops()), ignore_eos=req.ignore_eos)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            handle = holder["s"].submit(ids, sampling,
                                        lambda item: loop.call_soon_threadsafe(events.put_nowait, item))
        except TooLarge as exc:
            return _error(400, str(exc))
        except QueueFull as exc:
            return _error(429, str(exc), "overloaded", **{"Retry-After": "1"})
        shape = _Shape(chat, engine.model_id, len(ids))
        started = time.monotonic()
        if req.stream:
            return StreamingResponse(_events(shape, handle, events, req.include_usage(), metrics,
                                             started), media_type="text/event-stream")
        parts, finish = [], None
        try:
            while finish is None:
                try:
                    delta, finish = await asyncio.wait_for(events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        handle.cancel()
                        return _error(499, "client closed the request", "cancelled")
                    continue
                if finish is None:
                    parts.append(delta)
        finally:
            handle.cancel()  # no-op once finished; frees the sequence if this task was cancelled
        metrics.finished(len(parts), time.monotonic() - started)
        if finish == "timeout":
            return _error(504, f"generation exceeded the request timeout "
                               f"({limits.request_timeout_s:g} s)", "timeout")
        if finish.startswith("error") or finish == "cancelled":
            return _error(500 if finish.startswith("error") else 503, f"generation failed: {finish}",
                          "server_error")
        body = shape.chunk("".join(parts), finish, whole=True)
        body["usage"] = shape.usage(len(parts))
        return body

    return app


class _Shape:
    """The OpenAI response objects of one request (completion or chat, whole or chunk)."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int):
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def chunk(self, text: str, finish: str | None, whole: bool = False) -> dict:
        if self.chat:
            obj = "chat.completion" if whole else "chat.completion.chunk"
            key = "message" if whole else "delta"
            choice = {"index": 0, key: {"role": "assistant", "content": text},
                      "finish_reason": finish, "logprobs": None}
        else:
            obj = "text_completion"
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}


async def _events(shape: _Shape, handle, events: asyncio.Queue, include_usage: bool,
                  metrics: ServerMetrics, started: float):
    """SSE: one chunk per token, the last with its finish reason, optional usage, [DONE]."""
    n = 0
    try:
        while True:
            delta, finish = await events.get()
            if finish is None:
                n += 1
            yield f"data: {json.dumps(shape.chunk(delta, finish))}\n\n"
            if finish is not None:
                break
        if include_usage:
            tail = shape.chunk("", None) | {"choices": [], "usage": shape.usage(n)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a client that went away frees its sequence at the next step
        metrics.finished(n, time.monotonic() - started)


def _authorized(request: Request, key: str) -> bool:
    """``Authorization: Bearer <key>`` (what OpenAI clients send) or ``X-API-Key: <key>``: the
    Kubernetes API server's Service proxy consumes ``Authorization`` for itself and forwards
    other headers (kubernetes/kubernetes#38775), so the rollout's verify sends the second."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
        return True
    return hmac.compare_digest(request.headers.get("x-api-key", "").strip().encode(), key.encode())


_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}
