"""``turbo bench attention``: TurboAttention vs ``nn.MultiheadAttention`` and SDPA.

Every contender is a full attention layer with the same projection weights (copied from one
``nn.MultiheadAttention``), run on the same input in one process, so the ratios compare like
with like. Reported per contender: median and min wall time over repeats (warm-up excluded),
``ratio_vs_mha`` = MHA median / contender median (> 1 means faster than MHA), throughput from
the explicit FLOP count ``4·B·H·L²·D`` (attention) ``+ 8·B·L·E²`` (four projections), and the
cosine similarity and max abs error of the output against MHA's (exact attention: how much
accuracy the approximation costs).

The article's other methods have rows too: a piecewise exponent, top-p, per-head SAS cut-offs
(calibrated on a second input of the same shape), kernel attention (FAVOR+, elu+1) and Linformer
(``low_rank`` 256, untrained projections: its error says what training must recover, not what a
trained layer loses). ``lengths`` adds a sweep of MHA against kernel attention over sequence
lengths, and where kernel attention starts to win (the cross-over).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

from turbo_core.attention.adaptive import calibrate_cutoffs, head_report
from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, FeatureMap, SASConfig
from turbo_core.attention.functional import choose_backend
from turbo_core.attention.modules import TurboAttention
from turbo_core.bench.common import describe_device, median, time_call


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    embed: int
    heads: int

    def __post_init__(self) -> None:
        if min(self.batch, self.seq, self.embed, self.heads) < 1:
            raise ValueError(f"benchmark shape values must be positive: {self}")
        if self.embed % self.heads:
            raise ValueError(f"embed {self.embed} is not divisible by heads {self.heads}")

    def flops(self, causal: bool) -> float:
        d = self.embed // self.heads
        attn = 4 * self.batch * self.heads * self.seq**2 * d * (0.5 if causal else 1.0)
        return attn + 8 * self.batch * self.seq * self.embed**2


# The source article's setup, and a quick one for smoke runs and CI.
PRESETS = {
    "article": Shape(batch=32, seq=512, embed=1024, heads=8),
    "quick": Shape(batch=4, seq=128, embed=256, heads=4),
    # the article's layer at L 4096; batch 1 so that the rows computed by the pure-PyTorch
    # reference (top-p, piecewise SAS: several (B, H, L, L) float32 tensors) fit in 24 GiB
    "long": Shape(batch=1, seq=4096, embed=1024, heads=8),
}

# TurboAttention configurations compared, by name.
TURBO_CASES: dict[str, AttentionMath] = {
    "turbo-exact": EXACT,
    "turbo-sas": AttentionMath(sas=SASConfig()),
    "turbo-sas-int8qk": TURBO_DEFAULT,
    "turbo-sas-int8qk-int8pv": dataclasses.replace(TURBO_DEFAULT, pv_int8=True),
    "turbo-sas-int8qk-top10%": dataclasses.replace(TURBO_DEFAULT, sparse_ratio=0.1),
    "turbo-sas-lut4": AttentionMath(sas=SASConfig(lut_steps=4)),
    "turbo-sas-4pieces": AttentionMath(sas=SASConfig(pieces=4)),
    "turbo-top-p0.9": AttentionMath(top_p=0.9),
    "turbo-sas-head-cutoffs": AttentionMath(sas=SASConfig()),  # cut-offs set per run
    "turbo-favor+": AttentionMath(kernel=FeatureMap.FAVOR, num_features=256),
    "turbo-elu": AttentionMath(kernel=FeatureMap.ELU),
    "turbo-linformer-256": AttentionMath(low_rank=256, max_seq_len=256),  # n set per run
}
NOT_CAUSAL = ("turbo-linformer-256",)  # Linformer mixes tokens along the sequence
KERNEL_CASES = ("turbo-favor+", "turbo-elu")


class SDPAAttention(nn.Module):
    """The same layer as MHA, with the core computed by ``F.scaled_dot_product_attention``."""

    def __init__(self, mha: nn.MultiheadAttention, causal: bool):
        super().__init__()
        self.mha, self.causal = mha, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mha
        b, seq, e = x.shape
        q, k, v = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, seq, m.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return m.out_proj(o.transpose(1, 2).reshape(b, seq, e))


def run(
    shape: Shape,
    *,
    repeats: int = 5,
    warmup: int = 1,
    causal: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Benchmark every contender; returns the JSON-ready result document."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    dev = torch.device(device)
    names = cases if cases is not None else list(TURBO_CASES)
    unknown = [n for n in names if n not in TURBO_CASES]
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {unknown}; known: {list(TURBO_CASES)}")
    if causal and cases is None:
        names = [n for n in names if n not in NOT_CAUSAL]
    elif causal and set(names) & set(NOT_CAUSAL):
        raise ValueError(f"{sorted(set(names) & set(NOT_CAUSAL))} cannot be causal (Linformer "
                         f"mixes tokens along the sequence)")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(shape.embed, shape.heads, batch_first=True).to(dev, dtype).eval()
    x = torch.randn(shape.batch, shape.seq, shape.embed, device=dev, dtype=dtype)
    mask = None
    if causal:
        mask = torch.triu(torch.ones(shape.seq, shape.seq, dtype=torch.bool, device=dev), 1)

    contenders: list[tuple[str, str, Callable[[], torch.Tensor]]] = [
        ("nn.MultiheadAttention", "torch",
         lambda: mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]),
    ]
    sdpa = SDPAAttention(mha, causal)
    contenders.append(("sdpa", "sdpa", lambda: sdpa(x)))
    heads = torch.empty(shape.batch, shape.heads, shape.seq, shape.embed // shape.heads,
                        device=dev, dtype=dtype)  # what each TurboAttention call passes on
    per_head = {}
    for name in names:
        cfg, heads_rows = _case(name, shape, mha, causal, dev, dtype)
        if heads_rows is not None:
            per_head[name] = heads_rows
        turbo = TurboAttention(shape.embed, shape.heads, batch_first=True,
                               math_cfg=cfg).to(dev, dtype).eval()
        turbo.load_state_dict(mha.state_dict(), strict=not cfg.structural)
        backend = "torch" if cfg.structural else \
            choose_backend(heads, heads, heads, math_cfg=cfg, causal=causal)[0]
        contenders.append(
            (name, backend, lambda t=turbo: t(x, x, x, need_weights=False, is_causal=causal)[0]))

    flops = shape.flops(causal)
    results = []
    reference = None
    with torch.inference_mode():
        for i, (name, backend, fn) in enumerate(contenders, start=1):
            log(f"[{i}/{len(contenders)}] {name} ({backend}): {warmup} warm-up + {repeats} timed runs")
            out = fn()
            if reference is None:
                reference = out.double().flatten()
            cos = F.cosine_similarity(out.double().flatten(), reference, dim=0).item()
            max_err = (out.double().flatten() - reference).abs().max().item()
            times = time_call(fn, warmup=warmup, repeats=repeats, device=dev)
            results.append({
                "name": name,
                "backend": backend,
                "median_ms": median(times),
                "min_ms": min(times),
                "gflops": flops / (median(times) * 1e-3) / 1e9,
                "cosine_vs_mha": cos,
                "max_abs_error_vs_mha": max_err,
            })
    mha_ms = results[0]["median_ms"]
    for r in results:
        r["ratio_vs_mha"] = mha_ms / r["median_ms"]
    return {
        "benchmark": "attention",
        "shape": dataclasses.asdict(shape) | {"head_dim": shape.embed // shape.heads,
                                                "causal": causal, "dtype": str(dtype)},
        "flop_formula": "4*B*H*L^2*D (x0.5 if causal) + 8*B*L*E^2",
        "repeats": repeats,
        "warmup": warmup,
        "device": describe_device(dev),
        "results": results,
        "per_head": per_head,
    }


def _case(name: str, shape: Shape, mha: nn.MultiheadAttention, causal: bool,
          dev: torch.device, dtype: torch.dtype) -> tuple[AttentionMath, list[dict] | None]:
    """The case's math at this shape, and for adaptive sparsity its per-head report (zeroed
    share, error against exact attention). Linformer's ``n`` is the sequence; per-head
    cut-offs are calibrated, and both reports measured, on a second input (another seed)
    through the same projections."""
    cfg = TURBO_CASES[name]
    if cfg.low_rank is not None:
        return dataclasses.replace(cfg, low_rank=min(cfg.low_rank, shape.seq), max_seq_len=shape.seq), None
    if cfg.top_p is None and name != "turbo-sas-head-cutoffs":
        return cfg, None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(min(shape.batch, 2), shape.seq, shape.embed, generator=gen).to(dev, dtype)
    with torch.inference_mode():
        q, k, v = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(x.shape[0], shape.seq, shape.heads, -1).transpose(1, 2) for t in (q, k, v))
        if cfg.top_p is not None:
            return cfg, head_report(q, k, v, cfg, causal=causal)
        report = calibrate_cutoffs(q, k, v, causal=causal)
    return dataclasses.replace(cfg, sas=report.sas(cfg.sas)), report.heads


def crossover(shape: Shape, lengths: list[int], *, repeats: int = 3, warmup: int = 1,
              device: str = "cpu", dtype: torch.dtype = torch.float32,
              log: Callable[[str], None] | None = None) -> dict:
    """MHA against each kernel-attention case over sequence lengths at ``shape``'s batch, embed
    and heads (non-causal): median ms per length, and the first length where each case wins."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = []
    for length in lengths:
        at = dataclasses.replace(shape, seq=length)
        log(f"cross-over: L = {length}")
        doc = run(at, repeats=repeats, warmup=warmup, device=device, dtype=dtype,
                  cases=list(KERNEL_CASES), log=lambda m: None)
        by = {r["name"]: r for r in doc["results"]}
        rows.append({"seq": length, "mha_ms": by["nn.MultiheadAttention"]["median_ms"],
                     **{f"{n}_ms": by[n]["median_ms"] for n in KERNEL_CASES}})
    wins = {n: next((r["seq"] for r in rows if r[f"{n}_ms"] < r["mha_ms"]), None)
            for n in KERNEL_CASES}
    return {"batch": shape.batch, "embed": shape.embed, "heads": shape.heads, "rows": rows,
            "first_win": wins}


def crossover_table(doc: dict, fmt: str = "simple") -> str:
    names = list(KERNEL_CASES)
    rows = [[r["seq"], f"{r['mha_ms']:.2f}"] + [f"{r[f'{n}_ms']:.2f} ({r['mha_ms'] / r[f'{n}_ms']:.2f}x)"
                                               for n in names] for r in doc["rows"]]
    first = ", ".join(f"{n}: L = {doc['first_win'][n]}" if doc["first_win"][n] else f"{n}: never"
                      for n in names)
    return (f"kernel attention vs MHA over L (B={doc['batch']} E={doc['embed']} H={doc['heads']}); "
            f"first win: {first}\n\n"
            + tabulate(rows, headers=["L", "MHA ms", *[f"{n} ms (vs MHA)" for n in names]],
                       tablefmt=fmt, disable_numparse=True))


def table(doc: dict, fmt: str = "simple") -> str:
    """The results as a text (``simple``) or Markdown (``github``) table."""
    rows = [
        [r["name"], r["backend"], f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['ratio_vs_mha']:.2f}x",
         f"{r['gflops']:.1f}", f"{r['cosine_vs_mha']:.6f}",
         f"{r.get('max_abs_error_vs_mha', float('nan')):.2e}"]
        for r in doc["results"]
    ]
    headers = ["contender", "backend", "median ms", "min ms", "vs MHA", "GFLOP/s", "cos vs MHA",
               "max err vs MHA"]
    s = doc["shape"]
    dev = doc["device"]
    title = (f"attention B={s['batch']} L={s['seq']} E={s['embed']} H={s['heads']} "
             f"causal={s['causal']} {s['dtype']} on {dev['type']} ({dev['name']}), "
             f"torch {dev['torch']}")
    text = title + "\n\n" + tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)
    for name, rows in (doc.get("per_head") or {}).items():
        body = [[r["head"], r.get("cutoff", ""), f"{r['zero_fraction']:.1%}", f"{r['rel_error']:.2e}",
                 f"{r['max_abs_error']:.2e}"] for r in rows]
        text += (f"\n\n{name} per head (on a second input of the same shape)\n\n"
                 + tabulate(body, headers=["head", "cut-off T", "zeroed", "rel. error vs exact",
                                           "max abs error"], tablefmt=fmt, disable_numparse=True))
    if doc.get("crossover"):
        text += "\n\n" + crossover_table(doc["crossover"], fmt)
    return text
