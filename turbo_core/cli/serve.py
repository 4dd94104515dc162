"""``turbo serve``: the OpenAI-compatible server for one variant."""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from turbo_core.serving.app import create_app
    from turbo_core.serving.engine import Engine, Limits

    limits = Limits(max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout)
    if args.model_uri:
        if args.plan:
            raise ValueError("--model-uri carries its own plan; do not combine it with --plan")
        engine = Engine.from_mlflow(args.model_uri)
    else:
        engine = Engine.from_files(args.model, args.variant, args.plan)
    print(f"warming up {engine.model_id} (a page of prompt and a decode step through its cache)",
          file=sys.stderr)
    if not engine.warm_up():
        raise SystemExit(f"turbo serve: {engine.model_id} produced non-finite logits")
    print(f"serving {engine.model_id} on http://{args.host}:{args.port}", file=sys.stderr)
    uvicorn.run(create_app(engine, limits), host=args.host, port=args.port, log_level="info")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible completions server for one variant")
    sv.add_argument("--model", default="smollm2", help="base model ('smollm2' or a local dir)")
    sv.add_argument("--variant", default="turbo-int4")
    sv.add_argument("--plan", help="bit plan JSON (required for mixed-precision variants)")
    sv.add_argument("--model-uri", help="an MLflow model URI instead, e.g. models:/NAME@champion")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-prompt-tokens", type=int, default=2048)
    sv.add_argument("--max-new-tokens", type=int, default=512)
    sv.add_argument("--max-concurrency", type=int, default=1)
    sv.add_argument("--max-queue", type=int, default=8)
    sv.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    sv.set_defaults(func=_serve)
