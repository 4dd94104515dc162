"""What each task of the nightly DAG does. Inputs and outputs are JSON-able dicts (XComs).

A task that has nothing to do returns ``Skip(reason)``; the DAG turns it into a skipped task
instance whose log says why. Heavy imports (torch, transformers, docker) happen inside.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from turbo_core.fileio import data_dir
from turbo_core.pipeline.params import gates, validate

log = logging.getLogger("turbo.pipeline")

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Skip:
    reason: str


def _ctx(prep: dict):
    from turbo_core.tracking.runs import RunContext

    return RunContext(trigger=prep["trigger"], airflow_dag_id=prep.get("dag_id"),
                      airflow_run_id=prep.get("run_id"))


def _workdir(prep: dict) -> Path:
    path = Path(prep["work_dir"])
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(conf: dict | None, *, trigger: str, dag_id: str | None = None,
            run_id: str | None = None) -> dict:
    """Validate the parameters and resolve the model before any heavy work."""
    from turbo_core.hf import models
    from turbo_core.tracking import model_registry as registry
    from turbo_core.tracking import runs as tracking

    params = validate(conf)
    name, path = models.resolve(params["model"])
    tracking.configure()
    champion = registry.alias_version(name, registry.CHAMPION)
    prep = params | {"model_name": name, "model_dir": str(path), "trigger": trigger,
                     "dag_id": dag_id, "run_id": run_id,
                     "champion_version": champion.version if champion else None,
                     "work_dir": str(work_dir_for(run_id))}
    _workdir(prep)
    log.info("model %s at %s; variants %s; champion %s; deploy target %s", name, path,
             params["variants"], prep["champion_version"], params["deploy_target"])
    return prep


def calibrate(prep: dict, variant: str) -> dict:
    from turbo_core.attention.variants import get_variant
    from turbo_core.hf import models
    from turbo_core.pipeline import stages

    lm = models.load(prep["model_dir"])
    out = _workdir(prep) / f"{variant}.plan.json"
    _, run_id = stages.calibrate_variant(lm, get_variant(variant), out,
                                         max_tokens=prep["calib_tokens"], ctx=_ctx(prep))
    return {"variant": variant, "plan": str(out), "run_id": run_id}


def fetch_plan(calibrated: dict, dest: str | Path) -> str:
    """The calibrate run's plan from MLflow (for a step running where the file is not)."""
    import mlflow

    from turbo_core.tracking import runs as tracking

    tracking.configure()
    return mlflow.artifacts.download_artifacts(run_id=calibrated["run_id"],
                                               artifact_path=Path(calibrated["plan"]).name,
                                               dst_path=str(dest))


KEY_METRICS = ("ppl_delta_pct", "top1_agreement", "kl_mean", "kl_p99", "kv_compression",
               "kv_bytes_per_token", "decode_speedup", "prefill_speedup", "decode_tokens_per_s",
               "decode_tokens_per_s_baseline", "prefill_tokens_per_s", "retrieval_accuracy",
               "retrieval_accuracy_baseline", "retrieval_kept", "retrieval_kept_upper",
               "retrieval_known")


def eval_settings(prep: dict):
    """The evaluation's sizes from the run's parameters."""
    from turbo_core.hf import evaluate as ev
    from turbo_core.hf.retrieval import RetrievalSettings
    from turbo_core.hf.speed import SpeedSettings

    return ev.EvalSettings(
        max_tokens=prep["eval_tokens"], window=min(prep["eval_window"], prep["eval_tokens"]),
        speed=SpeedSettings(context=prep["speed_context"], batch=prep["speed_batch"],
                            repeats=prep["speed_repeats"]),
        retrieval=RetrievalSettings(lengths=tuple(prep["retrieval_lengths"]),
                                    samples=prep["retrieval_samples"]))


def evaluate(prep: dict, calibrated: dict) -> dict:
    from turbo_core.attention.plan import BitPlan
    from turbo_core.attention.variants import get_variant
    from turbo_core.hf import models
    from turbo_core.pipeline import stages

    lm = models.load(prep["model_dir"])
    variant = get_variant(calibrated["variant"])
    outcome = stages.evaluate_variant(lm, variant, plan=BitPlan.load(calibrated["plan"]),
                                      base_model=prep["model"], settings=eval_settings(prep),
                                      gates=gates(prep), ctx=_ctx(prep))
    metrics = {k: outcome.result[k] for k in KEY_METRICS if k in outcome.result}
    log.info("%s: gates %s %s", variant.name, "PASSED" if outcome.decision.passed else "FAILED",
             "; ".join(outcome.decision.reasons))
    return {"variant": variant.name, "plan": calibrated["plan"], "run_id": outcome.run_id,
            "passed": outcome.decision.passed, "reasons": list(outcome.decision.reasons),
            "version": outcome.version, "metrics": metrics}


def choose(prep: dict, results: list[dict]) -> dict | Skip:
    """The passing variant with the smallest KV cache (ties: lower perplexity cost); skipped
    when none passes or the champion is already at least as good."""
    from turbo_core.tracking import model_registry as registry

    passing = [r for r in results if r["passed"]]
    if not passing:
        why = "; ".join(f"{r['variant']}: {', '.join(r['reasons'])}" for r in results)
        return Skip(f"no variant passed its gates ({why})")
    best = max(passing, key=lambda r: (r["metrics"]["kv_compression"], -r["metrics"]["ppl_delta_pct"]))
    champ = registry.champion_metrics(prep["model_name"])
    if champ is not None and champ.get("kv_compression", 0) >= best["metrics"]["kv_compression"] \
            and champ.get("ppl_delta_pct", float("inf")) <= best["metrics"]["ppl_delta_pct"]:
        return Skip(f"champion v{prep['champion_version']} is at least as good as "
                    f"{best['variant']} (KV {champ['kv_compression']:.2f}x, "
                    f"Δppl {champ['ppl_delta_pct']:+.2f} %)")
    log.info("chosen: %s (version %s)", best["variant"], best["version"])
    return best


def engine_reachable() -> bool:
    """Does a Docker engine answer (``DOCKER_HOST`` or the default socket)?"""
    import docker

    try:
        docker.from_env().ping()
        return True
    except docker.errors.DockerException:
        return False


def build_image(prep: dict, chosen: dict) -> dict | Skip:
    from turbo_core.rollout import image

    if prep["deploy_target"] == "none":
        return Skip("deploy target is 'none': no image is built")
    if not engine_reachable():
        raise RuntimeError("no Docker engine reachable to build the serving image "
                           "(start dockerd or choose deploy_target 'none')")
    if prep["base_image"] == image.LOCAL_BASE:  # made here when missing (no registry to pull)
        import subprocess

        subprocess.run([str(image.ROOT / "docker" / "base" / "make_base.sh"), image.LOCAL_BASE],
                       check=True)
    # the local base gets the lock's CPU torch wheel; a CUDA PyTorch base brings its own torch
    with_torch = prep["base_image"] == image.LOCAL_BASE
    lock = (Path(image.ROOT) / "requirements.lock").read_bytes()
    key = hashlib.sha256(lock).hexdigest()[:12] + ("" if with_torch else "-no-torch")
    wheels = data_dir() / "wheelhouse" / key
    if not (wheels / "requirements.txt").is_file():
        image.build_wheelhouse(wheels, include_torch=with_torch)
    built = image.build(model_dir=Path(prep["model_dir"]), plan_path=Path(chosen["plan"]),
                        model_name=prep["model_name"], variant=chosen["variant"],
                        repository=prep["image_repository"], wheelhouse=wheels,
                        base_image=prep["base_image"],
                        mlflow_run_id=chosen["run_id"])
    return {"tag": built.tag, "image_id": built.image_id}


def push_image(prep: dict, built: dict) -> dict | Skip:
    from turbo_core.rollout import image

    if prep["deploy_target"] != "kubernetes":
        return Skip(f"deploy target {prep['deploy_target']!r} runs the local image: no push")
    digest = image.push(built["tag"])
    return built | {"digest": digest, "ref": f"{built['tag'].rsplit(':', 1)[0]}@{digest}"}


def docker_options(prep: dict):
    """The docker target's container: ``turbo-attention`` on port 8000, else named by port
    (one deployment per host port)."""
    from turbo_core.rollout.dockerhost import DockerOptions

    port = prep["serve_port"]
    return DockerOptions(name="turbo-attention" if port == 8000 else f"turbo-attention-{port}",
                         port=port)


def roll_out(prep: dict, chosen: dict, built: dict | None, pushed: dict | None) -> dict:
    """Deploy; the rollout verifies and rolls back by itself. Raises when it did not deploy,
    so the DAG's rollback task runs."""
    from turbo_core.rollout import run

    target = prep["deploy_target"]
    ref = (pushed or {}).get("ref") or (built or {}).get("tag") \
        or f"{prep['image_repository']}:{chosen['variant']}"
    out = _workdir(prep) / "rollout"
    result = run.run(target, ref, overlay=prep["overlay"], model=prep["model_name"],
                     variant=chosen["variant"], mlflow_version=chosen["version"],
                     mlflow_run_id=chosen["run_id"],
                     kube=run.KubeOptions(namespace=prep["namespace"]),
                     docker=docker_options(prep),
                     check_image=target == "kubernetes", out_dir=out)
    run.log_to_mlflow(result, chosen["run_id"])
    doc = result.to_dict()
    if not result.ok:
        raise RuntimeError(f"rollout {result.status}: {result.reason} (report: {out}/rollout.json)")
    return doc


def verify(prep: dict, chosen: dict, rolled: dict) -> dict | Skip:
    """Verify again, independently of the rollout, the way a client sees the service."""
    from turbo_core.rollout import kube
    from turbo_core.rollout import verify as vf

    target = prep["deploy_target"]
    if target == "none":
        return Skip("deploy target is 'none': nothing runs to verify")
    cfg = vf.VerifyConfig(expected_model=vf.served_model_id(prep["model_name"], chosen["variant"]),
                          max_p95_latency_s=prep["max_p95_latency_s"])
    if target == "docker":
        report = vf.verify(vf.http_request(f"http://127.0.0.1:{prep['serve_port']}"), cfg)
    else:
        client = kube.Kube()
        report = vf.verify(kube.service_request(client, prep["namespace"], "turbo-attention"), cfg)
    if not report["ok"]:
        raise RuntimeError("verification failed: " + "; ".join(report["failed"]))
    return report


def rollback(prep: dict, rolled: dict | None) -> dict:
    """After a failed deploy step: put the previous release back (if the rollout did not
    already) and report what serves now."""
    from turbo_core.rollout import run

    report = _workdir(prep) / "rollout" / "rollout.json"
    if rolled is None and report.is_file():  # roll_out failed after writing its report
        rolled = json.loads(report.read_text())
    if rolled and rolled.get("rolled_back"):
        return {"action": "none", "reason": "the rollout already rolled back", "rollout": rolled}
    if not rolled:
        return {"action": "none", "reason": "nothing was deployed by this run"}
    previous = rolled.get("details", {}).get("previous_image")
    if not previous:
        return {"action": "none", "reason": "no earlier release to go back to: the new "
                                            f"deployment ({rolled.get('image')}) stays up"}
    result = run.run(prep["deploy_target"], previous, overlay=prep["overlay"],
                     kube=run.KubeOptions(namespace=prep["namespace"]),
                     docker=docker_options(prep), check_image=False)
    return {"action": "redeployed previous", "image": previous, "result": result.to_dict()}


def promote(prep: dict, chosen: dict, verified: dict | Skip | None) -> dict | Skip:
    from turbo_core.tracking import model_registry as registry

    if prep["deploy_target"] == "none":
        return Skip(f"deploy target 'none': {chosen['variant']} v{chosen['version']} stays "
                    "challenger (champion means deployed and verified)")
    registry.promote(prep["model_name"], chosen["version"])
    return {"champion": chosen["version"], "variant": chosen["variant"]}


def work_dir_for(run_id: str | None) -> Path:
    return data_dir() / "pipeline" / hashlib.sha256((run_id or "adhoc").encode()).hexdigest()[:12]


def finish(prep: dict, results: list[dict] | None, pulled: dict) -> dict:
    """Write the run's story (``summary.json`` in the work dir), print it, and fail the task
    when something went wrong (so the DAG run is marked failed after a rollback)."""
    results = [r for r in (results or []) if r]
    chosen = pulled.get("choose") or None
    doc = {"model": prep["model_name"], "deploy_target": prep["deploy_target"],
           "variants": results, "chosen": chosen and chosen["variant"],
           "chosen_version": chosen and chosen["version"],
           "image": (pulled.get("push_image") or pulled.get("build_image") or {}),
           "rollout": pulled.get("roll_out"), "verify_ok": (pulled.get("verify") or {}).get("ok"),
           "promoted": pulled.get("promote"), "rollback": pulled.get("rollback")}
    problems = []
    missing = sorted(set(prep["variants"]) - {r["variant"] for r in results})
    if missing:
        problems.append(f"evaluation did not finish for {', '.join(missing)}")
    if doc["rollback"] is not None:
        rb = doc["rollback"]
        problems.append(f"a deploy step failed; rollback: {rb.get('reason') or rb.get('action')}")
    if chosen and prep["deploy_target"] != "none" and not doc["promoted"] and not problems:
        problems.append("the chosen variant was not promoted")
    doc["problems"] = problems
    path = _workdir(prep) / SUMMARY_FILE
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(render(doc))
    if problems:
        raise RuntimeError("; ".join(problems) + f" (summary: {path})")
    return doc


def render(doc: dict) -> str:
    """The summary as text: a table of variants, the decision, the deployment."""
    nan = float("nan")
    lines = [f"turbo_nightly on {doc['model']} (deploy target {doc['deploy_target']})", "",
             f"{'variant':<12} {'gate':<6} {'Δppl %':>8} {'top-1':>6} {'KL':>7} {'KV x':>6} "
             f"{'decode x':>8} {'recall':>6} {'kept':>5} {'≤95%':>5}"]
    for r in doc["variants"]:
        m = r["metrics"]
        lines.append(f"{r['variant']:<12} {'PASS' if r['passed'] else 'FAIL':<6} "
                     f"{m.get('ppl_delta_pct', nan):>+8.2f} {m.get('top1_agreement', nan):>6.3f} "
                     f"{m.get('kl_mean', nan):>7.4f} {m.get('kv_compression', nan):>6.2f} "
                     f"{m.get('decode_speedup', nan):>8.2f} {m.get('retrieval_accuracy', nan):>6.2f} "
                     f"{m.get('retrieval_kept', nan):>5.2f} "
                     f"{m.get('retrieval_kept_upper', nan):>5.2f}")
        lines += [f"    gate failed: {reason}" for reason in r["reasons"]]
    lines.append("")
    if doc["chosen"]:
        lines.append(f"chosen: {doc['chosen']} (MLflow version {doc['chosen_version']})")
    else:
        lines.append("chosen: none (no variant passed, or the champion is at least as good)")
    ro = doc.get("rollout") or {}
    if ro:
        lines.append(f"rollout: {ro.get('target')} {ro.get('status')} image {ro.get('image')}")
    if doc.get("promoted"):
        lines.append(f"champion: version {doc['promoted'].get('champion')}")
    for p in doc.get("problems", []):
        lines.append(f"PROBLEM: {p}")
    return "\n".join(lines)
