"""Evaluation of a variant against the float baseline on held-out text.

Perplexity is measured over non-overlapping windows of ``window`` tokens. With a quantized KV
cache each window is fed in slices of ``chunk`` tokens through :class:`~turbo_core.hf.cache.TurboCache`,
so every token attends to the most recent tokens at INT8 and to older ones at their plan bits —
exactly what it sees during decoding — instead of a full-precision prefill that would hide the
cache's error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant, get_variant
from turbo_core.hf import speed
from turbo_core.hf.attention import ATTN_NAME, enable, sas_zero_fraction
from turbo_core.hf.cache import TurboCache, cache_bytes
from turbo_core.hf.calibrate import token_ids
from turbo_core.hf.contenders import EngineContender, HFCacheContender
from turbo_core.hf.data import TextSplit
from turbo_core.hf.features import layer_windows, text_config
from turbo_core.hf.models import LoadedModel
from turbo_core.hf.retrieval import RetrievalSettings
from turbo_core.hf.speed import SpeedSettings

log = logging.getLogger(__name__)

FP16_BYTES = 2


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate: ``max_tokens`` of held-out text in windows of ``window`` (perplexity,
    agreement, KL), the speed measurement and the retrieval tasks (either ``None``: not run)."""

    max_tokens: int = 8192
    window: int = 1024
    speed: SpeedSettings | None = field(default_factory=SpeedSettings)
    retrieval: RetrievalSettings | None = field(default_factory=RetrievalSettings)

    def __post_init__(self) -> None:
        if self.window < 16 or self.max_tokens < self.window:
            raise ValueError(f"need window >= 16 and max_tokens >= window, got window={self.window}, "
                             f"max_tokens={self.max_tokens}")


@dataclass
class WindowScores:
    nll_sum: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.nll_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        self.tokens += int(targets.numel())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def token_kl(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ out) of each row's next-token distribution, in nats, from logits ``(T, vocab)``."""
    logp = F.log_softmax(ref.double(), -1)
    logq = F.log_softmax(out.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def eval_windows(ids: torch.Tensor, settings: EvalSettings) -> list[torch.Tensor]:
    """Non-overlapping windows of ``settings.window`` tokens covering ``max_tokens``."""
    need = settings.max_tokens
    if ids.numel() < need:
        raise ValueError(f"held-out text has {ids.numel()} tokens, the evaluation needs "
                         f"{need} (max_tokens); use a longer --text or a smaller --max-tokens")
    ids = ids[:need]
    n = need // settings.window
    return [ids[i * settings.window:(i + 1) * settings.window] for i in range(n)]


def _float_cache_bytes(lm: LoadedModel, tokens: int) -> int:
    """FP16 K/V bytes of ``tokens`` tokens as transformers' own cache holds them: a sliding
    layer keeps its newest ``window - 1`` (``DynamicSlidingWindowLayer``)."""
    s = lm.shape
    held = sum(tokens if w is None else min(tokens, w - 1) for w in layer_windows(lm.model.config))
    return 2 * s.num_kv_heads * s.head_dim * FP16_BYTES * held


@torch.no_grad()
def _dynamic_cache_bytes(lm: LoadedModel, ids: torch.Tensor) -> int:
    """Bytes of transformers' float cache after a forward of ``ids``: the model's own dtype."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    lm.model(ids.unsqueeze(0), past_key_values=cache, use_cache=True)
    return cache_bytes(cache)


@dataclass(frozen=True)
class _Runner:
    """How one contender computes logits: attention implementation and cache factory."""

    name: str
    attn: str  # "turbo" or "sdpa"
    new_cache: Callable[[], object] | None  # None: float cache (full-window forward)
    chunk: int

    @torch.no_grad()
    def logit_slices(self, lm: LoadedModel, window: torch.Tensor,
                     filled: list[object]) -> Iterator[torch.Tensor]:
        """The window's logits ``(chunk, vocab)`` slice by slice — never the whole window's at
        once (4096 tokens x a 262k vocabulary is 4.3 GB) — fed through a new cache in slices of
        ``chunk`` tokens, which ends up in ``filled``; without a cache, one full-window forward
        whose head runs slice by slice."""
        lm.model.set_attn_implementation(self.attn)
        ids = window.unsqueeze(0)
        if self.new_cache is None:
            yield from head_slices(lm, ids, self.chunk)
            return
        cache = self.new_cache()
        filled.append(cache)
        for s in range(0, ids.shape[1], self.chunk):
            yield lm.model(ids[:, s:s + self.chunk], cache=cache, use_cache=True).logits[0]

    @torch.no_grad()
    def fill(self, lm: LoadedModel, window: torch.Tensor) -> object:
        """A new cache holding ``window`` (fed as for :meth:`logit_slices`, last logits only)."""
        lm.model.set_attn_implementation(self.attn)
        cache = self.new_cache()
        for s in range(0, window.numel(), self.chunk):
            lm.model(window[None, s:s + self.chunk], cache=cache, use_cache=True, logits_to_keep=1)
        return cache


@torch.no_grad()
def head_slices(lm: LoadedModel, ids: torch.Tensor, step: int) -> Iterator[torch.Tensor]:
    """Logits ``(step, vocab)`` of one plain forward of ``ids (1, L)`` in slices of positions:
    the decoder runs once, the output head (and a final logit soft-cap, Gemma's) per slice."""
    hidden = lm.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
    head = lm.model.get_output_embeddings()
    cap = getattr(text_config(lm.model.config), "final_logit_softcapping", None)
    for s in range(0, hidden.shape[0], step):
        logits = head(hidden[s:s + step])
        yield logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def check_head_slices(lm: LoadedModel, ids: torch.Tensor) -> None:
    """Refuse, naming it, a model whose logits are not its output head over the decoder's last
    hidden state (a scale or processing :func:`head_slices` does not know): compared with the
    model's own forward on ``ids (1, L)``."""
    want = lm.model(ids).logits[0]
    got = torch.cat(list(head_slices(lm, ids, 16)))
    if not torch.allclose(want, got, atol=1e-4 * max(1.0, float(want.abs().max())), rtol=1e-4):
        raise ValueError(f"{type(lm.model).__name__}'s logits are not its output head over the "
                         f"decoder's last hidden state (max difference "
                         f"{float((want - got).abs().max()):.3g}); evaluating it slice by slice "
                         f"is not supported")


def _measure(lm: LoadedModel, runner: _Runner, contender, split: TextSplit,
             settings: EvalSettings, progress: bool) -> dict[str, object]:
    """Windows (perplexity, agreement, KL) with ``runner``, then speed and retrieval of
    ``contender`` against the float engine."""
    ids = token_ids(lm.tokenizer, split.evaluation)
    windows = eval_windows(ids, settings)
    base, var = WindowScores(), WindowScores()
    agree = 0
    kl = []
    held = None
    try:
        lm.model.set_attn_implementation("sdpa")
        check_head_slices(lm, windows[0][None, :32])
        for w in tqdm(windows, desc=f"evaluate {runner.name}", unit="window", disable=not progress):
            lm.model.set_attn_implementation("sdpa")
            refs = head_slices(lm, w.unsqueeze(0), runner.chunk)
            filled: list[object] = []
            # slice by slice: the next token of position s + i is w[s + i + 1]; the last has none
            for s, (ref, out) in zip(range(0, w.numel(), runner.chunk),
                                     zip(refs, runner.logit_slices(lm, w, filled), strict=True),
                                     strict=True):
                n = min(ref.shape[0], w.numel() - 1 - s)
                ref, out, nxt = ref[:n], out[:n], w[s + 1: s + 1 + n]
                base.add(ref, nxt)
                var.add(out, nxt)
                agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
                kl.append(token_kl(ref, out))
            if filled:
                held = cache_bytes(filled[0])
        sas_zero = sas_zero_fraction(lm.model) if runner.attn == ATTN_NAME else 0.0
        # a context that is not a multiple of the chunk: half a chunk short of the window
        ragged = settings.window - (runner.chunk // 2 if settings.window > runner.chunk else 1)
        if held is None:  # the float baseline: measure what transformers' own cache holds
            held, held_ragged = (_dynamic_cache_bytes(lm, windows[-1][:n])
                                 for n in (settings.window, ragged))
        else:
            held_ragged = cache_bytes(runner.fill(lm, windows[-1][:ragged]))
        extra = _speed_and_recall(lm, contender(), ids, split, settings, progress)
    finally:
        lm.model.set_attn_implementation("sdpa")
    kl_all = torch.cat(kl)
    fp16 = _float_cache_bytes(lm, settings.window)
    kv_bytes = held
    return {
        "model": lm.name,
        "variant": runner.name,
        "data_source": split.source,
        "data_sha256": split.sha256,
        "eval_tokens": base.tokens,
        "window": settings.window,
        "ppl_baseline": base.ppl,
        "ppl_variant": var.ppl,
        "ppl_delta_pct": 100.0 * (var.ppl / base.ppl - 1.0),
        "top1_agreement": agree / base.tokens,
        "kv_context_tokens": settings.window,
        "kv_bytes_per_token": kv_bytes / settings.window,
        "kv_compression": fp16 / kv_bytes,
        "kv_ragged_context_tokens": ragged,
        "kv_compression_ragged": _float_cache_bytes(lm, ragged) / held_ragged,
        "kl_mean": float(kl_all.mean()),
        "kl_p99": float(torch.quantile(kl_all, 0.99)),
        "sas_zero_fraction": sas_zero,
        **extra,
        "settings": asdict(settings),
    }


BASELINE = "fp16"  # what a variant replaces: the float cache in our engine
_BASELINE_RECALL: dict[tuple, dict] = {}


def _speed_and_recall(lm: LoadedModel, contender, ids: torch.Tensor, split: TextSplit,
                      settings: EvalSettings, progress: bool) -> dict[str, object]:
    """Speed-ups over the float engine and retrieval accuracy of both (same prompts)."""
    from turbo_core.hf import retrieval

    def say(msg: str) -> None:
        if progress:
            tqdm.write(msg)

    baseline = EngineContender(lm, get_variant(BASELINE), None)
    out = {} if settings.speed is None else speed.measure(
        baseline, contender, speed.prompts_from(ids, settings.speed), settings.speed, log=say)
    if settings.retrieval is None:
        return out
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    samples = retrieval.make_samples(lm.tokenizer, split.evaluation, settings.retrieval, limit)
    key = (lm.weights_sha256, str(lm.model.dtype), split.sha256, settings.retrieval)
    if key not in _BASELINE_RECALL:  # the same prompts answer the same: once per process
        _BASELINE_RECALL[key] = retrieval.run(baseline, lm.tokenizer, samples,
                                              settings.retrieval, progress)
    base = _BASELINE_RECALL[key]
    mine = retrieval.run(contender, lm.tokenizer, samples, settings.retrieval, progress)
    return out | retrieval.kept(base, mine) | {
        "retrieval_accuracy": mine["accuracy"],
        "retrieval_accuracy_baseline": base["accuracy"],
        "retrieval_passkey": mine["by_task"]["passkey"],
        "retrieval_multikey": mine["by_task"]["multikey"],
        "retrieval": {"variant": mine, "baseline": base},
    }


def evaluate(
    lm: LoadedModel,
    variant: Variant,
    split: TextSplit,
    *,
    plan: BitPlan | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """All metrics of ``turbo evaluate`` for one variant (baseline measured in the same call).

    ``kv_compression`` is FP16 bytes of the same context divided by the bytes the cache holds
    at rest after ``window`` tokens, measured from its tensors: every full chunk compressed
    (``flush()``, what the next token would do first) as codes, scales and offsets, and what
    is left — the sinks and a tail shorter than a chunk — as the INT8 rows with scales it is.
    ``window`` is usually a multiple of the chunk, which leaves no tail (but the sinks shift
    the grid), so ``kv_compression_ragged`` measures the same at ``window - chunk / 2`` tokens.
    A float cache is measured the same way (transformers' cache after the window): 1 in
    fp16, 0.5 for a float32 model.
    """
    settings = settings or EvalSettings()
    if plan is not None:
        plan.check_compatible(lm.shape)
    if variant.quantized_cache:
        bits = plan if plan is not None else variant.kv_bits
        new_cache = partial(TurboCache.for_model, lm.model, lm.shape, bits, variant.kv)
    else:
        new_cache = None
    enable(lm.model, variant.math)
    result = _measure(lm, _Runner(variant.name, ATTN_NAME, new_cache, variant.kv.chunk),
                      partial(EngineContender, lm, variant, plan), split, settings, progress)
    dtype = next(lm.model.parameters()).dtype
    layout = new_cache() if new_cache is not None else \
        TurboCache.for_model(lm.model, lm.shape, None, dtype=dtype)
    result |= layout_bytes_per_token(layout)
    result["int2_heads"] = plan.selection.int2_heads if plan is not None else 0
    result["int2_scope"] = plan.selection.scope if plan is not None else None
    return result


CONTEXTS = {"1k": 1024, "8k": 8192, "32k": 32768}  # where the report states KV bytes per token


def layout_bytes_per_token(cache: TurboCache) -> dict[str, float]:
    """KV bytes per token of one sequence at rest at 1k, 8k and 32k tokens, from the cache's
    layout (``bytes_for``): flat for full attention, falling with context when sliding-window
    layers stop growing at their window."""
    return {f"kv_bytes_per_token_{k}": cache.bytes_for(n) / n for k, n in CONTEXTS.items()}


PEER_BACKENDS = ("quanto", "hqq")


def evaluate_peer(
    lm: LoadedModel,
    backend: str,
    nbits: int,
    split: TextSplit,
    *,
    settings: EvalSettings | None = None,
    residual: int = 64,
    group: int = 64,
    progress: bool = True,
) -> dict[str, object]:
    """The same metrics for transformers' own quantized KV cache (exact attention), with the
    same residual (recent-token) length as our buffer and the same group size."""
    if backend not in PEER_BACKENDS:
        raise ValueError(f"unknown peer backend {backend!r}; use one of {PEER_BACKENDS}")
    if nbits not in (2, 4):
        raise ValueError(f"peer nbits must be 2 or 4, got {nbits}")
    from transformers.cache_utils import QuantizedCache

    settings = settings or EvalSettings()
    new_cache = partial(QuantizedCache, backend=backend, config=lm.model.config, nbits=nbits,
                        residual_length=residual, q_group_size=group)
    name = f"hf-{backend}-int{nbits}"
    result = _measure(lm, _Runner(name, "sdpa", new_cache, residual),
                      partial(HFCacheContender, lm, name, new_cache), split, settings, progress)
    result["int2_heads"] = 0
    result["int2_scope"] = None
    return result
