"""Scale-out path: with TURBO_PIPELINE_EXECUTOR=kubernetes, calibrate and evaluate become
mapped KubernetesPodOperators. No cluster is reachable here, so the pod spec is checked with
the operator's dry run (build_pod_request_obj(dry_run=True)); the step the pods run
(`turbo pipeline step`) runs for real on a tiny model, the plan travelling through MLflow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import small

from turbo_core.pipeline import params

pytestmark = pytest.mark.slow  # the scale-out steps run for real

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "registry.example:5000/turbo@sha256:" + "c" * 64


def _env(tmp_path: Path, **extra) -> dict:
    return os.environ | {"AIRFLOW_HOME": str(tmp_path / "airflow"),
                         "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                         "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                         "TURBO_HOME": str(tmp_path / "turbo"),
                         "TURBO_PIPELINE_EXECUTOR": "kubernetes", "TURBO_WORKER_IMAGE": IMAGE,
                         "TURBO_WORKER_NAMESPACE": "ml-jobs",
                         "MLFLOW_TRACKING_URI": "http://mlflow.ml.svc:5000"} | extra


def _py(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)


DAGBAG = """
import json
from airflow.utils import db; db.initdb()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=__import__('os').environ['AIRFLOW__CORE__DAGS_FOLDER'])
d = bag.get_dag('turbo_nightly')
kind = lambda t: type(t).__name__ + '/' + getattr(t, 'operator_name', '')
print(json.dumps({'errors': {k: str(v)[-800:] for k, v in bag.import_errors.items()},
  'types': {} if d is None else {t.task_id: kind(t) for t in d.tasks}}))
"""


def test_kubernetes_executor_maps_pods(tmp_path):
    res = _py(DAGBAG, _env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["errors"] == {}
    assert got["types"]["calibrate"].startswith("MappedOperator/KubernetesPodOperator")
    assert got["types"]["evaluate"].startswith("MappedOperator/KubernetesPodOperator")
    assert "summary" in got["types"] and "roll_out" in got["types"]


def test_misconfigured_scale_out_is_a_named_dag_import_error(tmp_path):
    for extra, words in (({"TURBO_WORKER_IMAGE": ""}, "needs TURBO_WORKER_IMAGE"),
                         ({"MLFLOW_TRACKING_URI": "sqlite:///x.db"}, "pods need an MLflow server")):
        res = _py(DAGBAG, _env(tmp_path, **extra))
        errors = json.loads(res.stdout.strip().splitlines()[-1])["errors"]
        assert len(errors) == 1 and words in errors.popitem()[1]


def test_pod_spec_dry_run(tmp_path):
    code = """
import json
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from kubernetes.client import ApiClient
from turbo_core.pipeline import pods

out = {}
cal = {"variant": "turbo-int4", "plan": "/x/p.json", "run_id": "r1"}
for step, args in (("calibrate", pods.calibrate_args("turbo-int4")),
                   ("evaluate", pods.evaluate_args(cal))):
    op = KubernetesPodOperator(**pods.pod_kwargs(step), arguments=args)
    out[step] = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
print(json.dumps(out))
"""
    res = _py(code, _env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    pods_ = json.loads(res.stdout.strip().splitlines()[-1])
    cal = pods_["calibrate"]
    c, sidecar = cal["spec"]["containers"]  # do_xcom_push adds the XCom sidecar
    assert sidecar["name"] == "airflow-xcom-sidecar"
    assert c["image"] == IMAGE and c["command"] == ["turbo", "pipeline", "step", "calibrate"]
    assert c["args"][-2:] == ["--variant", "turbo-int4"] and "xcom_pull" in c["args"][1]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml.svc:5000"} in c["env"]
    assert cal["metadata"]["namespace"] == "ml-jobs"
    assert cal["metadata"]["labels"]["turbo-attention.dev/step"] == "calibrate"
    assert cal["spec"]["securityContext"]["runAsNonRoot"] is True
    assert cal["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    ev = pods_["evaluate"]["spec"]["containers"][0]
    assert ev["command"][-1] == "evaluate" and json.loads(ev["args"][-1])["run_id"] == "r1"


def test_the_pod_step_runs_for_real_with_the_plan_through_mlflow(tmp_path, tiny_dir):
    env = os.environ | {"TURBO_HOME": str(tmp_path / "turbo"),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
                        "TURBO_MODEL_DIR": str(tiny_dir)}
    prep = params.validate(small.PIPELINE_CONF) | {
        "model": "elsewhere", "model_name": tiny_dir.name, "model_dir": "/not/here",
        "trigger": "manual", "dag_id": "turbo_nightly", "run_id": "pod-run",
        "work_dir": "/not/writable"}

    def step(*args):
        xcom = tmp_path / f"{args[0]}.json"
        res = subprocess.run([sys.executable, "-m", "turbo_core.cli", "pipeline", "step", *args,
                              "--prep", json.dumps(prep), "--xcom", str(xcom)], env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(xcom.read_text())

    cal = step("calibrate", "--variant", "turbo-int4")
    assert cal["variant"] == "turbo-int4" and cal["run_id"]
    Path(cal["plan"]).unlink()  # as if in another pod: only MLflow has the plan
    ev = step("evaluate", "--calibrated", json.dumps(cal))
    assert ev["variant"] == "turbo-int4" and ev["passed"] and ev["version"] == "1"
    # 128 tokens: the 16 sinks shift the 64-token grid, one page + 64 INT8 rows (2.7x)
    assert ev["metrics"]["kv_compression"] > 2.5
