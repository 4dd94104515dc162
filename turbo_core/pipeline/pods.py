"""Scale-out: calibrate and evaluate as Kubernetes pods (KubernetesPodOperator) from a worker
image that holds ``turbo`` and the model (the serving image does: ``TURBO_MODEL_DIR``).

Chosen at DAG-parse time by configuration, since it changes the DAG's operators:

* ``TURBO_PIPELINE_EXECUTOR=kubernetes`` (default ``local``: in-process tasks)
* ``TURBO_WORKER_IMAGE`` — ``repo@sha256:…`` of the worker image (required)
* ``TURBO_WORKER_NAMESPACE`` (default ``default``), ``TURBO_WORKER_GPUS`` (default 1)
* ``MLFLOW_TRACKING_URI`` — an MLflow *server* both the workers and the pods reach: the pods
  log their runs there and the evaluate pod fetches the calibrate pod's plan from it.

Each pod runs ``turbo pipeline step …`` and writes its result to ``/airflow/xcom/return.json``.
"""

from __future__ import annotations

import json
import os

EXECUTOR_ENV = "TURBO_PIPELINE_EXECUTOR"
PREP_TEMPLATE = "{{ ti.xcom_pull(task_ids='prepare') | tojson }}"


def executor() -> str:
    value = os.environ.get(EXECUTOR_ENV, "local")
    if value not in ("local", "kubernetes"):
        raise ValueError(f"{EXECUTOR_ENV}={value!r}: choose 'local' or 'kubernetes'")
    return value


def calibrate_and_evaluate(prep, names, calibrate_task, evaluate_task):
    """Wire the mapped calibrate → evaluate steps into the DAG being parsed; returns the
    evaluate results (an XComArg). ``calibrate_task``/``evaluate_task`` are the DAG's in-worker
    tasks, used unless ``TURBO_PIPELINE_EXECUTOR=kubernetes`` asks for pods."""
    if executor() == "kubernetes":
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        cal = KubernetesPodOperator.partial(**pod_kwargs("calibrate")).expand(
            arguments=names.map(calibrate_args))
        prep >> cal
        ev = KubernetesPodOperator.partial(**pod_kwargs("evaluate")).expand(
            arguments=cal.output.map(evaluate_args))
        return ev.output
    calibrated = calibrate_task.partial(prep=prep).expand(variant=names)
    return evaluate_task.partial(prep=prep).expand(calibrated=calibrated)


def pod_kwargs(step: str) -> dict:
    """KubernetesPodOperator arguments for ``step`` (``calibrate`` or ``evaluate``)."""
    from kubernetes.client import models as k8s

    image = os.environ.get("TURBO_WORKER_IMAGE")
    if not image:
        raise ValueError("TURBO_PIPELINE_EXECUTOR=kubernetes needs TURBO_WORKER_IMAGE "
                         "(the worker image, repo@sha256:…)")
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not tracking.startswith(("http://", "https://")):
        raise ValueError("pods need an MLflow server: set MLFLOW_TRACKING_URI to http(s)://… "
                         f"(got {tracking!r})")
    gpus = str(int(os.environ.get("TURBO_WORKER_GPUS", "1")))
    requests = {"cpu": "4", "memory": "16Gi"} | ({"nvidia.com/gpu": gpus} if gpus != "0" else {})
    limits = {"memory": "32Gi"} | ({"nvidia.com/gpu": gpus} if gpus != "0" else {})
    return {
        "task_id": step, "name": f"turbo-{step}", "image": image,
        "namespace": os.environ.get("TURBO_WORKER_NAMESPACE", "default"),
        "cmds": ["turbo", "pipeline", "step", step],
        "env_vars": [k8s.V1EnvVar(name="MLFLOW_TRACKING_URI", value=tracking),
                     k8s.V1EnvVar(name="TURBO_ATTENTION_BACKEND", value="auto"),
                     k8s.V1EnvVar(name="HOME", value="/tmp")],
        "container_resources": k8s.V1ResourceRequirements(requests=requests, limits=limits),
        "tolerations": [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists",
                                         effect="NoSchedule")] if gpus != "0" else [],
        "security_context": k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=10001),
        "do_xcom_push": True, "get_logs": True, "on_finish_action": "delete_succeeded_pod",
        "startup_timeout_seconds": 900,
        "labels": {"app.kubernetes.io/part-of": "turbo-attention-pipeline",
                   "turbo-attention.dev/step": step},
    }


def calibrate_args(variant: str) -> list[str]:
    return ["--prep", PREP_TEMPLATE, "--variant", variant]


def evaluate_args(calibrated: dict) -> list[str]:
    return ["--prep", PREP_TEMPLATE, "--calibrated", json.dumps(calibrated)]
