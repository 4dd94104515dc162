"""``turbo serve``: the OpenAI-compatible server for one variant, batching requests."""

from __future__ import annotations

import argparse
import os
import sys
import time

API_KEY_ENV = "TURBO_API_KEY"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from turbo_core.serving.app import create_app
    from turbo_core.serving.engine import Engine, Limits, parse_bytes

    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_batch=args.max_batch, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout, kv_budget=parse_bytes(args.kv_budget),
                    prefill_chunk=args.prefill_chunk, prefill_per_step=args.prefill_per_step)
    if args.model_uri:
        if args.plan:
            raise ValueError("--model-uri carries its own plan; do not combine it with --plan")
        engine = Engine.from_mlflow(args.model_uri, device=args.device, compile=args.compile)
    else:
        engine = Engine.from_files(args.model, args.variant, args.plan, args.device, args.dtype,
                                   compile=args.compile)
    how = "compiling the decode step (cached on disk)" if engine.compiled else "decode step not compiled"
    print(f"warming up {engine.model_id} on {engine.device} ({engine.dtype}): a page of prompt "
          f"and decode steps through its cache, {how}", file=sys.stderr)
    t0 = time.perf_counter()
    if not engine.warm_up():
        raise SystemExit(f"turbo serve: {engine.model_id} produced non-finite logits")
    print(f"warm in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    if args.warm_up_only:  # e.g. the image build: compiled code into $TURBO_HOME, then exit
        return 0
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    budget = f"KV budget {limits.kv_budget} bytes" if limits.kv_budget else "no KV budget"
    print(f"serving {engine.model_id} on http://{args.host}:{args.port} (batch <= "
          f"{limits.max_batch}, {budget}, API key {'required' if key else 'off'})", file=sys.stderr)
    uvicorn.run(create_app(engine, limits, api_key=key), host=args.host, port=args.port,
                log_level="info")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible server for one variant (continuous batching)")
    sv.add_argument("--model", default="smollm2", help="base model ('smollm2' or a local dir)")
    sv.add_argument("--variant", default="turbo-int4")
    sv.add_argument("--plan", help="bit plan JSON (required for mixed-precision variants)")
    sv.add_argument("--model-uri", help="an MLflow model URI instead, e.g. models:/NAME@champion")
    sv.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="cuda serves with the Triton kernels; auto = cuda when visible")
    sv.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    sv.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compile the decode step with Inductor (default: on CPU where a C++ "
                         "compiler exists; --no-compile runs the same step eagerly)")
    sv.add_argument("--warm-up-only", action="store_true",
                    help="load, warm up (compiling the decode step into $TURBO_HOME) and exit")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' on /v1 "
                         f"(or ${API_KEY_ENV})")
    sv.add_argument("--kv-budget", help="admit requests while their KV bytes fit, e.g. 512MiB")
    sv.add_argument("--max-batch", type=int, default=16, help="sequences decoding together")
    sv.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    sv.add_argument("--max-prompt-tokens", type=int, default=2048)
    sv.add_argument("--max-new-tokens", type=int, default=512)
    sv.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward")
    sv.add_argument("--prefill-per-step", type=int, default=2048,
                    help="prompt tokens between two decode steps")
    sv.add_argument("--request-timeout", type=float, default=300.0, help="seconds")
    sv.set_defaults(func=_serve)
