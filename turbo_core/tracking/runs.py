"""MLflow tracking: one experiment per base model, one run per calibrate/evaluate of a variant.

Default store: a local ``sqlite:`` database under the data dir (``$TURBO_HOME/mlflow``);
``MLFLOW_TRACKING_URI`` points it at a server. MLflow is imported lazily (DAG parse paths stay
light).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import turbo_core
from turbo_core.fileio import data_dir

TRIGGERS = ("nightly", "manual", "cli")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = data_dir() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def configure() -> str:
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server does not answer: a transient failure (the task retries)."""


def _answers(uri: str) -> bool:
    """Whether the tracking server at ``uri`` answers its health check (a local store always
    does). Quick: 5 s, one try, so an outage is named at once rather than after MLflow's own
    minutes of retries."""
    from turbo_core.http import probe

    return not uri.startswith(("http://", "https://")) or probe(uri.rstrip("/") + "/health") is None


def require_server(what: str) -> str:
    """The tracking URI, after checking its server answers; TrackingUnavailable naming the
    URI and ``what`` was about to happen otherwise."""
    uri = tracking_uri()
    if not _answers(uri):
        raise TrackingUnavailable(f"MLflow tracking server {uri} is not answering ({what}); "
                                  f"the task fails and its retry runs once it is back")
    return uri


def experiment_name(model_name: str) -> str:
    return f"turbo-attention/{model_name}"


def experiment_id(model_name: str) -> str:
    """Get or create the model's experiment (local store: artifacts under the data dir)."""
    import mlflow

    name = experiment_name(model_name)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=_local_artifact_root(tracking_uri()))


def _local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts go beside the database (MLflow's default would be
    ``./mlruns`` in whatever the current directory is); servers manage their own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_absolute():
        db = Path.cwd() / db
    return (db.parent / "artifacts").as_uri()


def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one."""
    root = Path(turbo_core.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, check=True,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = "no-git"
    return f"{turbo_core.__version__}+{sha}"


@dataclass(frozen=True)
class RunContext:
    """Where a run comes from (tags): trigger nightly / manual / cli, Airflow ids if any."""

    trigger: str = "cli"
    airflow_dag_id: str | None = None
    airflow_run_id: str | None = None

    def __post_init__(self) -> None:
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger {self.trigger!r} must be one of {TRIGGERS}")

    def tags(self) -> dict[str, str]:
        tags = {"turbo.trigger": self.trigger, "turbo.code_version": code_version()}
        if self.airflow_dag_id:
            tags["airflow.dag_id"] = self.airflow_dag_id
        if self.airflow_run_id:
            tags["airflow.run_id"] = self.airflow_run_id
        return tags


@contextmanager
def variant_run(model_name: str, variant_name: str, stage: str,
                ctx: RunContext | None = None) -> Iterator[object]:
    """A new MLflow run (never resumed). On an exception the run ends FAILED with the error
    in the ``turbo.error`` tag and ``error.txt``, and the exception propagates. A tracking
    server that stops answering becomes TrackingUnavailable naming its URI (the run then stays
    as the server last saw it: a retry of the same Airflow task marks it FAILED)."""
    import mlflow

    configure()
    uri = require_server(f"starting the {stage} run of {variant_name}")
    ctx = ctx or RunContext()
    tags = ctx.tags() | {"turbo.variant": variant_name, "turbo.stage": stage,
                         "turbo.model": model_name}
    exp = experiment_id(model_name)
    if ctx.airflow_run_id:
        _fail_leftovers(exp, ctx.airflow_run_id, variant_name, stage)
    run = mlflow.start_run(experiment_id=exp, run_name=f"{variant_name}-{stage}", tags=tags)
    try:
        yield run
    except BaseException as exc:
        if not _answers(uri):
            _end_unreachable_run()
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} stopped answering during the {stage} run of "
                f"{variant_name} ({type(exc).__name__}: {str(exc)[:300]}); the task fails and "
                f"its retry runs once it is back") from exc
        message = f"{type(exc).__name__}: {exc}"
        mlflow.set_tag("turbo.error", message[:4000])
        mlflow.log_text(message + "\n", "error.txt")
        mlflow.end_run(status="FAILED")
        raise
    mlflow.end_run(status="FINISHED")


def _end_unreachable_run() -> None:
    """End the active run in this process (the next task in the same process must be able to
    start its own) with one quick try at telling the server, which is gone: MLflow's own
    retries would hold the failing task for minutes."""
    import contextlib

    import mlflow

    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        with contextlib.suppress(Exception):  # end_run drops the run locally before the call
            mlflow.end_run(status="FAILED")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fail_leftovers(experiment: str, airflow_run_id: str, variant: str, stage: str) -> None:
    """Runs of this Airflow run, variant and stage that an earlier try left RUNNING (its
    tracking server went away mid-run) end FAILED, saying so, before the retry starts its own."""
    from mlflow import MlflowClient

    client = MlflowClient()
    left = client.search_runs(
        [experiment], filter_string=f"tags.`airflow.run_id` = '{airflow_run_id}' and "
                                    f"tags.`turbo.variant` = '{variant}' and "
                                    f"tags.`turbo.stage` = '{stage}' and "
                                    f"attributes.status = 'RUNNING'")
    for run in left:
        client.set_tag(run.info.run_id, "turbo.error",
                       "an earlier try lost the tracking server mid-run; superseded by its retry")
        client.set_terminated(run.info.run_id, status="FAILED")


def numeric_metrics(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def log_params(params: dict[str, object]) -> None:
    import mlflow

    mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})


def log_json_artifact(payload: object, name: str) -> None:
    import mlflow

    mlflow.log_text(json.dumps(payload, indent=2) + "\n", name)


def log_png(plot_fn, *args: object, name: str) -> None:
    """Render a plot from ``turbo_core.tracking.plots`` to a temp file and log it as ``name``."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        plot_fn(*args, path)
        mlflow.log_artifact(str(path))
