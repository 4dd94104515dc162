"""Airflow callbacks: when a task fails, say in one log line where to look. Torch-free."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("turbo.pipeline")


def where_to_look(context: dict) -> str:
    ti = context.get("ti") or context.get("task_instance")
    run = context.get("dag_run")
    parts = [f"task {getattr(ti, 'task_id', '?')}"
             + (f"[{ti.map_index}]" if getattr(ti, "map_index", -1) not in (-1, None) else ""),
             f"run {getattr(run, 'run_id', '?')}", f"try {getattr(ti, 'try_number', '?')}"]
    if getattr(ti, "log_url", None):
        parts.append(f"log {ti.log_url}")
    parts.append(f"MLflow {os.environ.get('MLFLOW_TRACKING_URI', 'local store (turbo_core.tracking.runs)')}"
                 " (runs tagged airflow.run_id)")
    exc = context.get("exception")
    if exc is not None:
        parts.append(f"error {type(exc).__name__}: {exc}")
    return "; ".join(parts)


def on_task_failure(context: dict) -> None:
    log.error("turbo_nightly task failed: %s", where_to_look(context))


def on_task_retry(context: dict) -> None:
    """A try failed and Airflow will run the task again: the same line, saying so."""
    log.warning("turbo_nightly task failed, retry pending: %s", where_to_look(context))
