"""The pipeline's parameters: one JSON schema for the Airflow Params form and for validating
a run's ``conf`` before any work starts. Torch-free."""

from __future__ import annotations

from turbo_core.attention.variants import VARIANTS
from turbo_core.rollout import TARGETS
from turbo_core.tracking.gates import Gate, GateSet

# name → JSON schema (with default, title, description): Airflow renders each as a form field.
PARAMS: dict[str, dict] = {
    "model": {"type": "string", "minLength": 1, "default": "smollm2", "title": "Base model",
              "description": "'smollm2' (bundled SmolLM2-135M-Instruct), a local .gguf "
                             "file or a local Hugging Face model directory"},
    "variants": {"type": "array", "minItems": 1, "uniqueItems": True,
                 "items": {"type": "string", "enum": list(VARIANTS)},
                 "examples": list(VARIANTS), "default": ["turbo-int4", "turbo-mix"],
                 "title": "Variants", "description": "TurboAttention variants to calibrate, "
                                                     "evaluate and gate"},
    "max_ppl_delta_pct": {"type": "number", "minimum": 0, "default": 8.0,
                          "title": "Gate: max perplexity increase (%)"},
    "min_top1_agreement": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.8,
                           "title": "Gate: min top-1 agreement with FP16"},
    "min_kv_compression": {"type": "number", "minimum": 1, "default": 1.0,
                           "title": "Gate: min KV-cache compression vs FP16"},
    "max_kl": {"type": "number", "minimum": 0, "default": 0.1,
               "title": "Gate: max mean KL(baseline ‖ variant) per token (nats)"},
    "min_decode_speedup": {"type": "number", "minimum": 0, "default": 1.0,
                           "title": "Gate: min decode speed-up vs the float baseline",
                           "description": "variant decode tokens/s ÷ the float engine's, same "
                                          "process, median of the rounds; 1 = not slower"},
    "min_prefill_speedup": {"type": "number", "minimum": 0, "default": 0.0,
                            "title": "Gate: min prefill speed-up vs the float baseline (0: off)"},
    "min_retrieval": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.0,
                      "title": "Gate: min retrieval accuracy (passkey + multi-key needle)"},
    "min_retrieval_kept": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.9,
                           "title": "Gate: min share of the baseline's correct retrievals kept",
                           "description": "read against the 95 % upper confidence bound over "
                                          "the prompts the baseline recalls: fails only when "
                                          "they show the variant keeps less (one lost prompt "
                                          "never does)"},
    "max_p95_latency_s": {"type": "number", "exclusiveMinimum": 0, "default": 60.0,
                          "title": "Verify: max p95 request latency under the bounded load (s)",
                          "description": "after deployment: 8 completions of 16 tokens from 4 "
                                         "concurrent clients; above it, the run rolls back"},
    "speed_context": {"type": "integer", "minimum": 16, "default": 1024,
                      "title": "Speed: context tokens per sequence"},
    "speed_batch": {"type": "integer", "minimum": 1, "default": 4,
                    "title": "Speed: sequences decoded together"},
    "speed_repeats": {"type": "integer", "minimum": 5, "default": 5,
                      "title": "Speed: rounds (the median is gated)"},
    "retrieval_lengths": {"type": "array", "minItems": 1,
                          "items": {"type": "integer", "minimum": 128},
                          "default": [1024, 2048, 4096, 8192],
                          "title": "Retrieval: prompt lengths (tokens; capped at the model's limit)"},
    "retrieval_samples": {"type": "integer", "minimum": 1, "default": 1,
                          "title": "Retrieval: prompts per task and length"},
    "eval_tokens": {"type": "integer", "minimum": 16, "default": 8192,
                    "title": "Held-out tokens per evaluation"},
    "eval_window": {"type": "integer", "minimum": 16, "default": 1024,
                    "title": "Evaluation window (tokens)"},
    "calib_tokens": {"type": "integer", "minimum": 16, "default": 4096,
                     "title": "Calibration tokens"},
    "deploy_target": {"type": "string", "enum": list(TARGETS), "default": "none",
                      "title": "Deploy target"},
    "image_repository": {"type": "string", "pattern": r"^[^\s:@]+(:[0-9]+)?(/[^\s:@]+)*$",
                         "default": "127.0.0.1:5000/turbo-attention",
                         "title": "Image repository (no tag)"},
    "base_image": {"type": "string", "minLength": 1, "default": "turbo-base:bookworm-py311-gxx-pydev",
                   "title": "Serving image base",
                   "description": "production: a CUDA PyTorch runtime image; the default is "
                                  "the local debootstrap base (docker/base/make_base.sh)"},
    "overlay": {"type": "string", "enum": ["gpu", "cpu-dev"], "default": "gpu",
                "title": "Kubernetes overlay"},
    "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                  "default": "default", "title": "Kubernetes namespace"},
    "serve_port": {"type": "integer", "minimum": 1, "maximum": 65535, "default": 8000,
                   "title": "Docker target: serving port on this host"},
}

SCHEMA = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
          "properties": PARAMS, "additionalProperties": False}


def defaults() -> dict:
    return {k: v["default"] for k, v in PARAMS.items()}


def validate(conf: dict | None) -> dict:
    """``conf`` merged over the defaults and checked; ValueError naming every bad field."""
    import jsonschema

    if conf is not None and not isinstance(conf, dict):
        raise ValueError(f"pipeline parameters must be a JSON object, got {type(conf).__name__}")
    merged = defaults() | (conf or {})
    validator = jsonschema.Draft202012Validator(SCHEMA)
    problems = sorted(validator.iter_errors(merged), key=lambda e: list(e.path))
    if problems:
        lines = [f"{'/'.join(str(p) for p in e.path) or '(top level)'}: {e.message}"
                 for e in problems]
        raise ValueError("bad pipeline parameters:\n  " + "\n  ".join(lines))
    return merged


def gates(params: dict) -> GateSet:
    """The run's gates from its (validated) parameters; a floor of 0 on a speed-up or an
    accuracy is no gate at all (left out)."""
    optional = [Gate("prefill_speedup", threshold=params["min_prefill_speedup"]),
                Gate("retrieval_accuracy", threshold=params["min_retrieval"])]
    return GateSet((
        Gate("ppl_delta_pct", threshold=params["max_ppl_delta_pct"], greater_is_better=False),
        Gate("top1_agreement", threshold=params["min_top1_agreement"]),
        Gate("kv_compression", threshold=params["min_kv_compression"]),
        Gate("kl_mean", threshold=params["max_kl"], greater_is_better=False),
        Gate("decode_speedup", threshold=params["min_decode_speedup"]),
        Gate("retrieval_kept_upper", threshold=params["min_retrieval_kept"],
             shows=("retrieval_kept", "retrieval_known")),
        *[g for g in optional if g.threshold],
    ))


def default_gates() -> GateSet:
    """The gates at the parameters' defaults (what ``turbo evaluate`` applies)."""
    return gates(defaults())

