"""The turbo_nightly DAG: integrity (imports fast, nothing heavy at parse time, schedule,
params), full local runs on a tiny model (one variant passes, one fails its gate; none
passes), and bad parameters refused before any work. Airflow runs in subprocesses with their
own AIRFLOW_HOME, TURBO_HOME and MLflow store."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import small

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "mlflow", "docker", "kubernetes", "turbo_core.hf.models")

pytestmark = pytest.mark.slow  # every test runs the DAG (Airflow, MLflow, the tiny model): minutes


def _env(tmp_path: Path) -> dict:
    return os.environ | {"AIRFLOW_HOME": str(tmp_path / "airflow"),
                         "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                         "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                         "TURBO_HOME": str(tmp_path / "turbo"),
                         "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}


def _py(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)


def test_dag_file_imports_fast_and_light(tmp_path):
    dag_file = str(ROOT / "dags" / "turbo_nightly.py")
    code = ("import importlib.util, json, sys, time; t = time.monotonic();"
            f"spec = importlib.util.spec_from_file_location('d', {dag_file!r});"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m);"
            f"heavy = [h for h in {HEAVY!r} if h in sys.modules];"
            "print(json.dumps({'s': time.monotonic() - t, 'heavy': heavy}))")
    res = _py(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [], f"heavy modules imported at parse time: {got['heavy']}"
    assert got["s"] < 10, f"DAG file took {got['s']:.1f} s to import"


def test_dagbag_schedule_params_and_tasks(tmp_path):
    code = """
import json
from airflow.utils import db; db.initdb()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=__import__('os').environ['AIRFLOW__CORE__DAGS_FOLDER'])
d = bag.get_dag('turbo_nightly')
print(json.dumps({'errors': {k: str(v)[-500:] for k, v in bag.import_errors.items()},
  'schedule': d.timetable.expression, 'catchup': d.catchup, 'max_active_runs': d.max_active_runs,
  'timeout': d.dagrun_timeout.total_seconds(), 'params': d.params.dump(),
  'schema': {k: d.params.get_param(k).schema for k in d.params},
  'tasks': sorted(t.task_id for t in d.tasks), 'tags': sorted(d.tags),
  'retries': d.default_args.get('retries'), 'callback': bool(d.default_args.get('on_failure_callback'))}))
"""
    res = _py(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    from turbo_core.pipeline.params import PARAMS, defaults

    assert got["errors"] == {}
    assert got["schedule"] == "0 2 * * *" and got["catchup"] is False and got["max_active_runs"] == 1
    assert 0 < got["timeout"] <= 24 * 3600 and got["retries"] >= 1 and got["callback"]
    assert got["params"] == defaults()
    assert got["schema"]["variants"]["items"]["enum"] == PARAMS["variants"]["items"]["enum"]
    assert got["schema"]["variants"]["examples"]  # the UI's multi-select needs examples
    assert got["tasks"] == sorted(["prepare", "variant_names", "calibrate", "evaluate", "choose",
                                   "build_image", "push_image", "roll_out", "verify", "promote",
                                   "rollback", "summary"])


def _mlflow(tmp_path: Path):
    """A client of the run's own store; the registry URI is given too, or a URI set earlier in
    this process (another test's tracking.configure()) would be used for the registry."""
    from mlflow import MlflowClient

    uri = _env(tmp_path)["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _pipeline(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "run.json"
    res = subprocess.run([sys.executable, "-m", "turbo_core.cli", "pipeline", "run", *args,
                          "--json", str(out)], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=900)
    return res, json.loads(out.read_text()) if out.is_file() else None


SMALL = small.PIPELINE_CONF


def _states(run: dict) -> dict:
    return {(t["task_id"], t["label"] or t["map_index"]): t["state"].split(".")[-1].lower()
            for t in run["tasks"]}


def test_full_run_one_variant_passes_one_fails(tmp_path, tiny_dir):
    # at the tests' 128-token windows turbo-int4 keeps 2.5x, turbo-int2 3.0x (their accuracy on
    # the tiny random model is the same): the compression gate passes one and refuses the other
    conf = SMALL | {"min_kv_compression": 2.7}
    res, run = _pipeline(tmp_path, "--model", str(tiny_dir), "--variants", "turbo-int4",
                         "turbo-int2", "--deploy-target", "none", "--conf", json.dumps(conf))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = _states(run)
    assert st[("calibrate", "turbo-int4")] == st[("calibrate", "turbo-int2")] == "success"
    assert st[("evaluate", "turbo-int4")] == st[("evaluate", "turbo-int2")] == "success"
    assert st[("choose", -1)] == st[("roll_out", -1)] == st[("summary", -1)] == "success"
    for skipped in ("build_image", "push_image", "verify", "promote", "rollback"):
        assert st[(skipped, -1)] == "skipped", (skipped, st)
    summary = run["summary"]
    gate = {v["variant"]: v["passed"] for v in summary["variants"]}
    assert gate == {"turbo-int4": False, "turbo-int2": True}
    assert summary["chosen"] == "turbo-int2" and summary["rollout"]["status"] == "rendered"
    assert "chosen: turbo-int2" in res.stdout and "Airflow UI" in res.stdout
    # the terminal shows a line per task as it ends; Airflow's task logs are in the run folder
    assert "[DAG TEST]" not in res.stdout and len(res.stdout.splitlines()) < 60, res.stdout
    assert re.search(r"^  calibrate\[turbo-int4\] +success +\d+\.\d s$", res.stdout, re.M)
    log = Path(run["log"])
    assert log.name == "airflow.log" and (log.parent / "summary.json").is_file()  # the run's folder
    assert log.is_file() and "[DAG TEST] starting task_id=prepare" in log.read_text()
    assert f"Task logs:   {log}" in res.stdout

    client = _mlflow(tmp_path)
    exp = client.get_experiment_by_name("turbo-attention/" + tiny_dir.name)
    runs = client.search_runs([exp.experiment_id])
    assert sorted((r.data.tags["turbo.variant"], r.data.tags["turbo.stage"]) for r in runs) == [
        ("turbo-int2", "calibrate"), ("turbo-int2", "evaluate"),
        ("turbo-int4", "calibrate"), ("turbo-int4", "evaluate")]
    assert {r.data.tags["airflow.run_id"] for r in runs} == {run["run_id"]}
    assert {r.data.tags["turbo.trigger"] for r in runs} == {"manual"}
    evals = {r.data.tags["turbo.variant"]: r for r in runs if r.data.tags["turbo.stage"] == "evaluate"}
    assert evals["turbo-int4"].data.tags["turbo.gate"] == "failed"
    name = f"turbo-{tiny_dir.name}"
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert challenger.run_id == evals["turbo-int2"].info.run_id
    assert [v.version for v in client.search_model_versions(f"name='{name}'")] == [challenger.version]
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(name, "champion")  # 'none' target: nothing deployed


def test_no_variant_passes_short_circuits_with_the_reason(tmp_path, tiny_dir):
    conf = SMALL | {"max_ppl_delta_pct": 0.0, "min_top1_agreement": 0.999}
    res, run = _pipeline(tmp_path, "--model", str(tiny_dir), "--variants", "turbo-int2",
                         "--deploy-target", "none", "--conf", json.dumps(conf))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    st = _states(run)
    assert st[("choose", -1)] == "success" and st[("summary", -1)] == "success"
    for skipped in ("build_image", "push_image", "roll_out", "verify", "promote", "rollback"):
        assert st[(skipped, -1)] == "skipped", (skipped, st)
    assert run["summary"]["chosen"] is None and "chosen: none" in res.stdout


def test_failed_deploy_step_runs_rollback_and_fails_the_run(tmp_path, tiny_dir):
    env_no_engine = {"DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}"}
    out = tmp_path / "run.json"
    res = subprocess.run([sys.executable, "-m", "turbo_core.cli", "pipeline", "run", "--model",
                          str(tiny_dir), "--variants", "turbo-int4", "--deploy-target", "docker",
                          "--conf", json.dumps(SMALL), "--json", str(out)],
                         env=_env(tmp_path) | env_no_engine, capture_output=True, text=True,
                         timeout=900)
    run = json.loads(out.read_text())
    assert res.returncode == 1 and run["state"].endswith("failed"), res.stdout[-3000:]
    st = _states(run)
    assert st[("build_image", -1)] == "failed" and st[("rollback", -1)] == "success"
    assert st[("summary", -1)] == "failed" and st[("promote", -1)] in ("upstream_failed", "skipped")
    assert run["summary"]["rollback"]["reason"] == "nothing was deployed by this run"
    assert "PROBLEM: a deploy step failed" in res.stdout
    logs = Path(run["log"]).read_text() + res.stderr  # the task logs are in the run's folder
    assert "turbo_nightly task failed: task build_image" in logs and "no Docker engine reachable" in logs


def _gate_failed(run: dict, variant: str) -> list[str]:
    (row,) = [v for v in run["summary"]["variants"] if v["variant"] == variant]
    assert row["passed"] is False
    return row["reasons"]


def test_slow_variant_fails_the_latency_gate_and_nothing_ships(tmp_path, tiny_dir):
    """The reference backend forced: the packed cache is decompressed in Python every step,
    slower than the float engine; the default decode gate (not slower) refuses it."""
    conf = {k: v for k, v in SMALL.items() if k != "min_decode_speedup"}
    env = {"TURBO_ATTENTION_BACKEND": "reference",
           "DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}"}  # nothing could be deployed
    out = tmp_path / "run.json"
    res = subprocess.run([sys.executable, "-m", "turbo_core.cli", "pipeline", "run", "--model",
                          str(tiny_dir), "--variants", "turbo-int4", "--deploy-target", "docker",
                          "--conf", json.dumps(conf), "--json", str(out)],
                         env=_env(tmp_path) | env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads(out.read_text())
    reasons = _gate_failed(run, "turbo-int4")
    assert len(reasons) == 1 and reasons[0].startswith("decode_speedup = 0."), reasons
    assert "needs >= 1 (misses by 0." in reasons[0]
    st = _states(run)
    for skipped in ("build_image", "push_image", "roll_out", "verify", "promote", "rollback"):
        assert st[(skipped, -1)] == "skipped", (skipped, st)
    assert run["summary"]["chosen"] is None and run["summary"]["image"] == {}
    assert "gate failed: decode_speedup = 0." in res.stdout


@pytest.mark.slow
def test_variant_that_forgets_fails_the_retrieval_gate(tmp_path):
    """SmolLM2 recalls a pass key and a keyed number at 512 tokens; turbo-int2 does not. The
    other gates are opened so that recall alone decides."""
    conf = {"eval_tokens": 256, "eval_window": 128, "calib_tokens": 256, "speed_context": 64,
            "speed_batch": 2, "retrieval_lengths": [512], "retrieval_samples": 3,
            "max_ppl_delta_pct": 1000.0, "min_top1_agreement": 0.0, "max_kl": 100.0,
            "min_decode_speedup": 0.0}
    res, run = _pipeline(tmp_path, "--model", "smollm2", "--variants", "turbo-int2",
                         "--deploy-target", "none", "--conf", json.dumps(conf))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (row,) = run["summary"]["variants"]
    m = row["metrics"]
    assert m["retrieval_accuracy_baseline"] >= 0.5 and m["retrieval_kept_upper"] < 0.9, m
    reasons = _gate_failed(run, "turbo-int2")
    assert reasons == [f"retrieval_kept_upper = {m['retrieval_kept_upper']:.6g}, needs >= 0.9 "
                       f"(misses by {0.9 - m['retrieval_kept_upper']:.3g}; retrieval_kept = "
                       f"{m['retrieval_kept']:.6g}; retrieval_known = {m['retrieval_known']})"], reasons
    assert run["summary"]["chosen"] is None and "gate failed: retrieval_kept_upper" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["--variants", "turbo-int4", "turbo-int3"], "variants/1: 'turbo-int3' is not one of"),
    (["--conf", '{"max_ppl_delta_pct": -1}'], "max_ppl_delta_pct: -1 is less than the minimum"),
])
def test_bad_params_refused_before_any_work(tmp_path, args, words):
    res, run = _pipeline(tmp_path, "--deploy-target", "none", *args)
    assert res.returncode == 2 and words in res.stderr, res.stderr[-2000:]
    assert run is None and not (tmp_path / "airflow").exists() and not (tmp_path / "turbo").exists()


def test_airflow_params_refuse_bad_conf_too(tmp_path):
    code = """
from airflow.utils import db; db.initdb()
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import ParamValidationError

d = DagBag(dag_folder=__import__('os').environ['AIRFLOW__CORE__DAGS_FOLDER']).get_dag('turbo_nightly')
for conf in ({'variants': ['nope']}, {'min_top1_agreement': -0.5}):
    try:
        d.test(run_conf=conf)
        print('RAN', conf)
    except ParamValidationError as exc:
        print('REFUSED', exc)
"""
    res = _py(code, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RAN" not in res.stdout  # refused before a run was created
    assert "'nope' is not one of" in res.stdout and "-0.5 is less than the minimum of 0" in res.stdout


@pytest.mark.slow
def test_full_run_docker_target_builds_deploys_verifies_and_promotes(tmp_path, tiny_dir,
                                                                     docker_services):
    from turbo_core.http import free_port

    client, registry = docker_services
    port = free_port()
    conf = SMALL | {"serve_port": port}
    try:
        res, run = _pipeline(tmp_path, "--model", str(tiny_dir), "--variants", "turbo-int4",
                             "--deploy-target", "docker", "--image-repository",
                             f"{registry}/turbo-dag-test", "--conf", json.dumps(conf))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        st = _states(run)
        for ok in ("build_image", "roll_out", "verify", "promote", "summary"):
            assert st[(ok, -1)] == "success", (ok, st)
        assert st[("push_image", -1)] == "skipped" and st[("rollback", -1)] == "skipped"
        summary = run["summary"]
        assert summary["rollout"]["status"] == "deployed" and summary["verify_ok"] is True
        assert summary["promoted"]["champion"] == summary["chosen_version"] == "1"
        container = client.containers.get(f"turbo-attention-{port}")
        assert container.status == "running"
        assert container.labels["turbo-attention.dev/variant"] == "turbo-int4"
        mlc = _mlflow(tmp_path)
        champion = mlc.get_model_version_by_alias(f"turbo-{tiny_dir.name}", "champion")
        assert str(champion.version) == "1" and champion.tags["validation_status"] == "deployed_verified"
        assert mlc.get_run(champion.run_id).data.tags["rollout.status"] == "deployed"
    finally:
        for c in client.containers.list(all=True, filters={"label": "turbo-attention.dev/deployment"}):
            if c.name.startswith(f"turbo-attention-{port}"):
                c.remove(force=True)
