"""``turbo bench train``: a small causal language model trained with each attention option.

The model: bytes of the bundled text (``turbo_core.hf.data``, 256 symbols), learned positions,
two pre-norm :class:`~turbo_core.attention.modules.TransformerBlock` layers (embed 192, 4 heads,
~1.0M parameters), a linear head. Every run has the same seed, data order, optimiser (AdamW,
cosine schedule) and steps; only the attention option differs.

Two kinds of option (the module's docstring says why):

* **structural** — kernel attention (FAVOR+, elu+1) is a different layer: it is trained as
  itself, one run each, and evaluated as itself;
* **inference approximations** — SAS (cubic, piecewise), top-p, per-head cut-offs — train as
  exact attention (their rounding and dropped keys have no useful gradient), so they share the
  exact run's weights and differ in the held-out loss with the option applied.

Linformer gets no row: its projections mix every token of the sequence into each projected
row, so in a causal language model each position would see the tokens it must predict.

Output: per option the final training loss (mean of the last tenth of the steps), the held-out
loss in eval mode, the median step time, and a PNG of the loss curves.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

from turbo_core.attention.adaptive import calibrate_cutoffs
from turbo_core.attention.config import EXACT, AttentionMath, FeatureMap, SASConfig
from turbo_core.attention.modules import TransformerBlock
from turbo_core.bench.common import describe_device
from turbo_core.hf.data import load_split


@dataclass(frozen=True)
class TrainSetup:
    steps: int = 1200
    batch: int = 16
    seq: int = 128
    embed: int = 192
    heads: int = 4
    layers: int = 2
    lr: float = 3e-3
    seed: int = 0
    eval_batches: int = 8

    def __post_init__(self) -> None:
        if min(self.steps, self.batch, self.seq, self.embed, self.heads, self.layers,
               self.eval_batches) < 1 or self.embed % self.heads or not self.lr > 0:
            raise ValueError(f"invalid training setup: {self}")


# trained runs (structural options train as themselves; "exact" also carries the approximations)
TRAINED: dict[str, AttentionMath] = {
    "exact": EXACT,
    "favor+": AttentionMath(kernel=FeatureMap.FAVOR, num_features=128, redraw_every=100),
    "elu+1": AttentionMath(kernel=FeatureMap.ELU),
}
# evaluated on the exact run's weights
APPLIED: dict[str, AttentionMath] = {
    "sas (cubic)": AttentionMath(sas=SASConfig()),
    "sas (quadratic)": AttentionMath(sas=SASConfig(degree=2)),
    "sas (quadratic, lut_steps 4)": AttentionMath(sas=SASConfig(degree=2, lut_steps=4)),
    "top-p 0.9": AttentionMath(top_p=0.9),
    "per-head cut-offs": AttentionMath(sas=SASConfig()),  # cut-offs calibrated per layer
}


class TinyLM(nn.Module):
    def __init__(self, s: TrainSetup, math_cfg: AttentionMath):
        super().__init__()
        self.embed = nn.Embedding(256, s.embed)
        self.pos = nn.Parameter(torch.zeros(s.seq, s.embed))
        self.blocks = nn.ModuleList(TransformerBlock(s.embed, s.heads, math_cfg=math_cfg, feature_seed=i)
                                    for i in range(s.layers))
        self.norm = nn.LayerNorm(s.embed)
        self.head = nn.Linear(s.embed, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.head(self.norm(x))

    def set_math(self, math_cfg: AttentionMath) -> None:
        for block in self.blocks:
            block.attn.math_cfg = math_cfg


def _batches(data: torch.Tensor, s: TrainSetup, count: int, gen: torch.Generator):
    for _ in range(count):
        start = torch.randint(0, data.numel() - s.seq - 1, (s.batch,), generator=gen)
        rows = torch.stack([data[i: i + s.seq + 1] for i in start.tolist()])
        yield rows[:, :-1], rows[:, 1:]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


def _held_out(model: TinyLM, data: torch.Tensor, s: TrainSetup) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(s.seed + 1)
    with torch.no_grad():
        losses = [float(_loss(model, x, y)) for x, y in _batches(data, s, s.eval_batches, gen)]
    return statistics.mean(losses)


def _calibrated(model: TinyLM, data: torch.Tensor, s: TrainSetup) -> list[AttentionMath]:
    """Per layer, SAS cut-offs per head from one held-out batch (its queries and keys)."""
    x, _ = next(_batches(data, s, 1, torch.Generator().manual_seed(s.seed + 2)))
    out, h = [], model.embed(x) + model.pos[: x.shape[1]]
    with torch.no_grad():
        for block in model.blocks:
            y = block.norm1(h)
            q, k, v = (t.reshape(x.shape[0], x.shape[1], s.heads, -1).transpose(1, 2)
                       for t in block.attn._project(y, y, y, same=True))
            out.append(AttentionMath(sas=calibrate_cutoffs(q, k, v, causal=True).sas()))
            h = block(h, is_causal=True)
    return out


def _train(name: str, math_cfg: AttentionMath, train: torch.Tensor, s: TrainSetup,
           log: Callable[[str], None]) -> tuple[TinyLM, dict]:
    torch.manual_seed(s.seed)
    model = TinyLM(s, math_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(s.seed)
    losses, times = [], []
    model.train()
    for step, (x, y) in enumerate(_batches(train, s, s.steps, gen), start=1):
        t0 = time.perf_counter()
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"training {name}: loss is {losses[-1]} at step {step}")
        if step % max(1, s.steps // 10) == 0 or step == s.steps:
            log(f"[{name}] step {step}/{s.steps} loss {losses[-1]:.3f} ({times[-1]:.0f} ms)")
    tail = losses[-max(1, s.steps // 10):]
    return model, {"losses": losses, "final_train_loss": statistics.mean(tail),
                   "step_ms": statistics.median(times),
                   "parameters": sum(p.numel() for p in model.parameters())}


def run(setup: TrainSetup | None = None, text: str | None = None,
        log: Callable[[str], None] | None = None) -> dict:
    """Train every option; the JSON-ready result document."""
    s = setup or TrainSetup()
    log = log or (lambda m: print(m, flush=True))
    split = load_split(text)
    train = torch.frombuffer(bytearray(split.evaluation.encode()), dtype=torch.uint8).long()
    held = torch.frombuffer(bytearray(split.calibration.encode()), dtype=torch.uint8).long()
    if min(train.numel(), held.numel()) <= s.seq + 1:
        raise ValueError(f"text {split.source} is too short for sequences of {s.seq} bytes")
    rows = []
    for name, cfg in TRAINED.items():
        model, res = _train(name, cfg, train, s, log)
        rows.append({"option": name, "trains_as": "itself" if cfg.structural else "exact",
                     "held_out_loss": _held_out(model, held, s), **res})
        if name != "exact":
            continue
        for applied, acfg in APPLIED.items():
            if applied == "per-head cut-offs":
                per_layer = _calibrated(model, held, s)
                for block, layer_cfg in zip(model.blocks, per_layer, strict=True):
                    block.attn.math_cfg = layer_cfg
                detail = [list(c.sas.head_lut_max) for c in per_layer]
            else:
                model.set_math(acfg)
                detail = None
            rows.append({"option": applied, "trains_as": "exact (the exact run's weights)",
                         "held_out_loss": _held_out(model, held, s), "losses": None,
                         "final_train_loss": None, "step_ms": None,
                         "parameters": res["parameters"], "cutoffs": detail})
            log(f"[{applied}] held-out loss {rows[-1]['held_out_loss']:.4f}")
        model.set_math(EXACT)
    return {"benchmark": "train", "setup": dataclasses.asdict(s), "text": split.source,
            "text_sha256": split.sha256, "device": describe_device(torch.device("cpu")),
            "not_run": {"linformer": "not causal: its projections mix every token of the "
                                     "sequence into each row, so a causal LM would see the "
                                     "tokens it predicts"},
            "results": rows}


def table(doc: dict, fmt: str = "simple") -> str:
    exact = next(r for r in doc["results"] if r["option"] == "exact")
    fmt_loss = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    rows = [[r["option"], r["trains_as"], fmt_loss(r["final_train_loss"]), fmt_loss(r["held_out_loss"]),
             f"{r['held_out_loss'] - exact['held_out_loss']:+.4f}",
             "—" if r["step_ms"] is None else f"{r['step_ms']:.1f}"] for r in doc["results"]]
    s = doc["setup"]
    title = (f"causal byte LM, {s['layers']} layers, embed {s['embed']}, {s['heads']} heads, "
             f"{exact['parameters'] / 1e6:.2f}M parameters, {s['steps']} steps of {s['batch']} x "
             f"{s['seq']} bytes; loss in nats per byte")
    return title + "\n\n" + tabulate(rows, headers=["option", "trains as", "final train loss",
                                                     "held-out loss", "vs exact", "step ms"],
                                     tablefmt=fmt, disable_numparse=True)


def plot(doc: dict, path: str | Path) -> Path:
    """The training loss curves, one per trained run."""
    from turbo_core.tracking.plots import loss_curves

    curves = {f"{r['option']} ({r['step_ms']:.0f} ms/step)": r["losses"]
              for r in doc["results"] if r["losses"]}
    return loss_curves(curves, path, "TinyLM on the bundled text: attention options at equal steps",
                       "training loss (nats per byte)", skip=len(next(iter(curves.values()))) // 10)
