"""The C++ CPU ops (``turbo_kernels/csrc``, registered as ``torch.ops.turbo.*``): build, load, call.

Built once, ahead of time — ``scripts/env.sh`` runs ``python -m turbo_kernels.cpu_ops`` after
installing — with ``-O3 -mavx2 -mfma -mf16c -fopenmp`` (never ``-march=native``: the library runs
on other hosts of the same ISA; ``-fopenmp`` because ``at::parallel_for`` is a header template
whose ``#pragma omp parallel`` is compiled into this library — without it every op ran on one
thread — and ``omp simd`` reductions vectorize order-free loops without ``-ffast-math``; the
library's ``libgomp.so.1`` resolves to the one torch has loaded: one OpenMP pool) into
``$TURBO_OPS_DIR`` (default ``<venv>/turbo-ops``), stamped with a hash of the sources, the
flags and the torch version. At run time :func:`load` only loads a
library whose stamp matches; it never compiles (a request must not wait for g++). Without one,
:func:`load` returns False and says once what is missing, and the caller takes another path.

Ops (reference: ``turbo_core.attention.reference.decode_attention_reference``):

* ``decode_attention`` (``csrc/decode_attention.cpp``): a few newest tokens over one layer of
  the packed cache, register-blocked loops over each page's codes;
* ``decode_step`` (the same file): a decode step's write of its new rows and that attention in
  one call, reading every per-sequence tensor by slot (``QuantizedKVLayer.step``);
* ``prefill_attention`` (``csrc/prefill_attention.cpp``): a prompt chunk over it, two sgemm per
  tile of decoded pages;
* ``attention`` (``csrc/prefill_attention.cpp``): the same tiles over plain float K/V (the
  drop-in ``TurboAttention`` module's path);
* ``float_decode_attention`` (``csrc/float_decode.cpp``): the float baseline's decode, exact
  softmax over one layer of the slotted float cache (``FloatKVLayer``), the same job layout;
  ``float_decode_step``: its write of the new rows and that attention in one call
  (``FloatKVLayer.step``);
* ``append`` (``csrc/append.cpp``): one layer's cache write per step, in place — full chunks
  compressed into their pages, new rows quantized into the INT8 buffer (called by
  ``QuantizedKVLayer.update``);
* ``linear`` (``csrc/linear.cpp``): ``x W^T + b`` for a decode step's few rows, the weights
  streamed once (``turbo_core.hf.step.StepLinear``); ``at::linear`` otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import torch

from turbo_core.attention.config import AttentionMath
from turbo_core.attention.packed import PackedHeads, PackedKV, check_query
from turbo_core.attention.sas import kernel_args
from turbo_core.fileio import write_atomic

log = logging.getLogger(__name__)

NAME = "turbo_cpu_ops"
CSRC = Path(__file__).resolve().parent / "csrc"  # shipped in the wheel (package data)
SOURCES = ("torch_bindings.cpp", "attention_common.cpp", "decode_attention.cpp",
           "prefill_attention.cpp", "append.cpp", "float_decode.cpp", "linear.cpp")
HEADERS = ("ops.h", "attention_common.h")  # in the stamp
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp")
PAGES_PER_SPLIT = 8  # fixed context splits: a sequence's sums do not depend on its batch


def ops_dir() -> Path:
    return Path(os.environ.get("TURBO_OPS_DIR") or Path(sys.prefix) / "turbo-ops")


def source_stamp() -> str:
    """What a built library must match: the sources, the flags and the torch version."""
    h = hashlib.sha256(" ".join(FLAGS).encode() + torch.__version__.encode())
    for name in (*SOURCES, *HEADERS):
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()


def build(verbose: bool = False) -> Path:
    """Compile the ops (about 20 s on two cores) in ``ops_dir()/build`` and move the library
    into :func:`ops_dir` by rename, with its stamp: a process that has the old one loaded keeps
    its mapping, and a reader never sees a half-written library."""
    from torch.utils import cpp_extension

    # cpp_extension runs `ninja` from PATH; the ninja wheel puts it beside this interpreter,
    # which is not on PATH when the venv is not activated (the image's builder stage)
    here = str(Path(sys.executable).parent)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    out = ops_dir()
    work = out / "build"
    work.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=NAME, sources=[str(CSRC / s) for s in SOURCES],
                       extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"],
                       build_directory=str(work),
                       is_python_module=False, verbose=verbose)
    stamp = out / "stamp"
    stamp.unlink(missing_ok=True)  # no library is current while the two are swapped
    tmp = out / f".{NAME}.so.tmp"
    shutil.copyfile(work / f"{NAME}.so", tmp)
    os.replace(tmp, out / f"{NAME}.so")
    write_atomic(stamp, source_stamp() + "\n")
    load.cache_clear()
    return out / f"{NAME}.so"


def stale() -> str | None:
    """Why the built library cannot be loaded (``None``: it can)."""
    lib, stamp = ops_dir() / f"{NAME}.so", ops_dir() / "stamp"
    if not lib.is_file():
        return f"no {lib}"
    if not stamp.is_file() or stamp.read_text().strip() != source_stamp():
        return f"{lib} was built from other sources, flags or torch"
    return None


@functools.cache
def load() -> bool:
    """Load the built ops (once); False, with one log line naming why, when there are none."""
    lib = ops_dir() / f"{NAME}.so"
    why = stale()
    if why is None:
        if not hasattr(torch.ops.turbo, "decode_attention"):
            torch.ops.load_library(str(lib))
        _register_fakes()
        return True
    log.warning("C++ CPU ops not loaded (%s); build them with `python -m turbo_kernels.cpu_ops` "
                "(scripts/env.sh does)", why)
    return False


def _fake_attention(q, *args, **kwargs):
    return torch.empty_like(q), q.new_empty(2, dtype=torch.long)


def _register_fakes() -> None:
    """Shapes without computing, for ``torch.compile`` (outputs: ``q``'s shape, two counts)."""
    if getattr(_register_fakes, "done", False):
        return

    for op in ("decode_attention", "decode_step", "prefill_attention", "attention"):
        torch.library.register_fake(f"turbo::{op}")(_fake_attention)
    torch.library.register_fake("turbo::append")(lambda *args, **kwargs: None)
    for op in ("float_decode_attention", "float_decode_step"):
        torch.library.register_fake(f"turbo::{op}")(lambda q, *args, **kwargs: torch.empty_like(q))
    torch.library.register_fake("turbo::linear")(
        lambda x, weight, bias: x.new_empty((*x.shape[:-1], weight.shape[0])))

    _register_fakes.done = True


@functools.cache
def _sas_args(sas) -> tuple[torch.Tensor, list[float], float]:
    """LUT with one 0 past its end (weights beyond T cut without a branch), coefficients, T."""
    coeffs, lut = kernel_args(sas, torch.device("cpu"))
    if lut is None:
        return torch.zeros(1), [float(c) for c in coeffs], 0.0
    return torch.cat([lut.float(), lut.new_zeros(1)]).contiguous(), [float(c) for c in coeffs], \
        float(sas.lut_max)


_PARTS = ("k_packed", "k_scale", "k_low", "k_first", "v_packed", "v_scale", "v_low", "v_first")
_DTYPES = {"heads": torch.int64, "k_packed": torch.uint8, "v_packed": torch.uint8,
           "k_scale": torch.uint8, "v_scale": torch.uint8, "k_low": torch.int8,
           "v_low": torch.int8, "k_first": torch.float32, "v_first": torch.float32,
           "page_table": torch.int32, "n_chunks": torch.int32, "chunk_base": torch.int32,
           "buffer_len": torch.int32, "buffer_k": torch.int8, "buffer_v": torch.int8,
           "buffer_k_scale": torch.float32, "buffer_v_scale": torch.float32}
_NO_JOBS = torch.empty(0, 4, dtype=torch.long)
_EMPTY = {torch.uint8: torch.empty(0, dtype=torch.uint8), torch.int8: torch.empty(0, dtype=torch.int8)}


def _checked(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as the op reads it: the dtype of ``name``, on the CPU, contiguous (copied if not)."""
    if t.dtype != _DTYPES[name] or t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU {_DTYPES[name]} tensor, got {t.dtype} on {t.device}")
    return t if t.is_contiguous() else t.contiguous()


def _group_args(g: PackedHeads) -> list[torch.Tensor]:
    """``heads`` and the eight ``_PARTS`` of one bit group as the ops read them, checked; kept
    on the (frozen) view object, which a pool makes once until it grows."""
    cached = g.__dict__.get("_op_args")
    if cached is not None:
        return cached
    args = [_checked("heads", g.heads)]
    for name in _PARTS:
        t = getattr(g, name)
        if t is None:  # 8-bit heads: no second level
            args.append(_EMPTY[_DTYPES[name]])
            continue
        if name.endswith("_first") and t.dim() != 2:
            raise ValueError(f"{name} must be (pages, heads): per-channel first-level scales "
                             f"(k_channel_scale) are read by the reference only")
        args.append(_checked(name, t))
    object.__setattr__(g, "_op_args", args)
    return args


def _groups_args(groups) -> list[list[torch.Tensor]]:
    """Per argument (``heads``, then ``_PARTS``), the list over ``groups``."""
    return [list(col) for col in zip(*(_group_args(g) for g in groups), strict=True)]


def _view_args(q: torch.Tensor, cache: PackedKV, math_cfg: AttentionMath, op: str) -> list:
    """The arguments both attention ops take, from ``q`` to ``chunk, sinks, window``, checked."""
    check_query(q, cache, math_cfg)
    if q.device.type != "cpu":
        raise ValueError(f"turbo.{op} takes CPU tensors, got {q.device}")
    kb, vb = cache.buffer_k, cache.buffer_v
    return [q.float().contiguous(), math_cfg.qk_int8, math_cfg.block_size,
            *_groups_args(cache.groups),
            [g.bits for g in cache.groups], [g.k_group for g in cache.groups],
            [g.v_group for g in cache.groups], _checked("page_table", cache.page_table),
            _checked("n_chunks", cache.n_chunks), _checked("chunk_base", cache.chunk_base),
            _checked("buffer_k", kb.values), _checked("buffer_k_scale", kb.scale),
            _checked("buffer_v", vb.values), _checked("buffer_v_scale", vb.scale),
            _checked("buffer_len", cache.buffer_len), cache.chunk, cache.sinks, cache.window or 0]


def _softmax_args(q: torch.Tensor, math_cfg: AttentionMath, scale: float | None) -> list:
    lut, coeffs, lut_max = _sas_args(math_cfg.sas)
    return [1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, lut, coeffs, lut_max,
            math_cfg.sas is not None]


def decode_attention(q: torch.Tensor, cache: PackedKV, *, math_cfg: AttentionMath,
                     scale: float | None = None) -> tuple[torch.Tensor, int, int]:
    """Attention of the ``L_q`` newest tokens of each sequence over ``cache`` (which holds them),
    through ``torch.ops.turbo.decode_attention`` (a few new tokens: up to
    ``functional.CPU_DECODE_MAX_ROWS`` query rows per KV head). Returns the output
    ``(B, H_q, L_q, D)`` in ``q.dtype``, the weights SAS zeroed and the valid positions (as the
    reference counts them, SAS zeros against running maxima: a lower bound). The op quantizes
    the queries itself (``quantize_int8_blockwise``, with ``math_cfg.qk_int8``). Needs
    :func:`load`."""
    out, counts = torch.ops.turbo.decode_attention(
        *_view_args(q, cache, math_cfg, "decode_attention"), PAGES_PER_SPLIT,
        *_softmax_args(q, math_cfg, scale))
    return out.to(q.dtype), int(counts[0]), int(counts[1])


def step_args(lens: torch.Tensor, page_table: torch.Tensor, buffers: dict[str, torch.Tensor],
              pools: dict, cfg, window: int | None) -> list:
    """The arguments of ``turbo.decode_step`` after ``q, k, v, slots`` that stay the same from
    step to step while a layer's tensors do (``QuantizedKVLayer``'s fast path builds them once):
    ``lens`` int32 ``(3, slots)`` — pages held, chunks released, buffered rows, per slot (the op
    advances the last in place) —, the slot-indexed page table, the INT8 buffers, the pools."""
    groups = [p.heads_view() for p in pools.values()]
    # in place, so never copied: the op refuses what is not contiguous, by name
    return [lens[2], lens[0], lens[1], page_table, buffers["k_values"], buffers["k_scale"],
            buffers["v_values"], buffers["v_scale"], *_groups_args(groups), [g.bits for g in groups],
            [g.k_group for g in groups], [g.v_group for g in groups], cfg.chunk, cfg.sinks, window or 0]


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, args: list,
                *, math_cfg: AttentionMath, scale: float | None = None) -> torch.Tensor:
    """``torch.ops.turbo.decode_step``: the new rows ``k, v (B, H_kv, L_q, D)`` into the buffers
    of slots ``slots`` (int64 ``(B,)``), then :func:`decode_attention`'s attention of ``q`` over
    those slots as they now are; ``args`` from :func:`step_args`. Returns the output in
    ``q.dtype``. Needs :func:`load`."""
    out, _ = torch.ops.turbo.decode_step(
        q.float().contiguous(), k.float().contiguous(), v.float().contiguous(), slots, *args,
        math_cfg.qk_int8, math_cfg.block_size, PAGES_PER_SPLIT, *_softmax_args(q, math_cfg, scale))
    return out.to(q.dtype)


def prefill_attention(q: torch.Tensor, cache: PackedKV, *, math_cfg: AttentionMath,
                      scale: float | None = None) -> tuple[torch.Tensor, int, int]:
    """:func:`decode_attention`'s contract for a prompt chunk (hundreds of new tokens), through
    ``torch.ops.turbo.prefill_attention``: two sgemm per tile of history, no copy of the whole
    history. Needs :func:`load`."""
    out, counts = torch.ops.turbo.prefill_attention(
        *_view_args(q, cache, math_cfg, "prefill_attention"), *_softmax_args(q, math_cfg, scale))
    return out.to(q.dtype), int(counts[0]), int(counts[1])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, math_cfg: AttentionMath,
              causal: bool = False, window: int | None = None,
              scale: float | None = None) -> tuple[torch.Tensor, int, int]:
    """``torch.ops.turbo.attention``: TurboAttention over plain float ``k, v (B, H_kv, L_k, D)``
    (the drop-in module's path) — the prefill op's tiles, read in place; K quantized like the
    queries with ``math_cfg.qk_int8`` (after ``smooth_k``'s mean removal), V in float (no INT8
    P·V). Causality bottom-right, as the reference. Returns the output in ``q.dtype``, the SAS
    zeros (against running maxima) and the valid positions. Needs :func:`load`."""
    if math_cfg.pv_int8 or math_cfg.sparse_ratio is not None:
        raise ValueError("turbo.attention has no INT8 P·V or top-k sparsity; use the reference")
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    orig_k = k  # never written: the caller's
    k = k.float().contiguous()
    if math_cfg.qk_int8 and math_cfg.smooth_k:  # as the reference: a per-row constant of the scores
        # in place on the op's own contiguous copy (one pass less than k - mean, then a copy)
        k = (k.clone() if k is orig_k else k).sub_(k.mean(dim=-2, keepdim=True))
    out, counts = torch.ops.turbo.attention(
        q.float().contiguous(), k, v.float().contiguous(), math_cfg.qk_int8,
        math_cfg.block_size, causal, window or 0, *_softmax_args(q, math_cfg, scale))
    return out.to(q.dtype), int(counts[0]), int(counts[1])


def float_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slots: torch.Tensor, row_lo: torch.Tensor, row_hi: torch.Tensor, *,
                           window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """``torch.ops.turbo.float_decode_attention``: exact softmax attention of ``q (B, H_q, L_q,
    D)`` — the ``L_q`` newest tokens of each sequence — over rows ``[row_lo[b], row_hi[b])`` of
    slot ``slots[b]`` of the float32 caches ``(slots, H_kv, rows, D)``; causal by row, within
    ``window`` rows when there is one. Returns ``(B, H_q, L_q, D)`` float32. Needs :func:`load`."""
    if q.dtype != torch.float32 or k_cache.dtype != torch.float32 or q.device.type != "cpu":
        raise ValueError(f"turbo.float_decode_attention takes float32 CPU tensors, got q "
                         f"{q.dtype} on {q.device} and a {k_cache.dtype} cache")
    return torch.ops.turbo.float_decode_attention(
        q.contiguous(), k_cache, v_cache, slots, row_lo, row_hi, window or 0,
        1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def float_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor, *,
                      window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """``torch.ops.turbo.float_decode_step``: each slot's window start advanced, the new rows
    ``k, v (B, H_kv, L_q, D)`` written after slot ``slots[b]``'s held rows of the float32 caches
    (in place), ``rows`` int64 ``(2, slots)`` — held rows ``[lo, hi)`` per slot — advanced, then
    :func:`float_decode_attention` over them (``FloatKVLayer.step``). Needs :func:`load`."""
    return torch.ops.turbo.float_decode_step(
        q.float().contiguous(), k.float().contiguous(), v.float().contiguous(), k_cache, v_cache,
        slots, rows, window or 0, 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def append(k: torch.Tensor, v: torch.Tensor, seqs: list[int], rows: list[int],
           buffers: dict[str, torch.Tensor], jobs: list[tuple[int, int, int, int]],
           pages: torch.Tensor, pools: dict, cfg) -> None:
    """``torch.ops.turbo.append``: compress ``jobs`` — ``(slot, first row, full chunks, rows
    after them)`` — of the INT8 ``buffers`` into ``pages`` of ``pools`` (``PagePool`` per bit
    width), move the rows after them down, then quantize ``k, v (N, H_kv, T, D)`` into buffer
    rows ``rows[i]..`` of slot ``seqs[i]``. In place; ``QuantizedKVLayer.update`` plans it."""
    groups = [p.heads_view() for p in pools.values()]  # 8-bit pools: empty second level
    torch.ops.turbo.append(
        k.float().contiguous(), v.float().contiguous(), torch.tensor(seqs, dtype=torch.long),
        torch.tensor(rows, dtype=torch.long), buffers["k_values"], buffers["k_scale"],
        buffers["v_values"], buffers["v_scale"],
        torch.tensor(jobs, dtype=torch.long).reshape(-1, 4) if jobs else _NO_JOBS,
        pages.long().contiguous(), *_groups_args(groups), [g.bits for g in groups],
        [g.k_group for g in groups], [g.v_group for g in groups], cfg.chunk, cfg.protect)


if __name__ == "__main__":  # python -m turbo_kernels.cpu_ops [--if-stale] [-v]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if "--if-stale" in sys.argv and stale() is None:
        sys.exit(0)
    print(f"[env] building the C++ CPU ops into {ops_dir()} (about a minute)", file=sys.stderr)
    print(f"built {build(verbose='-v' in sys.argv)}", file=sys.stderr)
