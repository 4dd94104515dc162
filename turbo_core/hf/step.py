"""One compiled decode step: the transformers model forward under ``torch.compile`` (Inductor),
with each layer's cache write and attention behind one opaque op (docs/design.md §2.2b).

What vLLM's CPU platform does, on transformers' own model code:

* The step runs the model with ``turbo_step=True`` among its keyword arguments; transformers
  passes them down to every attention call, where :func:`~turbo_core.hf.attention.turbo_attention_forward`
  hands ``q, k, v`` of the new tokens to ``torch.ops.turbo_step.attend(q, k, v, layer, scale)``.
  No ``Cache`` object enters the graph (``cache=None``): the graph is the model's arithmetic —
  norms, projections, RoPE, MLP, which Inductor fuses — and one op per layer.
* The op is opaque to the compiler (a fake implementation gives its shape) and looks up what
  this step writes and reads in the :class:`StepContext` the caller activated: the cache layer
  and the variant's attention math. It runs the same code as the eager path, so a compiled step
  and an eager step leave the cache byte for byte alike: the packed store's one
  ``turbo.append`` and ``turbo.decode_attention`` (C++), the float store's row write and
  ``turbo.float_decode_attention``.
* Nothing that changes from step to step is a Python value in the graph (the batch size is a
  symbolic dimension; lengths, slots and page tables live behind the op), so the graph compiles
  once per batch-size class. Guards are dropped except on the step's own inputs (every
  parameter was guarded, ~1 ms a step), as vLLM does: the graph depends on the model and the
  op boundary, not on which cache or variant runs through it, so runners that share a model
  share one compiled step.
* The compiled code is cached on disk by Inductor (``TORCHINDUCTOR_CACHE_DIR``, which
  :func:`compile_cache_dir` points under ``$TURBO_HOME``): a warm process loads it in seconds.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import sysconfig
import threading
import types
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.functional import CPU_DECODE_MAX_ROWS, cpu_ops_allowed, turbo_attention
from turbo_core.fileio import data_dir

log = logging.getLogger(__name__)

STEP_KWARG = "turbo_step"  # the model keyword that routes attention to the step op
ROTATION_KWARG = "turbo_rotation"  # R of a rotated packed cache, applied around the op


@dataclass
class StepContext:
    """What the step op of layer ``i`` reads: ``cache.layers[i]`` (its ``seqs`` already selected)
    and the variant's attention math (every layer's: ``hf.attention.enable``)."""

    cache: object  # turbo_core.hf.cache.TurboCache
    math: AttentionMath

    def __post_init__(self) -> None:
        # the stores' one-call step (turbo.decode_step) serves this math: no INT8 P·V or top-k
        self.one_call = not self.math.pv_int8 and self.math.kernel_blocker() is None


_local = threading.local()


@contextmanager
def active(context: StepContext):
    """Make ``context`` the one the step op reads, in this thread, for the duration."""
    before = getattr(_local, "context", None)
    _local.context = context
    try:
        yield context
    finally:
        _local.context = before


# A low-level registration (schema + a kernel for every backend): a torch.library.custom_op
# adds an autograd wrapper and redispatches in Python, ~8 µs a call, 30 calls a step.
_lib = torch.library.Library("turbo_step", "DEF")
# cudagraph_unsafe: the op plans in Python (page tables, lengths, host-side state of the store)
# and must run on every step, so on CUDA Inductor partitions the graph around it and captures
# only the rest (norms, projections, MLP) in CUDA graphs — vLLM's piecewise CUDA graphs.
# A captured op would replay its kernels without its planning: silently wrong tokens.
_lib.define("attend(Tensor q, Tensor k, Tensor v, int layer, float scale, bool rotated) -> Tensor",
            tags=(torch._C.Tag.cudagraph_unsafe,))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
            rotated: bool) -> torch.Tensor:
    """Layer ``layer``'s write of the new tokens ``k, v (B, H_kv, L, D)`` into the active step's
    cache and its attention of ``q (B, H_q, L, D)`` over it; returns ``(B, H_q, L, D)``.
    ``rotated``: ``q, k, v`` come rotated for a rotated packed store, and the output is left
    rotated (the graph rotates around the op)."""
    context: StepContext | None = getattr(_local, "context", None)
    if context is None:
        raise RuntimeError("turbo_step.attend ran outside a step: call the compiled step through "
                           "CompiledStep, which activates its StepContext")
    cache_layer = context.cache.layers[layer]
    store, seqs = cache_layer.store, cache_layer.seqs
    # the common step — new rows, nothing due — is one C++ call; every other takes the store's
    # update and the attention dispatch below (the same ops, planned in Python)
    if context.one_call and seqs is not None and \
            q.shape[1] // store.num_heads * q.shape[2] <= CPU_DECODE_MAX_ROWS:
        out = store.step(q, k, v, seqs, context.cache.slots, context.math, scale, rotated)
        if out is not None:
            return out
    if rotated:
        store.update(k, v, seqs=seqs, rotated=True)
    else:
        store.update(k, v, seqs=seqs)
    res = turbo_attention(q, None, None, math_cfg=context.math, kv_store=store,
                          kv_seqs=seqs, kv_rotated=rotated, scale=scale)
    return res.out


_lib.impl("attend", _attend, "CompositeExplicitAutograd")
torch.library.register_fake("turbo_step::attend", lambda q, k, v, layer, scale, rotated: torch.empty_like(q),
                            lib=_lib)
attend = torch.ops.turbo_step.attend


class StepLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose forward is ``torch.ops.turbo.linear`` (``csrc/linear.cpp``): for a
    decode step's few rows (≤ 16) it streams the weights once — MKL's sgemm read SmolLM2's
    538 MB at ~16 GB/s for 8 rows, this kernel at ~19 —, and each row's result does not depend
    on the others in the batch; more rows (a prompt chunk), other dtypes and devices take
    ``at::linear``, exactly ``F.linear``. With autograd on it is ``F.linear`` (the op has no
    derivative; the graph constant-folds the check)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or not x.is_cpu:  # the op has a CPU kernel only
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.turbo.linear(x, self.weight, self.bias)


def use_step_linears(model: torch.nn.Module) -> int:
    """Switch ``model``'s float32 CPU ``nn.Linear`` layers (exact type, not subclasses such as
    quantized ones) to :class:`StepLinear` when the C++ ops are loaded; returns how many.
    The parameters and the state dict stay as they are."""
    if not cpu_ops_allowed():
        return 0
    switched = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 \
                and module.weight.device.type == "cpu":
            module.__class__ = StepLinear
            switched += 1
    return switched


SEED_ENV = "TURBO_INDUCTOR_SEED"  # compiled code baked into the serving image (read-only)


def compile_cache_dir() -> Path:
    """Where Inductor keeps its compiled code: ``$TORCHINDUCTOR_CACHE_DIR`` when set (to other
    than torch's default), else
    ``$TURBO_HOME/inductor`` (set here, before the first compile, so later processes find it).
    Inductor writes lock files beside its entries, so a read-only copy cannot serve directly:
    when ``$TURBO_INDUCTOR_SEED`` names one (the image's build-time warm-up) and the cache is
    empty, it is copied in first, and a pod's first step loads instead of compiling."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # torch writes its default into the variable the first time anything asks for the cache
    # (an import may have): that one is not a choice, the user's is
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        path = Path(chosen)
    else:
        path = data_dir() / "inductor"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    seed = os.environ.get(SEED_ENV)
    if seed and Path(seed).is_dir() and not (path.is_dir() and any(path.iterdir())):
        log.info("Inductor cache: copying the compiled steps from %s into %s", seed, path)
        shutil.copytree(seed, path, dirs_exist_ok=True)
    return path


def compiler_missing() -> str | None:
    """Why Inductor's C++ backend cannot run here (``None``: it can): its kernels are C++
    built with Python's headers (they bind through ``Python.h``)."""
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++/clang++) on PATH"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no Python headers ({headers}; python3-dev)"
    return None


_INPUTS = ("input_ids", "position_ids")


def _own_inputs(entries) -> list[bool]:
    """Keep the guards on the step's own arguments (shapes, dtypes) and the global ones (grad
    mode, symbolic shapes: batch 1 vs more); drop those on the model's modules and parameters."""
    return [e.name in _INPUTS or e.name.startswith(tuple(f"L['{n}']" for n in _INPUTS))
            or e.name == "" for e in entries]


def compile_options(device: torch.device) -> dict:
    """Inductor's options for the step on ``device``: the guard filter everywhere; on CUDA,
    CUDA graphs (``mode="reduce-overhead"``'s setting) — one per batch size, recorded on
    first use, around the step op, which runs outside them (its ``cudagraph_unsafe`` tag)."""
    options: dict = {"guard_filter_fn": _own_inputs}
    if device.type == "cuda":
        options["triton.cudagraphs"] = True
    return options


class CompiledStep:
    """``model``'s decode forward, compiled once per model and shared by the runners on it.

    ``step(context, input_ids (B, L), position_ids (B, L))`` returns the last position's logits
    ``(B, vocab)``; the step's attention reads and writes ``context.cache``."""

    def __init__(self, model: torch.nn.Module, rotation: torch.Tensor | None = None):
        self.model = model
        compile_cache_dir()
        # Dynamo keeps compiled code per code object and, with the guards dropped, would hand
        # one model's graph to another: each step gets a code object of its own
        device = next(model.parameters()).device
        self._fn = torch.compile(_own_code(_model_forward(model, rotation)), dynamic=None,
                                 fullgraph=True, options=compile_options(device))

    @torch.no_grad()
    def __call__(self, context: StepContext, input_ids: torch.Tensor,
                 position_ids: torch.Tensor) -> torch.Tensor:
        torch._dynamo.maybe_mark_dynamic(input_ids, 0)
        torch._dynamo.maybe_mark_dynamic(position_ids, 0)
        with active(context):
            return self._fn(input_ids, position_ids)

    @classmethod
    def for_model(cls, model: torch.nn.Module, rotation: torch.Tensor | None = None) -> CompiledStep:
        """The model's compiled step, with or without the rotation around the op (made on first
        use, kept on the model: one graph each)."""
        steps = model.__dict__.setdefault("_turbo_compiled_steps", {})
        key = rotation is not None
        if key not in steps:
            steps[key] = cls(model, rotation)
        return steps[key]


_made = itertools.count()


def _model_forward(model: torch.nn.Module, rotation: torch.Tensor | None = None
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The step's forward; ``rotation`` (``R (D, D)``, a rotated packed cache's): the attention
    rotates ``q, k, v`` before the op and the output back after it, inside the graph."""
    extra = {STEP_KWARG: True} | ({ROTATION_KWARG: rotation} if rotation is not None else {})

    def forward(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                    logits_to_keep=1, **extra)
        return out.logits[:, -1]

    return forward


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (the same instructions, closure and globals)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_made)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def eager_step(model: torch.nn.Module, rotation: torch.Tensor | None = None
               ) -> Callable[[StepContext, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The same step through the same op, not compiled (what ``--no-compile`` runs)."""

    forward = _model_forward(model, rotation)

    @torch.no_grad()
    def step(context: StepContext, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with active(context):
            return forward(input_ids, position_ids)

    return step
