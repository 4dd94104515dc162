"""PNG plots for MLflow and reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def priority_heatmap(plan, path: str | Path) -> Path:
    """Layer × KV-head heat map of head priority; INT2 heads marked with a cross."""
    plt = _plt()
    grid = [[h.priority for h in layer.heads] for layer in plan.layers]
    bits = plan.bits_grid()
    fig, ax = plt.subplots(figsize=(2 + 0.6 * len(grid[0]), 1.5 + 0.22 * len(grid)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for li, row in enumerate(bits):
        for hi, b in enumerate(row):
            if b == 2:
                ax.text(hi, li, "×", ha="center", va="center", color="white", fontsize=9)
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(f"{plan.model.name}: head priority (× = INT2, {plan.selection.int2_heads} heads)")
    fig.colorbar(im, ax=ax, label="priority (gap · std of channel ranges)")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return Path(path)


def _vs_bytes(rows: list[dict], series: tuple[tuple[str, str], ...], ylabel: str, title: str):
    """One point per row and metric in ``series`` ((key, marker); the first one labelled)
    against measured KV bytes per token; green where the row passed its gates."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        x = r.get("kv_bytes_per_token")
        for n, (key, marker) in enumerate(series):
            y = r.get(key)
            if x is None or y is None:
                continue
            ax.scatter(x, y, s=40, marker=marker,
                       color="tab:green" if r.get("gate_passed") else "tab:red")
            if n == 0:
                ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(5, 4),
                            fontsize=8)
    ax.set_xlabel("KV bytes per token (measured)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def accuracy_vs_bytes(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Perplexity change against KV bytes per token, one labelled point per variant."""
    fig, ax = _vs_bytes(rows, (("ppl_delta_pct", "o"),), "perplexity change vs baseline (%)",
                        title or "accuracy vs KV memory (green = gates passed)")
    ys = [r.get("ppl_delta_pct") for r in rows if r.get("ppl_delta_pct") is not None]
    if ys and max(ys) > 100:  # collapsed contenders: keep the usable ones readable
        ax.set_yscale("symlog", linthresh=10)
    return _save(fig, path)


def latency(rows: list[dict], path: str | Path) -> Path:
    """Prefill and decode throughput per variant, the float baseline of the same run beside."""
    plt = _plt()
    names = [r["variant"] for r in rows]
    at = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(8, 1.8 + 0.5 * len(rows)))
    for ax, key, label in ((axes[0], "prefill_tokens_per_s", "prefill tokens/s"),
                           (axes[1], "decode_tokens_per_s", "decode tokens/s")):
        ax.barh([y + 0.2 for y in at], [r.get(key) or 0.0 for r in rows], height=0.4,
                color="tab:blue", label="variant")
        ax.barh([y - 0.2 for y in at], [r.get(key + "_baseline") or 0.0 for r in rows],
                height=0.4, color="tab:gray", label="float baseline (same run)")
        ax.set_yticks(at, names)
        ax.set_xlabel(label)
    axes[1].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def speed_vs_bytes(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Decode (and prefill) speed-up over the float baseline against KV bytes per token."""
    fig, ax = _vs_bytes(rows, (("decode_speedup", "o"), ("prefill_speedup", "^")),
                        "speed-up vs float baseline (● decode, ▲ prefill)",
                        title or "speed vs KV memory (green = gates passed; dashed = baseline)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    return _save(fig, path)


def loss_curves(curves: dict[str, list[float]], path: str | Path, title: str = "",
                ylabel: str = "training loss", skip: int = 0) -> Path:
    """One smoothed line per named curve (a running mean over a twentieth of its points), from
    point ``skip`` on (the first steps' fall would flatten the differences that matter)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        w = max(1, len(values) // 20)
        smooth = [sum(values[max(0, i - w + 1): i + 1]) / len(values[max(0, i - w + 1): i + 1])
                  for i in range(len(values))]
        ax.plot(range(skip + 1, len(smooth) + 1), smooth[skip:], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)
