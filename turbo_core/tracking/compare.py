"""``turbo compare``: variants side by side across MLflow runs and experiments."""

from __future__ import annotations

from tabulate import tabulate

from turbo_core.tracking import runs as tracking

KEY_METRICS = ("ppl_delta_pct", "top1_agreement", "kl_mean", "kl_p99", "kv_compression",
               "kv_bytes_per_token", "sas_zero_fraction", "prefill_speedup", "decode_speedup",
               "decode_tokens_per_s", "retrieval_accuracy", "retrieval_accuracy_baseline",
               "retrieval_kept")
SKIP_PARAMS = {"variant", "code_version"}


def collect(experiments: list[str] | None = None, run_ids: list[str] | None = None,
            latest_only: bool = True) -> list[dict]:
    """Finished evaluation runs as flat rows (newest first; one per experiment and variant
    unless ``latest_only`` is off or explicit ``run_ids`` are given)."""
    import mlflow
    from mlflow import MlflowClient

    tracking.configure()
    client = MlflowClient()
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        names = experiments or [e.name for e in client.search_experiments()
                                if e.name.startswith("turbo-attention/")]
        missing = [n for n in names if mlflow.get_experiment_by_name(n) is None]
        if missing:
            raise ValueError(f"no MLflow experiment named {missing} at {tracking.tracking_uri()}")
        runs = mlflow.search_runs(
            experiment_names=names, output_format="list", order_by=["attributes.start_time DESC"],
            filter_string="tags.`turbo.stage` = 'evaluate' and attributes.status = 'FINISHED'")
    rows, seen = [], set()
    for run in runs:
        key = (run.info.experiment_id, run.data.tags.get("turbo.variant"))
        if latest_only and not run_ids and key in seen:
            continue
        seen.add(key)
        rows.append({
            "run_id": run.info.run_id,
            "experiment": client.get_experiment(run.info.experiment_id).name,
            "variant": run.data.tags.get("turbo.variant", "?"),
            "gate_passed": run.data.tags.get("turbo.gate") == "passed",
            "gate_reasons": run.data.tags.get("turbo.gate_reasons", ""),
            "params": dict(run.data.params),
            **{k: run.data.metrics.get(k) for k in KEY_METRICS},
        })
    if not rows:
        raise ValueError("no finished evaluation runs to compare")
    return rows


def differing_params(rows: list[dict]) -> list[str]:
    keys = sorted({k for r in rows for k in r["params"]} - SKIP_PARAMS)
    return [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]


def table(rows: list[dict], fmt: str = "simple") -> str:
    params = differing_params(rows)
    headers = ["variant", "gate", *KEY_METRICS, *params]
    body = []
    for r in rows:
        metrics = [("" if r[k] is None else f"{r[k]:.4g}") for k in KEY_METRICS]
        body.append([r["variant"], "pass" if r["gate_passed"] else "FAIL", *metrics,
                     *[r["params"].get(p, "") for p in params]])
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)
