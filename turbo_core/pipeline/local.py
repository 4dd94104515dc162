"""Run ``turbo_nightly`` on this machine: Airflow on SQLite under ``$TURBO_HOME/airflow``, the
DAG executed in-process by ``dag.test()`` (what ``airflow dags test`` does), MLflow's local
store. Used by the README's main command and by the tests."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from turbo_core.pipeline import tasks

ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "turbo_nightly"


def airflow_home() -> Path:
    from turbo_core.fileio import data_dir

    return Path(os.environ.get("AIRFLOW_HOME") or data_dir() / "airflow")


def airflow_env(home: Path) -> dict[str, str]:
    """Settings for a local Airflow (before ``airflow`` is imported)."""
    return {"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}


def default_target() -> tuple[str, str]:
    """``("docker", why)`` when a Docker engine answers, else ``("none", why)``: what ``auto``
    means here. ``why`` says what was found and, for ``none``, the one command that makes the
    next run build and deploy."""
    if tasks.engine_reachable():
        return "docker", "a Docker engine answers"
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if shutil.which("dockerd") or shutil.which("docker"):
        start = ("sudo systemctl start docker" if shutil.which("systemctl")
                 else "sudo dockerd > dockerd.log 2>&1 &")
        return "none", (f"Docker is installed but no engine answers at {where}, so no image was "
                        f"built or deployed; start it with `{start}` and run again")
    return "none", (f"no Docker engine on this machine (nothing answers at {where}), so no image "
                    f"was built or deployed; install one with `sudo apt-get install docker.io` "
                    f"and run again")


def run(conf: dict) -> dict:
    """Validate ``conf``, run the DAG once, return run state, task states and the summary.

    Airflow's task logs (what ``dag.test()`` prints on stdout) go to ``airflow.log`` in the
    run's folder (``result["log"]``); the terminal gets one line per task as it ends (state,
    duration) and the progress bars (stderr)."""
    from turbo_core.pipeline.params import validate

    validate(conf)  # refuse bad parameters before Airflow starts
    os.environ.update(airflow_env(airflow_home()))
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils import db
    from airflow.utils.session import create_session

    started = datetime.now(UTC)
    log_path = tasks.work_dir_for(None).parent / f"airflow-{started:%Y%m%dT%H%M%S%f}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with _stdout_to(log_path) as terminal:
        print(f"task logs: {log_path} (moved to the run's folder at the end)", file=terminal,
              flush=True)
        db.initdb()
        bag = DagBag(dag_folder=str(ROOT / "dags"))
        if bag.import_errors:
            raise RuntimeError(f"DAG import errors: {bag.import_errors}")
        with _TaskLines(started, terminal):
            dag_run = bag.get_dag(DAG_ID).test(run_conf=conf)
    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == DAG_ID,
                                                 TaskInstance.run_id == dag_run.run_id)
        states = sorted(({"task_id": ti.task_id, "map_index": ti.map_index,
                          "label": ti.rendered_map_index, "state": str(ti.state)} for ti in tis),
                        key=lambda t: (t["task_id"], t["map_index"]))
    work = tasks.work_dir_for(dag_run.run_id)
    work.mkdir(parents=True, exist_ok=True)
    final_log = work / "airflow.log"
    shutil.move(log_path, final_log)
    summary_path = work / tasks.SUMMARY_FILE
    return {"dag_id": DAG_ID, "run_id": dag_run.run_id, "state": str(dag_run.state),
            "deploy_target": conf.get("deploy_target"), "log": str(final_log),
            "seconds": round(time.monotonic() - start, 1), "tasks": states,
            "summary": json.loads(summary_path.read_text()) if summary_path.is_file() else None}


@contextlib.contextmanager
def _stdout_to(path: Path):
    """Send file descriptor 1 (Airflow's structured logs, any child's stdout) to ``path``;
    yield a stream on the terminal's stdout for what the person watching should see."""
    sys.stdout.flush()
    saved = os.dup(1)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 1)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            terminal.close()


class _TaskLines(threading.Thread):
    """While the DAG runs, print a line for each task instance that ends (state, duration),
    read from Airflow's database once a second."""

    def __init__(self, since: datetime, out) -> None:
        super().__init__(name="task-lines", daemon=True)
        self.since, self.out, self.seen = since, out, set()
        self.done = threading.Event()

    def __enter__(self) -> _TaskLines:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(timeout=10)
        self.poll()  # the last tasks, ended after the final tick

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.poll()

    def poll(self) -> None:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy.exc import OperationalError

        try:
            with create_session() as session:
                rows = session.query(TaskInstance).filter(
                    TaskInstance.dag_id == DAG_ID, TaskInstance.end_date.is_not(None),
                    TaskInstance.start_date >= self.since).all()
                ended = [(ti.task_id, ti.map_index, ti.rendered_map_index, str(ti.state),
                          ti.start_date, ti.end_date) for ti in rows]
        except OperationalError:  # the database is busy with the run: next tick
            return
        for task_id, index, label, state, begin, end in sorted(ended, key=lambda r: r[5]):
            if (task_id, index) in self.seen:
                continue
            self.seen.add((task_id, index))
            name = task_id + (f"[{label or index}]" if index >= 0 else "")
            seconds = (end - begin).total_seconds()
            print(f"  {name:<28} {state.split('.')[-1].lower():<16} {seconds:7.1f} s",
                  file=self.out, flush=True)


def report(result: dict, target_note: str | None = None) -> str:
    """What happened, and how to look closer; ``target_note``: why ``auto`` chose the target."""
    lines = [f"DAG run {result['run_id']}: {result['state']} in {result['seconds']} s", ""]
    for t in result["tasks"]:
        label = f"[{t['label'] or t['map_index']}]" if t["map_index"] >= 0 else ""
        lines.append(f"  {t['task_id'] + label:<28} {t['state']}")
    if result["summary"]:
        lines += ["", tasks.render(result["summary"])]
    if target_note:
        lines += ["", f"Deploy target {result.get('deploy_target', '?')} (auto): {target_note}"]
    from turbo_core.tracking import runs as tracking

    lines += ["", "Look closer:",
              f"  Task logs:   {result.get('log')}",
              f"  Airflow UI:  scripts/ui.sh   (AIRFLOW_HOME={airflow_home()}; user admin)",
              f"  MLflow UI:   scripts/ui.sh   (tracking store {tracking.tracking_uri()})",
              "  Compare:     turbo compare"]
    return "\n".join(lines)


def clear(run_id: str, task: str, *, downstream: bool = True, only_failed: bool = False) -> int:
    """Clear ``task`` (and what follows it) in one run of turbo_nightly, so the scheduler runs
    it again with that run's parameters; returns how many task instances were cleared. What
    the Airflow UI's "Clear task instance" does, for one run by its id (``airflow tasks
    clear`` selects runs by date, which SQLite compares as text and misses same-day runs)."""
    os.environ.update(airflow_env(airflow_home()))
    from airflow.models.dagrun import DagRun
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        if not session.query(DagRun).filter(DagRun.dag_id == DAG_ID,
                                            DagRun.run_id == run_id).count():
            raise ValueError(f"turbo_nightly has no run {run_id!r} in {airflow_home()}")
    dag = SerializedDagModel.get_dag(DAG_ID)
    if dag is None:
        raise ValueError(f"turbo_nightly is not in the database at {airflow_home()}")
    if task not in dag.task_ids:
        raise ValueError(f"turbo_nightly has no task {task!r} (it has {', '.join(sorted(dag.task_ids))})")
    subset = dag.partial_subset(task_ids=[task], include_downstream=downstream,
                                include_upstream=False)
    return subset.clear(run_id=run_id, only_failed=only_failed)
