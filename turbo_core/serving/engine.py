"""What the server runs: one model + variant + plan on one device, its caches, and sampling.

The :class:`~turbo_core.serving.scheduler.Scheduler` batches requests over one shared
:class:`~turbo_core.hf.cache.TurboCache`; this module knows nothing of HTTP or threads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant, get_variant
from turbo_core.hf import models
from turbo_core.hf.runner import CacheRunner

DTYPES = ("float32", "float16", "bfloat16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | None) -> int | None:
    """``"512MiB"`` / ``"2GB"`` / ``"1048576"`` -> bytes; ``None`` stays ``None``."""
    if text is None or isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"KV budget {text!r} is not a size like 512MiB, 2GB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


@dataclass(frozen=True)
class Limits:
    """Server limits; requests beyond them are refused with a 4xx, never a 500.

    ``max_batch`` sequences decode together; ``kv_budget`` (bytes, ``None`` = unlimited)
    admits a request only when its prompt + ``max_tokens`` fit beside the running ones at the
    variant's bytes per sequence; others wait in a queue of ``max_queue`` (full: 429).
    A prompt runs in forwards of ``prefill_chunk`` tokens (512: BLAS-sized for the CPU prefill
    path and SDPA, measured fastest on our CPU), at most ``prefill_per_step`` prompt tokens
    between two decode steps — a long prompt delays the running batch by one budget, not by
    its whole length.
    """

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_batch: int = 16
    max_queue: int = 64
    request_timeout_s: float = 300.0
    kv_budget: int | None = None
    prefill_chunk: int = 512
    prefill_per_step: int = 2048

    def __post_init__(self) -> None:
        counts = (self.max_prompt_tokens, self.max_new_tokens, self.max_batch,
                  self.prefill_chunk, self.prefill_per_step)
        if min(counts) < 1 or self.prefill_per_step < self.prefill_chunk or self.max_queue < 0 \
                or self.request_timeout_s <= 0 or (self.kv_budget is not None and self.kv_budget < 1):
            raise ValueError(f"invalid server limits: {self}")


@dataclass(frozen=True)
class Sampling:
    """Per-request decoding: greedy at temperature 0, else seeded top-p sampling."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if self.seed is not None else 0)

    def pick(self, logits: torch.Tensor, gen: torch.Generator) -> int:
        """The next token from one row of logits ``(vocab,)``."""
        logits = logits.float().cpu()
        if self.temperature <= 0:
            return int(logits.argmax())
        # shifted by the maximum first: a temperature near 0 then sends the others to -inf
        # (probability 0), never the maximum to inf (inf - inf is NaN)
        scaled = (logits.double() - logits.max()) / self.temperature
        probs = torch.softmax(scaled, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < self.top_p
            keep[0] = True  # the nucleus holds the likeliest token however small top_p is
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def resolve_device(spec: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``auto`` (CUDA when this torch sees a GPU) -> a device, or a clear
    refusal when CUDA is asked for and absent."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec not in ("cpu", "cuda"):
        raise ValueError(f"device {spec!r}: use cpu, cuda or auto")
    if spec == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda, but this torch ({torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}) sees no CUDA device; use --device cpu "
                         f"or auto, or run the GPU image on a node with a GPU")
    return torch.device(spec)


class Engine(CacheRunner):
    """The model, switched to the variant's attention, the caches it decodes with (both from
    :class:`~turbo_core.hf.runner.CacheRunner`), and its text side."""

    def __init__(self, lm: models.LoadedModel, variant: Variant, plan: BitPlan | None,
                 device: str | torch.device = "cpu", compile: bool | None = None):
        super().__init__(lm, variant, plan,
                         resolve_device(device) if isinstance(device, str) else device, compile)
        self.model_id = f"{lm.name}:{variant.name}"

    @classmethod
    def from_files(cls, model: str | None, variant: str, plan: str | None,
                   device: str = "cpu", dtype: str = "float32", compile: bool | None = None) -> Engine:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dev = resolve_device(device)  # refuse before the weights load
        return cls(models.load(model, dtype=dtype), get_variant(variant),
                   BitPlan.load(plan) if plan else None, dev, compile)

    @classmethod
    def from_mlflow(cls, uri: str, device: str = "cpu", compile: bool | None = None) -> Engine:
        import mlflow.pyfunc

        from turbo_core.tracking import runs as tracking

        dev = resolve_device(device)
        tracking.configure()
        wrapped = mlflow.pyfunc.load_model(uri).unwrap_python_model()
        return cls(wrapped.lm, wrapped.variant, wrapped.plan, dev, compile)

    # -- text --------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        return self.lm.tokenizer.eos_token_id

    def encode(self, prompt: str) -> list[int]:
        return list(self.lm.tokenizer(prompt)["input_ids"])

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.lm.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokenizer's chat template with the assistant's turn opened."""
        tok = self.lm.tokenizer
        if not self.has_chat_template:
            raise ValueError(f"the tokenizer of {self.lm.name} has no chat template; "
                             f"use /v1/completions")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    # -- forward passes ----------------------------------------------------------------------
    def self_test(self, tokens: int = 2) -> bool:
        """A real prefill of ``tokens`` for two sequences, then a decode step of one and one of
        both through the variant's cache. :meth:`warm_up` runs it long enough to fill a page;
        with ``compile`` the two steps compile the decode graph for batch 1 and for any larger
        batch (a minute cold, seconds from the on-disk cache) before the first request."""
        ids = (self.encode("ready " * tokens) * tokens)[:tokens]
        cache = self.new_cache()
        seqs = [cache.add_sequence() for _ in range(2)]
        for s in seqs:
            logits = self.forward(cache, [s], [ids], [0])
        nxt = int(logits[0].argmax())
        logits = self.forward(cache, seqs[:1], [[nxt]], [len(ids)])
        ok = bool(torch.isfinite(logits).all())
        logits = self.forward(cache, seqs, [[nxt], [nxt]], [len(ids) + 1, len(ids)])
        return ok and bool(torch.isfinite(logits).all())

    def warm_up(self) -> bool:
        return self.self_test(tokens=self.variant.kv.chunk + 2)
