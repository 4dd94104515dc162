"""Pipeline stages as plain functions (the CLI and the Airflow DAG call these): calibrate and
evaluate + gate a variant, each tracked as its own MLflow run."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from turbo_core.attention.plan import BitPlan
from turbo_core.attention.variants import Variant
from turbo_core.hf import calibrate as calib
from turbo_core.hf import data, evaluate, models
from turbo_core.pipeline.params import default_gates
from turbo_core.tracking import datasets, plots
from turbo_core.tracking import model_registry as registry
from turbo_core.tracking import runs as tracking
from turbo_core.tracking.gates import GateDecision, GateSet


@dataclass(frozen=True)
class EvalOutcome:
    run_id: str
    result: dict
    decision: GateDecision
    version: str | None  # registered model version when the gates passed


def _model_params(lm: models.LoadedModel) -> dict[str, object]:
    return {"model": lm.name, "model_path": lm.path.name, "weights_sha256": lm.weights_sha256,
            "num_layers": lm.shape.num_layers, "num_kv_heads": lm.shape.num_kv_heads,
            "head_dim": lm.shape.head_dim, "code_version": tracking.code_version()}


def calibrate_variant(lm: models.LoadedModel, variant: Variant, out: str | Path, *,
                      text: str | None = None, max_tokens: int = 4096, seed: int = 0,
                      ctx: tracking.RunContext | None = None) -> tuple[BitPlan, str]:
    """Calibrate, save the plan to ``out`` and log it (run stage ``calibrate``)."""
    import mlflow

    with tracking.variant_run(lm.name, variant.name, "calibrate", ctx) as run:
        tracking.log_params(variant.params() | _model_params(lm) | {"calib_max_tokens": max_tokens})
        plan = calib.calibrate(lm, variant, text_path=text, max_tokens=max_tokens, seed=seed)
        plan.save(out)
        split = data.load_split(text)
        datasets.log_text("calibration", split.calibration, split.source,
                          plan.calibration["tokens"])
        mlflow.log_param("data_sha256", plan.calibration["data_sha256"])
        mlflow.log_artifact(str(out))
        tracking.log_png(plots.priority_heatmap, plan, name="head_priority.png")
        return plan, run.info.run_id


def evaluate_variant(lm: models.LoadedModel, variant: Variant, *, plan: BitPlan | None,
                     base_model: str, settings: evaluate.EvalSettings | None = None,
                     text: str | None = None, gates: GateSet | None = None,
                     register: bool = True, ctx: tracking.RunContext | None = None) -> EvalOutcome:
    """Evaluate, gate (absolute and vs the champion) and, when passing, register a version."""
    import mlflow

    split = data.load_split(text)
    with tracking.variant_run(lm.name, variant.name, "evaluate", ctx) as run:
        tracking.log_params(variant.params() | _model_params(lm) | {"data_sha256": split.sha256})
        result = evaluate.evaluate(lm, variant, split, plan=plan, settings=settings)
        datasets.log_text("evaluation", split.evaluation, split.source, result["eval_tokens"])
        metrics = tracking.numeric_metrics(result)
        mlflow.log_metrics(metrics)
        decision = (gates or default_gates()).evaluate(result, registry.champion_metrics(lm.name))
        mlflow.set_tag("turbo.gate", "passed" if decision.passed else "failed")
        mlflow.set_tag("turbo.gate_reasons", "; ".join(decision.reasons)[:4000] or "none")
        tracking.log_json_artifact(decision.to_dict(), "gate_report.json")
        mlflow.log_text(decision.markdown(variant.name, result), "gate_report.md")
        tracking.log_json_artifact(result, "evaluation.json")
        row = result | {"gate_passed": decision.passed}
        tracking.log_png(plots.accuracy_vs_bytes, [row], name="accuracy_vs_kv_bytes.png")
        tracking.log_png(plots.latency, [row], name="latency.png")
        tracking.log_png(plots.speed_vs_bytes, [row], name="speed_vs_kv_bytes.png")
        version = None
        with tempfile.TemporaryDirectory() as tmp:
            plan_path = Path(tmp) / "plan.json"
            (plan or calib.uniform_plan(lm, variant)).save(plan_path)
            mlflow.log_artifact(str(plan_path))
            if decision.passed and register:
                version = registry.register(
                    model_name=lm.name, base_model=base_model, weights_sha256=lm.weights_sha256,
                    variant_params=variant.params(), plan_path=plan_path, metrics=metrics)
                mlflow.set_tag("turbo.model_version", version)
        return EvalOutcome(run_id=run.info.run_id, result=result, decision=decision,
                           version=version)


def log_peer(lm: models.LoadedModel, result: dict, *, gates: GateSet | None = None,
             ctx: tracking.RunContext | None = None) -> str:
    """A peer's evaluation (transformers' quantized cache) as its own ``evaluate`` run, gated
    like a variant but never registered: ``turbo compare`` lists it beside ours."""
    import mlflow

    with tracking.variant_run(lm.name, result["variant"], "evaluate", ctx) as run:
        tracking.log_params(_model_params(lm) | {"peer": True, "data_sha256": result["data_sha256"]})
        mlflow.log_metrics(tracking.numeric_metrics(result))
        decision = (gates or default_gates()).evaluate(result)
        mlflow.set_tag("turbo.gate", "passed" if decision.passed else "failed")
        mlflow.set_tag("turbo.gate_reasons", "; ".join(decision.reasons)[:4000] or "none")
        tracking.log_json_artifact(result, "evaluation.json")
        return run.info.run_id
