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
from starlette.exceptions import HTTPException as StarletteHTTPException

from turbo_core.serving.engine import Engine, Limits, Sampling
from turbo_core.serving.metrics import ServerMetrics
from turbo_core.serving.protocol import (
    ChatRequest,
    CompletionRequest,
    ErrorBody,
    GenerationRequest,
)
from turbo_core.serving.scheduler import QueueFull, Scheduler, TooLarge

READY_FRESH_S = 30.0  # a scheduler step this recent proves the engine works

# What a union field's errors say as one line (pydantic reports each branch of the union).
_FIELD_HINTS = {"prompt": "exactly one prompt per request: a non-empty string, or a list "
                          "holding one",
                "stop": "a non-empty string or a list of at most 4 non-empty strings"}


def _documented(*codes: int) -> dict[int | str, dict]:
    """OpenAPI responses: each error status with the body every error has."""
    why = {400: "body is not JSON, prompt over the token limit or the KV budget, or the model "
                "has no chat template", 401: "API key required and missing or wrong",
           404: "another model was asked for", 422: "a field is invalid (named in the message)",
           429: "queue full (Retry-After: 1)", 500: "generation failed",
           503: "generation cancelled (server shutting down)", 504: "request timeout reached"}
    return {code: {"model": ErrorBody, "description": why[code]} for code in codes}


_GENERATION_ERRORS = _documented(400, 401, 404, 422, 429, 500, 503, 504)
# with "stream": true: server-sent events, each "data:" a JSON chunk (the last one "[DONE]")
_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"},
                   "event": {"type": "string"}}}}}


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

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own errors (a body it cannot parse, an unknown route, a method not
        allowed) in the same body as every other error, their headers (Allow) kept."""
        return _error(exc.status_code, str(exc.detail), **dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "request body is not valid JSON")
        parts: dict[str, str] = {}
        for e in errors:
            loc = [str(x) for x in e.get("loc", ())[1:]]
            field = loc[0] if loc else "body"
            if field in _FIELD_HINTS:
                parts[field] = f"{field}: {_FIELD_HINTS[field]}"
            else:
                parts.setdefault(".".join(loc) or "body", f"{'.'.join(loc) or 'body'}: {e.get('msg')}")
        return _error(422, "; ".join(parts.values()))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "the engine cannot generate now"}})
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

    @app.get("/v1/models", responses=_documented(401))
    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                            "owned_by": "turbo-attention"}]}

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"description": "Prometheus text exposition format"}})
    async def prometheus() -> PlainTextResponse:
        body, content_type = metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.post("/v1/completions", responses={200: {"content": _STREAM}} | _GENERATION_ERRORS)
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt[0] if isinstance(req.prompt, list) else req.prompt
        return await _serve(req, request, lambda: engine.encode(prompt), chat=False)

    # A tokenizer without a chat template has no chat endpoint in the document (the route
    # still answers 400 saying so): a client generated from it does not offer chat.
    @app.post("/v1/chat/completions", include_in_schema=engine.has_chat_template,
              responses={200: {"content": _STREAM}} | _GENERATION_ERRORS)
    async def chat(req: ChatRequest, request: Request):
        messages = [m.model_dump() for m in req.messages]
        return await _serve(req, request, lambda: engine.encode_chat(messages), chat=True)

    async def _serve(req: GenerationRequest, request: Request, encode, chat: bool):
        if req.model is not None and req.model != engine.model_id:
            return _error(404, f"model {req.model!r} is not served here; use {engine.model_id!r}",
                          "model_not_found")
        max_tokens = req.max_new_tokens()
        for name in ("max_tokens", "max_completion_tokens"):  # each one given, used or not
            asked = getattr(req, name, None)
            if asked is not None and asked > limits.max_new_tokens:
                return _error(422, f"{name} {asked} exceeds the limit {limits.max_new_tokens}")
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

    def openapi() -> dict:
        """FastAPI's document with the server's own limit on new tokens in the schema."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for name, fields in (("CompletionRequest", ("max_tokens",)),
                                 ("ChatRequest", ("max_tokens", "max_completion_tokens"))):
                props = doc["components"]["schemas"].get(name, {}).get("properties", {})
                for field in fields:
                    for branch in props.get(field, {}).get("anyOf", []):
                        if branch.get("type") == "integer":
                            branch["maximum"] = limits.max_new_tokens
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
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
