"""Faults drill: what goes wrong at night, with real processes, and what is left afterwards.

* the MLflow server dies while a variant is evaluated: the task fails naming the tracking URI,
  its retry succeeds once the server is back, and MLflow holds one complete version, the lost
  try's run marked FAILED;
* the image registry refuses the push: nothing is rolled out, the rollback task says nothing
  was deployed, the previous release keeps serving (Kubernetes API emulator: no real API
  server runs here, docs/design.md §4) and the run fails saying why;
* the serving container killed while it is verified: tests/rollout/test_docker.py;
* a bad parameter from Airflow's REST API is refused before a run exists
  (tests/dags/test_airflow_standalone.py, against a real `airflow standalone`).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from small import PIPELINE_CONF

from turbo_core.http import free_port, wait_ok

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # each drill runs the DAG with real servers


class MlflowServer:
    """A real `mlflow server` on a fixed port and store, stopped like a crash and started again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        log = (self.root / "mlflow-server.log").open("a")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_ok(f"{self.url}/health", 120, lambda: None if self.proc.poll() is None else
                (self.root / "mlflow-server.log").read_text()[-2000:])

    def crash(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _wait(what: str, condition, timeout_s: float, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def test_mlflow_lost_mid_evaluation_fails_the_task_naming_it_and_the_retry_succeeds(
        tmp_path, tiny_dir):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        _lose_and_recover(server, tmp_path, tiny_dir)
    finally:
        if server.proc.poll() is None:
            server.crash()


def _lose_and_recover(server: MlflowServer, tmp_path: Path, tiny_dir: Path) -> None:
    """Kill the server once the evaluate run exists, start it again after the failed try, and
    check what the pipeline and the store hold afterwards."""
    from mlflow import MlflowClient

    env = os.environ | {
        "AIRFLOW_HOME": str(tmp_path / "airflow"), "TURBO_HOME": str(tmp_path / "turbo"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "MLFLOW_TRACKING_URI": server.url,
        # the retry waits 30 s (Airflow's default is 300 s): the server is back well before
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "30",
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    out = tmp_path / "run.json"
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "turbo_core.cli", "pipeline", "run", "--model", str(tiny_dir),
         "--variants", "turbo-int4", "--deploy-target", "none",
         "--conf", json.dumps(PIPELINE_CONF), "--json", str(out)],
        env=env, stdout=(tmp_path / "pipeline.out").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        client = MlflowClient(tracking_uri=server.url, registry_uri=server.url)

        def evaluating():
            exp = client.get_experiment_by_name(f"turbo-attention/{tiny_dir.name}")
            return exp and client.search_runs(
                [exp.experiment_id], "tags.`turbo.stage` = 'evaluate' and "
                                     "attributes.status = 'RUNNING'")

        (lost,) = _wait("the evaluate run to start", evaluating, 600)
        server.crash()  # mid-evaluation: the run's next call to the server fails
        logs = tmp_path / "turbo"

        def failed_try():
            for log in logs.rglob("airflow*.log"):
                text = log.read_text(errors="replace")
                if f"MLflow tracking server {server.url} stopped answering" in text and \
                        "retry pending" in text:
                    return text
            return None

        text = _wait("the evaluate task to fail naming the server", failed_try, 300, 1.0)
        assert "turbo_nightly task failed, retry pending: task evaluate" in text
        server.start()  # back before the retry (30 s after the failure)
        assert pipeline.wait(timeout=900) == 0, (tmp_path / "pipeline.out").read_text()[-4000:]
    finally:
        if pipeline.poll() is None:
            os.killpg(pipeline.pid, signal.SIGKILL)
    if server.proc.poll() is not None:
        server.start()  # read what the store holds
    run = json.loads(out.read_text())
    states = {(t["task_id"], t["label"]): t["state"].split(".")[-1].lower() for t in run["tasks"]}
    assert states[("evaluate", "turbo-int4")] == "success" and run["summary"]["chosen"] == "turbo-int4"
    evals = client.search_runs(
        [lost.info.experiment_id], "tags.`turbo.stage` = 'evaluate'", order_by=["start_time"])
    assert [r.info.status for r in evals] == ["FAILED", "FINISHED"]
    assert evals[0].info.run_id == lost.info.run_id
    assert "superseded by its retry" in evals[0].data.tags["turbo.error"]
    name = f"turbo-{tiny_dir.name}"
    (version,) = client.search_model_versions(f"name='{name}'")  # one, and complete
    assert version.run_id == evals[1].info.run_id
    assert version.tags["validation_status"] == "passed_gates"
    assert client.get_model_version_by_alias(name, "challenger").version == version.version


def _read_only_registry(root: Path) -> tuple[subprocess.Popen, str]:
    """Debian's docker-registry in read-only mode: pulls answer, pushes are refused."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "registry.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"  maintenance:\n    readonly:\n      enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "registry.yml")],
                            stdout=(root / "registry.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_ok(f"http://127.0.0.1:{port}/v2/", 60,
            lambda: None if proc.poll() is None else (root / "registry.log").read_text())
    return proc, f"127.0.0.1:{port}"


def test_registry_refusing_the_push_deploys_nothing_and_the_previous_release_serves(
        tmp_path, tiny_dir, docker_services):
    from kube_emulator import RunningCluster
    from oci import push_manifest

    from turbo_core.rollout import run as rollout
    from turbo_core.rollout.kube import KubeOptions

    _, registry = docker_services
    served = f"{tiny_dir.name}:turbo-int4"
    previous = f"{registry}/turbo/server@" + push_manifest(registry, "turbo/server", "v1", "v1")
    ro, ro_registry = _read_only_registry(tmp_path / "ro-registry")
    try:
        with RunningCluster() as c:
            c.cluster.namespaces.add("serving")
            c.cluster.behaviour[previous] = "good"
            c.cluster.models[previous] = served
            kubeconfig = c.kubeconfig(tmp_path / "kubeconfig")
            first = rollout.run("kubernetes", previous, overlay="cpu-dev", model=tiny_dir.name,
                                variant="turbo-int4", mlflow_version="1",
                                kube=KubeOptions(namespace="serving", kubeconfig=str(kubeconfig),
                                                 poll_s=0.05, timeout_s=5))
            assert first.status == "deployed", first.reason
            writes = c.patches()
            env = os.environ | {
                "AIRFLOW_HOME": str(tmp_path / "airflow"), "TURBO_HOME": str(tmp_path / "turbo"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "KUBECONFIG": str(kubeconfig),
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1"}  # the push's one retry, at once
            conf = PIPELINE_CONF | {"namespace": "serving", "overlay": "cpu-dev"}
            out = tmp_path / "run.json"
            res = subprocess.run(
                [sys.executable, "-m", "turbo_core.cli", "pipeline", "run", "--model",
                 str(tiny_dir), "--variants", "turbo-int4", "--deploy-target", "kubernetes",
                 "--image-repository", f"{ro_registry}/turbo-drill", "--conf", json.dumps(conf),
                 "--json", str(out)], env=env, capture_output=True, text=True, timeout=1500)
            run = json.loads(out.read_text())
            assert res.returncode == 1 and run["state"].endswith("failed"), res.stdout[-3000:]
            states = {t["task_id"]: t["state"].split(".")[-1].lower() for t in run["tasks"]
                      if t["map_index"] < 0}
            assert states["build_image"] == "success" and states["push_image"] == "failed"
            assert states["roll_out"] in ("upstream_failed", "skipped"), states
            assert states["rollback"] == "success" and states["promote"] != "success"
            assert run["summary"]["rollback"]["reason"] == "nothing was deployed by this run"
            assert "PROBLEM: a deploy step failed" in res.stdout
            logs = Path(run["log"]).read_text()
            assert "turbo_nightly task failed: task push_image" in logs and "push of" in logs
            assert c.patches() == writes  # not one write to the cluster
            dep = c.deployment("serving")
            assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == previous
            assert c.cluster.serving["turbo-attention"] == previous  # the previous release serves
    finally:
        os.killpg(ro.pid, signal.SIGTERM)
        ro.wait(timeout=30)
