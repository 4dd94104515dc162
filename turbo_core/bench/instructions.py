"""Instructions per element of the C++ CPU ops, counted by valgrind's callgrind.

AVX2 attention over a quantized cache is instruction-bound (the bytes would allow ~7x more), so
``turbo bench decode --instructions`` reports what each op executes per element besides its
time. Hardware counters (``perf stat``) are not available on every machine — our VMs answer
"not supported" — so the count comes from callgrind, which repeats exactly whatever else the
machine does. A small fixed workload (SmolLM2's head shape, 9 query / 3 KV heads, head_dim 64;
two sequences of 1024 tokens; one thread) runs twice under ``valgrind --tool=callgrind``, with
``calls`` calls of the op and with none (both after one warm-up call); the difference is the
calls' instructions. (Collecting
only inside the op's functions does not work: callgrind attributes the work ``at::parallel_for``
hands to OpenMP to whichever outlined function it finds, so the toggles miss or double it.)

* ``decode`` — ``torch.ops.turbo.decode_attention`` called directly (its arguments built
  once), one new token per sequence over the whole packed cache; an element is one cached K or
  V value read (2 · tokens · KV heads · head_dim per call), 10 calls;
* ``append`` — ``QuantizedKVLayer.update`` of one token per sequence, 128 calls (two chunks
  compressed per sequence on the way): the op and the Python that plans it, what a layer's
  write costs per step; an element is one K or V value written;
* ``prefill`` — ``torch.ops.turbo.prefill_attention`` called directly, one 512-token chunk per
  sequence over the 1024 before it, 2 calls; an element is one K or V value read (history and
  chunk) — each is read by all 512 query rows of its KV head's group.

Per-call costs inside the op (query quantization, the merge, allocations) are included: it is
what a call costs. Run one workload by hand:
``valgrind --tool=callgrind python -m turbo_core.bench.instructions decode-int4 3``.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WORKLOADS = {"decode-int4": ("decode", [4, 4, 4]), "decode-mix": ("decode", [2, 4, 4]),
             "append-int4": ("append", [4, 4, 4]), "prefill-int4": ("prefill", [4, 4, 4])}
B, CONTEXT, KV_HEADS, Q_HEADS, HEAD_DIM = 2, 1024, 3, 9, 64
CALLS = {"decode": 10, "append": 128, "prefill": 2}


def _workload(name: str, calls: int) -> dict:
    """Builds ``name``'s cache, then makes ``calls`` calls of its op (under callgrind, from
    :func:`count`); returns the elements those calls touch."""
    import torch
    from turbo_kernels import cpu_ops

    from turbo_core.attention.config import TURBO_DEFAULT, KVQuantConfig
    from turbo_core.attention.kvcache import QuantizedKVLayer

    gc.disable()  # a collection in one run and not the other would count as the calls'
    torch.set_num_threads(1)
    if not cpu_ops.load():
        raise SystemExit("the C++ ops are not built: python -m turbo_kernels.cpu_ops")
    op, bits = WORKLOADS[name]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    store = QuantizedKVLayer(bits, HEAD_DIM, KVQuantConfig())
    store.update(rnd(B, KV_HEADS, CONTEXT, HEAD_DIM), rnd(B, KV_HEADS, CONTEXT, HEAD_DIM))
    per_token = 2 * KV_HEADS * HEAD_DIM  # K and V values of one token
    if op == "append":  # one warm-up call in both runs: first-call costs are not per call
        new = [(rnd(B, KV_HEADS, 1, HEAD_DIM), rnd(B, KV_HEADS, 1, HEAD_DIM)) for _ in range(calls + 1)]
        for k, v in new:
            store.update(k, v)
        return {"calls": calls, "elements": calls * B * per_token}
    rows = 1 if op == "decode" else 512
    store.update(rnd(B, KV_HEADS, rows, HEAD_DIM), rnd(B, KV_HEADS, rows, HEAD_DIM))
    q = rnd(B, Q_HEADS, rows, HEAD_DIM)
    view = store.view()
    args = cpu_ops._view_args(q, view, TURBO_DEFAULT, f"{op}_attention")
    soft = cpu_ops._softmax_args(q, TURBO_DEFAULT, None)
    fn = getattr(torch.ops.turbo, f"{op}_attention")
    extra = [cpu_ops.PAGES_PER_SPLIT] if op == "decode" else []
    for _ in range(calls + 1):  # one warm-up call in both runs
        fn(*args, *extra, *soft)
    return {"calls": calls, "elements": calls * B * (CONTEXT + rows) * per_token}


def _collected(out_file: Path) -> int:
    """The event total of a callgrind output file (its ``summary:``/``totals:`` line)."""
    for line in out_file.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise ValueError(f"no totals line in {out_file}")


def _instructions(name: str, calls: int, timeout_s: float) -> tuple[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
               "-m", "turbo_core.bench.instructions", name, str(calls)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=os.environ | {"OMP_NUM_THREADS": "1"})
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"callgrind exited {proc.returncode}: {proc.stderr[-400:]}")
        return _collected(out), json.loads(proc.stdout.strip().splitlines()[-1])


def count(name: str, timeout_s: float = 600.0) -> dict:
    """Instructions per element of workload ``name`` (see :data:`WORKLOADS`) under callgrind:
    the run with the calls minus the run without (both make one warm-up call first). Returns
    the counts, or the row with ``error`` where valgrind is missing or a run failed."""
    op, bits = WORKLOADS[name]
    row = {"workload": name, "op": op, "bits": bits, "threads": 1,
           "shape": f"{Q_HEADS}/{KV_HEADS}/{HEAD_DIM}, batch {B}, context {CONTEXT}"}
    if shutil.which("valgrind") is None:
        return row | {"error": "valgrind is not installed (Debian package valgrind)"}
    from concurrent.futures import ThreadPoolExecutor

    try:  # both runs at once (each is one single-threaded valgrind process)
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(_instructions, name, n, timeout_s) for n in (0, CALLS[op])]
            (without, _), (with_calls, done) = [r.result() for r in runs]
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        return row | {"error": str(exc)}
    instructions = with_calls - without
    return row | done | {"instructions": instructions,
                         "instructions_per_element": instructions / done["elements"]}


def rows(log=print) -> list[dict]:
    """Every workload, in order (two callgrind runs of ~30 s each: Python and torch start
    under valgrind)."""
    result = []
    for name in WORKLOADS:
        log(f"instructions: {name} under callgrind")
        result.append(count(name))
    return result


def table(found: list[dict], fmt: str = "simple") -> str:
    from tabulate import tabulate

    keys = ["workload", "shape", "calls", "elements", "instructions", "instructions_per_element"]
    body = [[r.get(k, r.get("error", "")) if k == "instructions_per_element" else r.get(k, "")
             for k in keys] for r in found]
    return ("Instructions per element of the C++ ops (callgrind, one thread; an element is one "
            "K or V value the op reads or writes)\n"
            + tabulate(body, headers=keys, tablefmt=fmt, floatfmt=".2f", intfmt=","))


if __name__ == "__main__":
    print(json.dumps(_workload(sys.argv[1], int(sys.argv[2]))))
