"""``turbo bench kernels``: the Triton kernels against PyTorch's fp16 paths, in one run.

Prefill: TFLOP/s = 4·B·H·L²·D / t (halved for causal) for the fused SAS + INT8 kernel
(quantization of Q and K included in its time) and for ``F.scaled_dot_product_attention`` in
fp16 with the flash backend. Decode: latency of one new token over a packed INT4 cache
(views prepared once, as a serving loop keeps them) against SDPA over an fp16 cache.
On CPU the kernels run in Triton's interpreter: a tiny smoke mode whose times are NOT
performance numbers (the result says so).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

from turbo_core.attention.config import TURBO_DEFAULT, KVQuantConfig
from turbo_core.bench.common import describe_device, median, time_call

GPU_PREFILL = {"lengths": [1024, 2048, 4096, 8192, 16384], "head_dims": [64, 128], "tokens": 65536,
               "heads": 16}
GPU_DECODE = {"contexts": [4096, 8192, 16384, 32768], "batch": 8, "kv_heads": 8, "group": 4,
              "head_dim": 128}
SMOKE_PREFILL = {"lengths": [128], "head_dims": [64], "tokens": 128, "heads": 2}
SMOKE_DECODE = {"contexts": [256], "batch": 1, "kv_heads": 2, "group": 2, "head_dim": 64}


def _sdpa_flash(q, k, v, causal: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def prefill_rows(dev: torch.device, spec: dict, repeats: int, log) -> list[dict]:
    from turbo_kernels.prefill import prefill_attention

    rows = []
    for d in spec["head_dims"]:
        for length in spec["lengths"]:
            batch = max(1, spec["tokens"] // length)
            h = spec["heads"]
            gen = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(batch, h, length, d, device=dev, dtype=torch.float16,
                                   generator=gen) for _ in range(3))
            for causal in (False, True):
                flops = 4 * batch * h * length * length * d * (0.5 if causal else 1.0)
                log(f"prefill L={length} D={d} causal={causal}")
                t_turbo = median(time_call(
                    lambda q=q, k=k, v=v, c=causal: prefill_attention(q, k, v, math_cfg=TURBO_DEFAULT,
                                                                      causal=c),
                    warmup=1, repeats=repeats, device=dev))
                t_sdpa = median(time_call(_sdpa_flash(q, k, v, causal), warmup=1, repeats=repeats,
                                          device=dev))
                rows.append({"batch": batch, "heads": h, "seq": length, "head_dim": d,
                             "causal": causal, "turbo_ms": t_turbo, "sdpa_fp16_ms": t_sdpa,
                             "turbo_tflops": flops / t_turbo / 1e9, "sdpa_tflops": flops / t_sdpa / 1e9,
                             "speedup_vs_sdpa": t_sdpa / t_turbo})
    return rows


def decode_rows(dev: torch.device, spec: dict, repeats: int, log) -> list[dict]:
    from turbo_kernels.decode import decode_attention

    from turbo_core.attention.kvcache import QuantizedKVLayer

    b, hkv, g, d = spec["batch"], spec["kv_heads"], spec["group"], spec["head_dim"]
    rows = []
    for ctx in spec["contexts"]:
        log(f"decode context={ctx}")
        gen = torch.Generator(device=dev).manual_seed(1)
        k = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.float16, generator=gen)
        v = torch.randn(b, hkv, ctx, d, device=dev, dtype=torch.float16, generator=gen)
        q = torch.randn(b, hkv * g, 1, d, device=dev, dtype=torch.float16, generator=gen)
        cache = QuantizedKVLayer([4] * hkv, d, KVQuantConfig())
        cache.append(k, v)

        def turbo(q=q, cache=cache) -> torch.Tensor:  # the view is taken per step, as in serving
            return decode_attention(q, cache.view(), math_cfg=TURBO_DEFAULT)

        def fp16(q=q, k=k, v=v) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        t_turbo = median(time_call(turbo, warmup=1, repeats=repeats, device=dev))
        t_fp16 = median(time_call(fp16, warmup=1, repeats=repeats, device=dev))
        rows.append({"batch": b, "q_heads": hkv * g, "kv_heads": hkv, "head_dim": d, "context": ctx,
                     "turbo_int4_ms": t_turbo, "sdpa_fp16_cache_ms": t_fp16,
                     "speedup_vs_fp16": t_fp16 / t_turbo,
                     "kv_bytes_int4": cache.nbytes(), "kv_bytes_fp16": 2 * k.numel() * 2})
    return rows


def run(device: str | None = None, repeats: int | None = None) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    smoke = dev.type != "cuda"
    if smoke:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("on CPU the kernel benchmark runs Triton's interpreter: set "
                             "TRITON_INTERPRET=1 (the `turbo bench kernels` command does)")
    repeats = repeats or (1 if smoke else 10)

    def log(msg: str) -> None:
        print(f"[bench kernels] {msg}", file=sys.stderr, flush=True)

    prefill = prefill_rows(dev, SMOKE_PREFILL if smoke else GPU_PREFILL, repeats, log)
    decode = decode_rows(dev, SMOKE_DECODE if smoke else GPU_DECODE, repeats, log)
    return {
        "benchmark": "kernels",
        "mode": "interpreter-smoke (not performance)" if smoke else "gpu",
        "flop_formula": "4*B*H*L^2*D (x0.5 causal)",
        "math": "SAS cubic T=8 + INT8 Q·Kᵀ (quantization included), fp16 P·V",
        "repeats": repeats,
        "device": describe_device(dev),
        "prefill": prefill,
        "decode": decode,
    }


def tables(doc: dict, fmt: str = "simple") -> str:
    p = tabulate([[r["seq"], r["head_dim"], r["causal"], f"{r['turbo_tflops']:.1f}",
                   f"{r['sdpa_tflops']:.1f}", f"{r['speedup_vs_sdpa']:.2f}x"] for r in doc["prefill"]],
                 headers=["L", "D", "causal", "turbo TFLOP/s", "SDPA fp16 TFLOP/s", "turbo vs SDPA"],
                 tablefmt=fmt, disable_numparse=True)
    dd = tabulate([[r["context"], f"{r['turbo_int4_ms']:.3f}", f"{r['sdpa_fp16_cache_ms']:.3f}",
                    f"{r['speedup_vs_fp16']:.2f}x", f"{r['kv_bytes_fp16'] / r['kv_bytes_int4']:.2f}x"]
                   for r in doc["decode"]],
                  headers=["context", "turbo INT4 ms", "fp16 cache ms", "speed-up", "KV smaller"],
                  tablefmt=fmt, disable_numparse=True)
    dev = doc["device"]
    head = f"kernels on {dev['type']} ({dev['name']}), torch {dev['torch']}, mode: {doc['mode']}"
    return f"{head}\n\nprefill ({doc['math']})\n{p}\n\ndecode (one token, GQA)\n{dd}"
