"""The C++ CPU ops (``kernels/csrc``, registered as ``torch.ops.turbo.*``): build, load, call.

Built once, ahead of time — ``scripts/env.sh`` runs ``python -m turbo_kernels.cpu_ops`` after
installing — with ``-O3 -mavx2 -mfma -mf16c -fopenmp-simd`` (``omp simd`` reductions vectorize in order-free
loops without ``-ffast-math``; never ``-march=native``: the library runs on other
hosts of the same ISA) into ``$TURBO_OPS_DIR`` (default ``<venv>/turbo-ops``), stamped with a
hash of the sources, the flags and the torch version. At run time :func:`load` only loads a
library whose stamp matches; it never compiles (a request must not wait for g++). Without one,
:func:`load` returns False and says once what is missing, and the caller takes another path.

Ops: ``decode_attention`` (``csrc/decode_attention.cpp``): the newest tokens over one layer of
the packed cache. Reference: ``turbo_core.attention.reference.decode_attention_reference``.
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
from turbo_core.attention.packed import PackedKV, check_query
from turbo_core.attention.quant import quantize_int8_blockwise
from turbo_core.attention.sas import kernel_args
from turbo_core.fileio import write_atomic

log = logging.getLogger(__name__)

NAME = "turbo_cpu_ops"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("torch_bindings.cpp", "decode_attention.cpp")  # + ops.h, in the stamp
HEADERS = ("ops.h",)
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp-simd")
PAGES_PER_SPLIT = 8  # as the numba kernel: a sequence's sums do not depend on its batch


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

    out = ops_dir()
    work = out / "build"
    work.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name=NAME, sources=[str(CSRC / s) for s in SOURCES],
                       extra_cflags=list(FLAGS), build_directory=str(work),
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


def _register_fakes() -> None:
    """Shapes without computing, for ``torch.compile`` (outputs: ``q``'s shape, two counts)."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("turbo::decode_attention")
    def _(q, qs, *args, **kwargs):
        return torch.empty_like(q), q.new_empty(2, dtype=torch.long)

    _register_fakes.done = True


def _contiguous(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    return t.contiguous()


def decode_attention(q: torch.Tensor, cache: PackedKV, *, math_cfg: AttentionMath,
                     scale: float | None = None) -> tuple[torch.Tensor, int, int]:
    """Attention of the ``L_q`` newest tokens of each sequence over ``cache`` (which holds them),
    through ``torch.ops.turbo.decode_attention``; same contract as
    ``turbo_kernels.cpu_decode.decode_attention_cpu`` with ``count=True``. Needs :func:`load`."""
    check_query(q, cache, math_cfg)
    if q.device.type != "cpu":
        raise ValueError(f"turbo.decode_attention takes CPU tensors, got {q.device}")
    b, hq, lq, d = q.shape
    if math_cfg.qk_int8:  # the same blockwise INT8 of the queries as the reference
        qi = quantize_int8_blockwise(q, math_cfg.block_size)
        qf, qs = qi.values.float().contiguous(), qi.scale.float().contiguous()
    else:
        qf, qs = q.float().contiguous(), torch.ones(b, hq, lq)
    empty = torch.empty(0, dtype=torch.uint8)
    lists: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "heads", "k_packed", "k_scale", "k_low", "k_first", "v_packed", "v_scale", "v_low", "v_first")}
    for g in cache.groups:
        lists["heads"].append(_contiguous("heads", g.heads, torch.int64))
        for side in ("k", "v"):
            lists[f"{side}_packed"].append(_contiguous(f"{side}_packed", getattr(g, f"{side}_packed"),
                                                       torch.uint8))
            first = getattr(g, f"{side}_first")
            if first.dim() != 2:
                raise ValueError(f"{side}_first must be (pages, heads) (per-channel scales are "
                                 f"read by the reference only)")
            lists[f"{side}_first"].append(_contiguous(f"{side}_first", first, torch.float32))
            low_bit = g.bits != 8
            lists[f"{side}_scale"].append(_contiguous(f"{side}_scale", getattr(g, f"{side}_scale"),
                                                      torch.uint8) if low_bit else empty)
            lists[f"{side}_low"].append(_contiguous(f"{side}_low", getattr(g, f"{side}_low"),
                                                    torch.int8) if low_bit else empty.view(torch.int8))
    first_pos, tail_shift = cache.offsets()
    qpos0 = torch.tensor(cache.seq_lens, dtype=torch.int64) - lq
    sas = math_cfg.sas
    coeffs, lut = kernel_args(sas, torch.device("cpu"))
    lut = torch.cat([lut, lut.new_zeros(1)]) if lut is not None else torch.zeros(1)
    kb, vb = cache.buffer_k, cache.buffer_v
    out, counts = torch.ops.turbo.decode_attention(
        qf, qs, *lists.values(), [g.bits for g in cache.groups], [g.k_group for g in cache.groups],
        [g.v_group for g in cache.groups], _contiguous("page_table", cache.page_table, torch.int32),
        _contiguous("n_chunks", cache.n_chunks, torch.int32), first_pos.contiguous(),
        tail_shift.contiguous(), qpos0, _contiguous("buffer_k", kb.values, torch.int8),
        _contiguous("buffer_k_scale", kb.scale, torch.float32),
        _contiguous("buffer_v", vb.values, torch.int8),
        _contiguous("buffer_v_scale", vb.scale, torch.float32),
        _contiguous("buffer_len", cache.buffer_len, torch.int32), cache.chunk, cache.sinks,
        cache.window or 0, PAGES_PER_SPLIT, 1.0 / math.sqrt(d) if scale is None else scale,
        lut.float().contiguous(), [float(c) for c in coeffs], float(sas.lut_max) if sas else 0.0,
        sas is not None)
    return out.to(q.dtype), int(counts[0]), int(counts[1])


if __name__ == "__main__":  # python -m turbo_kernels.cpu_ops [--if-stale] [-v]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if "--if-stale" in sys.argv and stale() is None:
        sys.exit(0)
    print(f"[env] building the C++ CPU ops into {ops_dir()} (about a minute)", file=sys.stderr)
    print(f"built {build(verbose='-v' in sys.argv)}", file=sys.stderr)
