"""The documented UI command for real: scripts/ui.sh starts `airflow standalone` and an MLflow
server; turbo_nightly is triggered through Airflow's REST API with a conf (JWT from the simple
auth manager), runs to success on a tiny model, and stopping the script leaves no process."""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from turbo_core.http import free_port, wait_ok

ROOT = Path(__file__).resolve().parents[2]


def _call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None):
    req = urllib.request.Request(url, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"}
                                 | ({"Authorization": f"Bearer {token}"} if token else {}))
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def _ours(home: Path) -> list[int]:
    """PIDs whose environment names this test's AIRFLOW_HOME."""
    needle = f"AIRFLOW_HOME={home}".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_ui_script_rest_trigger_with_conf_and_clean_stop(tmp_path, tiny_dir):
    af_port, ml_port = free_port(), free_port()
    home = tmp_path / "turbo" / "airflow"
    # USE_JOB_SCHEDULE=False: no cron run of the default (SmolLM2) parameters competes with
    # the triggered one (max_active_runs is 1); manual triggers still run.
    env = os.environ | {"TURBO_HOME": str(tmp_path / "turbo"), "AIRFLOW_PORT": str(af_port),
                        "MLFLOW_PORT": str(ml_port),
                        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    env.pop("AIRFLOW_HOME", None)
    proc = subprocess.Popen([str(ROOT / "scripts" / "ui.sh")], env=env, cwd=ROOT,
                            stdout=(tmp_path / "ui.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{af_port}"
    try:
        def alive():
            return None if proc.poll() is None else (tmp_path / "ui.log").read_text()[-3000:]

        wait_ok(f"{base}/api/v2/monitor/health", 240, alive)
        wait_ok(f"http://127.0.0.1:{ml_port}/health", 120, alive)
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        status, _ = _call(f"{base}/auth/token", "POST", {"username": "admin", "password": "wrong"})
        assert status == 401
        status, tok = _call(f"{base}/auth/token", "POST", {"username": "admin", "password": password})
        assert status == 201, tok
        token = tok["access_token"]
        status, _ = _call(f"{base}/api/v2/dags/turbo_nightly", token=None)
        assert status in (401, 403)  # no token, no API
        for _ in range(60):  # the dag-processor parses dags/ a few seconds after start
            status, dag = _call(f"{base}/api/v2/dags/turbo_nightly", token=token)
            if status == 200:
                break
            time.sleep(2)
        assert status == 200, dag
        assert _call(f"{base}/api/v2/dags/turbo_nightly", "PATCH", {"is_paused": False},
                     token)[0] == 200
        runs = f"{base}/api/v2/dags/turbo_nightly/dagRuns"
        for bad, words in (({"variants": ["nope"]}, "'nope' is not one of"),
                           ({"min_retrieval_kept": "high"}, "'high' is not of type 'number'"),
                           ({"max_kl": -1}, "-1 is less than the minimum of 0")):
            status, err = _call(runs, "POST", {"logical_date": None, "conf": bad}, token)
            assert status == 400 and words in json.dumps(err), (bad, status, err)
        assert _call(runs, token=token)[1]["total_entries"] == 0  # refused before a run exists
        conf = {"model": str(tiny_dir), "variants": ["turbo-int4"], "deploy_target": "none",
                "eval_tokens": 256, "eval_window": 128, "calib_tokens": 256}
        status, run = _call(runs, "POST", {"logical_date": None, "dag_run_id": "rest-1",
                                           "conf": conf}, token)
        assert status == 200, run
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = _call(f"{runs}/rest-1", token=token)[1]["state"]
            if state in ("success", "failed"):
                break
            time.sleep(3)
        status, tis = _call(f"{runs}/rest-1/taskInstances?limit=50", token=token)
        states = {(t["task_id"], t.get("rendered_map_index")): t["state"] for t in tis["task_instances"]}
        assert state == "success", states
        assert states[("calibrate", "turbo-int4")] == states[("evaluate", "turbo-int4")] == "success"
        assert states[("summary", None)] == "success" and states[("build_image", None)] == "skipped"
        assert _call(f"{runs}", token=token)[1]["total_entries"] == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # what Ctrl-C does to the script
        proc.wait(timeout=60)
    for _ in range(20):
        left = _ours(home)
        if not left:
            break
        time.sleep(1)
    assert left == [], f"processes left running: {left}"
    assert "[ui] stopped" in (tmp_path / "ui.log").read_text()
