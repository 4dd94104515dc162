"""turbo_nightly: calibrate → evaluate + gate → choose → build → push → roll out → verify →
promote, with rollback when a deploy step fails. All logic lives in turbo_core.pipeline; this
file only declares the DAG (nothing heavy is imported at parse time)."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from turbo_core.pipeline import pods, tasks
from turbo_core.pipeline.callbacks import on_task_failure, on_task_retry
from turbo_core.pipeline.params import PARAMS

DOC = """
### TurboAttention nightly

Calibrates each chosen variant's head priorities, evaluates it on held-out text and applies
the gates — perplexity, top-1 agreement and KL drift against the float baseline, KV
compression, decode speed-up over the float engine (default: not slower), and long-context
recall (passkey and multi-key needle; default: everything the baseline recalls) — picks the
best passing variant against the MLflow champion, builds and pushes the serving image, rolls
it out (kubernetes / docker / none), verifies it under a bounded load (p95 latency gate) and
promotes the MLflow `champion` alias. A failed deploy step triggers `rollback`; `summary`
always runs and tells what happened. Trigger by hand with *Trigger DAG w/ config* to change any parameter.
"""


def _done(value):
    if isinstance(value, tasks.Skip):
        raise AirflowSkipException(value.reason)
    return value


def _run_info() -> dict:
    ctx = get_current_context()
    run = ctx["dag_run"]
    trigger = "nightly" if str(run.run_type).endswith("scheduled") else "manual"
    return {"trigger": trigger, "dag_id": run.dag_id, "run_id": run.run_id, "conf": run.conf}


@dag(
    dag_id="turbo_nightly",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=6),
    params={name: Param(**spec) for name, spec in PARAMS.items()},
    # one retry after Airflow's [core] default_task_retry_delay (300 s unless configured):
    # time for a tracking server or registry to come back (docs/operations.md)
    default_args={"retries": 1,
                  "execution_timeout": timedelta(hours=2),
                  "on_failure_callback": on_task_failure, "on_retry_callback": on_task_retry},
    tags=["turbo-attention", "llm", "quantization"],
    doc_md=DOC,
)
def turbo_nightly():
    @task(retries=0, execution_timeout=timedelta(minutes=30))
    def prepare() -> dict:
        info = _run_info()
        return tasks.prepare(info["conf"], trigger=info["trigger"], dag_id=info["dag_id"],
                             run_id=info["run_id"])

    @task(retries=0)
    def variant_names(prep: dict) -> list[str]:
        return prep["variants"]

    @task(map_index_template="{{ variant }}")
    def calibrate(prep: dict, variant: str) -> dict:
        return tasks.calibrate(prep, variant)

    @task(map_index_template="{{ calibrated['variant'] }}")
    def evaluate(prep: dict, calibrated: dict) -> dict:
        return tasks.evaluate(prep, calibrated)

    @task.short_circuit(ignore_downstream_trigger_rules=False, retries=0)
    def choose(prep: dict, results: list[dict]):
        chosen = tasks.choose(prep, list(results))
        if isinstance(chosen, tasks.Skip):
            print(f"nothing to deploy: {chosen.reason}")
            return False
        return chosen

    @task(execution_timeout=timedelta(minutes=45), retries=0)  # failures here are not transient
    def build_image(prep: dict, chosen: dict) -> dict:
        return _done(tasks.build_image(prep, chosen))

    @task
    def push_image(prep: dict, built: dict) -> dict:
        return _done(tasks.push_image(prep, built))

    @task(trigger_rule=TriggerRule.NONE_FAILED, retries=0)
    def roll_out(prep: dict, chosen: dict) -> dict:
        ti = get_current_context()["ti"]
        built = ti.xcom_pull(task_ids="build_image", default=None)
        pushed = ti.xcom_pull(task_ids="push_image", default=None)
        return tasks.roll_out(prep, chosen, built, pushed)

    @task(retries=2, retry_delay=timedelta(seconds=30))
    def verify(prep: dict, chosen: dict, rolled: dict) -> dict:
        return _done(tasks.verify(prep, chosen, rolled))

    @task(retries=0)
    def promote(prep: dict, chosen: dict, verified: dict) -> dict:
        return _done(tasks.promote(prep, chosen, verified))

    @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0)
    def rollback(prep: dict) -> dict:
        ti = get_current_context()["ti"]
        return tasks.rollback(prep, ti.xcom_pull(task_ids="roll_out", default=None))

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def summary(prep: dict) -> dict:
        ti = get_current_context()["ti"]
        pulled = {k: ti.xcom_pull(task_ids=k, default=None) for k in
                  ("choose", "build_image", "push_image", "roll_out", "verify", "promote",
                   "rollback")}
        results = ti.xcom_pull(task_ids="evaluate", default=None)
        if isinstance(results, dict):  # a single mapped instance comes back unwrapped
            results = [results]
        return tasks.finish(prep, results, pulled)

    prep = prepare()
    # calibrate/evaluate run in the worker or, by configuration, as pods (pipeline/pods.py)
    results = pods.calibrate_and_evaluate(prep, variant_names(prep), calibrate, evaluate)
    chosen = choose(prep, results)
    built = build_image(prep, chosen)
    pushed = push_image(prep, built)
    rolled = roll_out(prep, chosen)
    pushed >> rolled
    verified = verify(prep, chosen, rolled)
    promoted = promote(prep, chosen, verified)
    undone = rollback(prep)
    [built, pushed, rolled, verified] >> undone
    [promoted, undone] >> summary(prep)


turbo_nightly()
