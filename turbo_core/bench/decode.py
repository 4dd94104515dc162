"""``turbo bench decode``: one decode step of one attention layer, every contender in one run.

A step is what a layer does for each new token: put the token's K/V into its cache, then attend
one query per sequence over the whole cache. Contenders, same shapes, same inputs:

* ``turbo-int4`` / ``turbo-mix`` — our packed cache (``QuantizedKVLayer``), read in place by the
  backend ``turbo_attention`` picks (the fused CPU kernel on CPU, Triton on CUDA); ``turbo-mix``
  holds ~35 % of the KV heads at INT2;
* ``sdpa`` — a preallocated float cache (float32 on CPU, float16 on CUDA: what serving keeps)
  and ``scaled_dot_product_attention``: the baseline, ``ratio_vs_sdpa`` = its time / ours;
* ``quanto-int4`` — transformers' ``QuantoQuantizedLayer`` (4 bits, groups of 64, residual
  64) + SDPA over what its ``update`` returns (it dequantizes the whole cache every step).

``limit_ms`` = bytes the contender must move per step / the copy bandwidth measured in the same
run: the packed bytes for ours, the float cache for SDPA, packed + a float copy written and read
for quanto. It is the floor a bandwidth-bound implementation would reach. Scale: at SmolLM2's
shape, batch 8 and 4096 tokens, one layer holds 2·8·3·4096·64·4 B = 50 MiB of float32 K/V
against ~6.6 MiB packed INT4, and the scores + P·V are 2·2·8·9·4096·64 ≈ 75 MFLOP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from turbo_core.attention.config import TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.functional import choose_backend, turbo_attention
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.bench.common import describe_device, median, time_call

MIX_INT2_FRACTION = 0.35


@dataclass(frozen=True)
class Shape:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int


SHAPES = {"smollm2": Shape("smollm2", 9, 3, 64), "llama8b": Shape("llama8b", 32, 8, 128)}
FULL = {"shapes": ["smollm2", "llama8b"], "batches": [1, 4, 8], "contexts": [1024, 4096, 16384],
        "prefill": [2048, 8192]}
QUICK = {"shapes": ["smollm2"], "batches": [1, 4, 8], "contexts": [1024, 4096], "prefill": [2048, 8192]}


def copy_bandwidth(device: torch.device, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second moved by a large copy (read + write counted), median of repeats."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    ms = median(time_call(lambda: dst.copy_(src), warmup=1, repeats=repeats, device=device))
    return 2 * src.numel() * 4 / (ms / 1e3)


def _turbo(bits: list[int], k, v, q, new_k, new_v) -> tuple[Callable[[], object], int, str]:
    cache = QuantizedKVLayer(bits, k.shape[-1], KVQuantConfig())
    cache.append(k, v)

    def step() -> torch.Tensor:  # exactly TurboCacheLayer.update + the "turbo" attention
        cache.update(new_k, new_v)
        return turbo_attention(q, None, None, kv_store=cache, math_cfg=TURBO_DEFAULT).out

    backend = choose_backend(q, None, None, kv_store=cache, math_cfg=TURBO_DEFAULT)[0]
    return step, cache.nbytes(), backend


def _sdpa(k, v, q, new_k, new_v, extra: int) -> tuple[Callable[[], object], int, str]:
    b, h, ctx, d = k.shape
    keys = torch.empty(b, h, ctx + extra, d, dtype=k.dtype, device=k.device)
    values = torch.empty_like(keys)
    keys[:, :, :ctx], values[:, :, :ctx] = k, v
    pos = [ctx]

    def step() -> torch.Tensor:
        at = pos[0]
        keys[:, :, at:at + 1], values[:, :, at:at + 1] = new_k, new_v
        pos[0] += 1
        return F.scaled_dot_product_attention(q, keys[:, :, :at + 1], values[:, :, :at + 1],
                                              enable_gqa=q.shape[1] != h)

    return step, 2 * k.numel() * k.element_size(), "sdpa"


def _quanto(k, v, q, new_k, new_v) -> tuple[Callable[[], object], int, str]:
    from transformers.cache_utils import QuantoQuantizedLayer

    from turbo_core.hf.cache import tensor_bytes

    layer = QuantoQuantizedLayer(nbits=4, q_group_size=64, residual_length=64)
    layer.update(k, v)

    def step() -> torch.Tensor:
        keys, values = layer.update(new_k, new_v)
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=q.shape[1] != k.shape[1])

    held = tensor_bytes(layer._quantized_keys) + tensor_bytes(layer._quantized_values)
    return step, held, "sdpa"


def _case(shape: Shape, batch: int, ctx: int, device: torch.device, repeats: int, bw: float,
          log: Callable[[str], None]) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(ctx + batch)
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, device=device).to(dtype)

    h, d = shape.kv_heads, shape.head_dim
    k, v = rnd(batch, h, ctx, d), rnd(batch, h, ctx, d)
    q = rnd(batch, shape.q_heads, 1, d)
    new_k, new_v = rnd(batch, h, 1, d), rnd(batch, h, 1, d)
    n2 = round(MIX_INT2_FRACTION * shape.kv_heads)
    float_bytes = 2 * k.numel() * k.element_size()
    contenders = {
        "sdpa": _sdpa(k, v, q, new_k, new_v, extra=repeats + 2),
        "turbo-int4": _turbo([4] * shape.kv_heads, k, v, q, new_k, new_v),
        "turbo-mix": _turbo([2] * n2 + [4] * (shape.kv_heads - n2), k, v, q, new_k, new_v),
        "quanto-int4": _quanto(k, v, q, new_k, new_v),
    }
    rows = []
    for name, (step, kv_bytes, backend) in contenders.items():
        log(f"decode {shape.name} batch={batch} context={ctx}: {name} ({backend})")
        moved = kv_bytes + (2 * float_bytes if name == "quanto-int4" else 0)
        rows.append({"contender": name, "backend": backend, "shape": shape.name, "batch": batch,
                     "context": ctx, "median_ms": median(time_call(step, warmup=1, repeats=repeats,
                                                                  device=device)),
                     "kv_bytes": kv_bytes, "limit_ms": moved / bw * 1e3})
    base = rows[0]["median_ms"]
    for r in rows:
        r["ratio_vs_sdpa"] = base / r["median_ms"]
    return rows


def run(quick: bool = False, repeats: int = 5, device: str | None = None,
        log: Callable[[str], None] = print) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = QUICK if quick else FULL
    bw = copy_bandwidth(dev)
    results = []
    for name in grid["shapes"]:
        for batch in grid["batches"]:
            for ctx in grid["contexts"]:
                results += _case(SHAPES[name], batch, ctx, dev, repeats, bw, log)
    doc = {"benchmark": "decode", "mode": "quick" if quick else "full", "device": describe_device(dev),
           "threads": torch.get_num_threads(), "repeats": repeats, "copy_bandwidth_gb_s": bw / 1e9,
           "shapes": {n: asdict(SHAPES[n]) for n in grid["shapes"]}, "results": results,
           "step": "append one token to the cache + attend one query per sequence over all of it"}
    if dev.type == "cpu":  # the C++ ops' other two rows (the CUDA path writes with torch ops)
        from turbo_core.bench import cache_ops

        smol = SHAPES["smollm2"]
        mix = round(MIX_INT2_FRACTION * smol.kv_heads)
        doc["append"] = cache_ops.append_rows(smol, grid["batches"], 1024, repeats, mix, log)
        doc["prefill"] = cache_ops.prefill_rows(smol, grid["prefill"], max(1, repeats // 3), mix, log)
    return doc


def table(doc: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    keys = ["shape", "batch", "context", "contender", "backend", "median_ms", "ratio_vs_sdpa",
            "limit_ms", "kv_bytes"]
    rows = [[r[k] if k != "kv_bytes" else f"{r[k] / 2**20:.2f} MiB" for k in keys] for r in doc["results"]]
    head = (f"device {doc['device']['name']} ({doc['device']['type']}), "
            f"{doc.get('threads', '?')} threads, copy bandwidth "
            f"{doc['copy_bandwidth_gb_s']:.1f} GB/s, median of {doc['repeats']}; "
            f"ratio_vs_sdpa > 1 is faster than SDPA\n")
    text = head + tabulate(rows, headers=keys, tablefmt=fmt, floatfmt=".3f")
    if doc.get("append") or doc.get("prefill"):
        from turbo_core.bench import cache_ops

        text += "\n\n" + cache_ops.table(doc, fmt)
    if doc.get("instructions"):
        from turbo_core.bench import instructions

        text += "\n\n" + instructions.table(doc["instructions"], fmt)
    if "end_to_end" in doc:
        from turbo_core.bench import decode_e2e

        text += "\n\n" + decode_e2e.table(doc["end_to_end"], fmt)
    return text
