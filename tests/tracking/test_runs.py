"""MLflow tracking and registry against a real `mlflow server` process on 127.0.0.1."""

import hashlib
import json

import mlflow
import pytest
import small
from mlflow import MlflowClient

from turbo_core.attention.variants import get_variant
from turbo_core.hf import data, evaluate, models
from turbo_core.pipeline import stages
from turbo_core.tracking import model_registry as registry
from turbo_core.tracking import runs as tracking
from turbo_core.tracking.gates import Gate, GateSet

pytestmark = pytest.mark.slow  # an MLflow server and several evaluations

SMALL = small.EVAL


@pytest.fixture
def server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture(scope="module")
def lm(tiny_dir):
    return models.load(tiny_dir)


def test_calibrate_and_evaluate_runs_are_tracked(server, lm, tiny_dir, tmp_path):
    v = get_variant("turbo-mix")
    ctx = tracking.RunContext(trigger="manual", airflow_dag_id="turbo_nightly",
                              airflow_run_id="manual__1")
    plan, calib_run = stages.calibrate_variant(lm, v, tmp_path / "plan.json", max_tokens=256, ctx=ctx)
    out = stages.evaluate_variant(lm, v, plan=plan, base_model=str(tiny_dir), settings=SMALL, ctx=ctx)
    client = MlflowClient()
    run = client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "turbo-attention/tiny-llama"
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["variant"] == "turbo-mix" and p["int2_fraction"] == "0.55" and p["kv_bits"] == "4"
    assert (p["kv_rotate"], p["kv_sinks"], p["kv_int2_k_group"]) == ("True", "16", "32")
    assert p["weights_sha256"] == lm.weights_sha256 and len(p["data_sha256"]) == 64
    assert p["code_version"].startswith("0.1.0+")
    # what the store holds is what the evaluation measured (read back through the server)
    for key in ("ppl_baseline", "ppl_variant", "ppl_delta_pct", "top1_agreement",
                "kv_bytes_per_token", "kv_compression", "decode_tokens_per_s"):
        assert m[key] == pytest.approx(out.result[key], rel=1e-12), key
    assert t["turbo.trigger"] == "manual" and t["airflow.run_id"] == "manual__1"
    assert t["turbo.gate"] == ("passed" if out.decision.passed else "failed")
    files = {f.path for f in client.list_artifacts(out.run_id)}
    assert {"plan.json", "gate_report.json", "gate_report.md", "evaluation.json",
            "accuracy_vs_kv_bytes.png", "latency.png"} <= files
    # the text each run used, as MLflow datasets (the run's inputs, the UI's Datasets column)
    split = data.load_split()
    for run_id, context, part, tokens in (
            (calib_run, "calibration", split.calibration, plan.calibration["tokens"]),
            (out.run_id, "evaluation", split.evaluation, out.result["eval_tokens"])):
        (used,) = client.get_run(run_id).inputs.dataset_inputs
        tags = {t.key: t.value for t in used.tags}
        assert used.dataset.name == f"stdlib:pydoc_data.topics:{context}"
        assert used.dataset.digest == hashlib.sha256(part.encode()).hexdigest()[:16]
        assert used.dataset.source_type == "code" and "pydoc_data.topics" in used.dataset.source
        assert tags["mlflow.data.context"] == context and tags["tokens"] == str(tokens)
    calib_files = {f.path for f in client.list_artifacts(calib_run)}
    assert {"plan.json", "head_priority.png"} <= calib_files
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{out.run_id}/gate_report.json"))
    assert report["passed"] == out.decision.passed


def test_rerun_logs_a_new_run(server, lm, tiny_dir):
    v = get_variant("int8")
    a = stages.evaluate_variant(lm, v, plan=None, base_model=str(tiny_dir), settings=SMALL,
                                register=False)
    b = stages.evaluate_variant(lm, v, plan=None, base_model=str(tiny_dir), settings=SMALL,
                                register=False)
    assert a.run_id != b.run_id
    assert MlflowClient().get_run(a.run_id).info.status == "FINISHED"


def test_failed_evaluation_is_a_failed_run_without_version(server, lm, tiny_dir):
    too_long = evaluate.EvalSettings(max_tokens=10_000_000, window=128)
    client = MlflowClient()
    name = registry.registered_name(lm.name)
    before = len(client.search_model_versions(f"name='{name}'"))
    with pytest.raises(ValueError, match="held-out text has"):
        stages.evaluate_variant(lm, get_variant("turbo-int4"), plan=None, base_model=str(tiny_dir),
                                settings=too_long)
    runs = mlflow.search_runs(experiment_names=["turbo-attention/tiny-llama"],
                              filter_string="attributes.status = 'FAILED'", output_format="list")
    assert runs and "held-out text has" in runs[0].data.tags["turbo.error"]
    assert len(client.search_model_versions(f"name='{name}'")) == before


def test_passing_variant_is_registered_promoted_and_loadable(server, lm, tiny_dir, monkeypatch):
    lenient = GateSet((Gate("kv_compression", threshold=1.0),))
    out = stages.evaluate_variant(lm, get_variant("turbo-int4"), plan=None,
                                  base_model=str(tiny_dir), settings=SMALL, gates=lenient)
    assert out.decision.passed and out.version is not None
    name = registry.registered_name(lm.name)
    client = MlflowClient()
    mv = client.get_model_version(name, out.version)
    assert mv.tags["validation_status"] == "passed_gates" and mv.tags["variant"] == "turbo-int4"
    assert client.get_model_version_by_alias(name, "challenger").version == out.version
    # the version holds plan + variant, not the base weights
    model_files = {f.path for f in client.list_artifacts(out.run_id)}
    assert not any(p.endswith(".safetensors") for p in model_files)
    registry.promote(lm.name, out.version)
    champion = registry.champion_metrics(lm.name)
    assert champion["kv_compression"] == pytest.approx(out.result["kv_compression"])
    # the version loads as registered, even after the registry's turbo-int4 changed
    from turbo_core.attention import variants

    registered = get_variant("turbo-int4")
    monkeypatch.setitem(variants.VARIANTS, "turbo-int4", registered.with_overrides(kv_bits=2))
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert model.unwrap_python_model().variant == registered
    completion = model.predict(["The attention"], params={"max_new_tokens": 3})
    assert isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], str)
    # champion-relative gate: a variant must not lose more than 10 % KV compression
    relative = GateSet((Gate("kv_compression", min_relative_change=-0.1),))
    worse = stages.evaluate_variant(lm, get_variant("int8"), plan=None, base_model=str(tiny_dir),
                                    settings=SMALL, gates=relative, register=False)
    assert not worse.decision.passed and "vs champion" in worse.decision.reasons[0]


def test_compare_three_variants(server, lm, tiny_dir, tmp_path, capsys):
    from turbo_core.cli import main

    for name in ("int8", "turbo-int4", "turbo-int2"):
        stages.evaluate_variant(lm, get_variant(name), plan=None, base_model=str(tiny_dir),
                                settings=SMALL, register=False)
    peer = evaluate.evaluate_peer(lm, "quanto", 4, data.load_split(), settings=SMALL, progress=False)
    stages.log_peer(lm, peer)
    out, png, speed = tmp_path / "cmp.json", tmp_path / "cmp.png", tmp_path / "speed.png"
    assert main(["compare", "--experiment", "turbo-attention/tiny-llama", "--json", str(out),
                 "--png", str(png), "--speed-png", str(speed)]) == 0
    doc = json.loads(out.read_text())
    variants = [r["variant"] for r in doc["rows"]]
    assert {"int8", "turbo-int4", "turbo-int2", "hf-quanto-int4"} <= set(variants)
    assert len(variants) == len(set(variants))  # newest run per variant
    assert "kv_bits" in doc["differing_params"] and "model" not in doc["differing_params"]
    rows = {r["variant"]: r for r in doc["rows"]}
    assert rows["hf-quanto-int4"]["kl_mean"] == pytest.approx(peer["kl_mean"])
    for r in rows.values():  # the gates' metrics for every contender, ours and the peer
        assert all(r[k] is not None for k in ("kl_mean", "decode_speedup", "retrieval_kept")), r
    assert png.read_bytes()[:8] == speed.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "turbo-int2" in printed and "kv_compression" in printed and "decode_speedup" in printed
    with pytest.raises(SystemExit):
        main(["compare", "--experiment", "turbo-attention/nope"])
    assert "no MLflow experiment named" in capsys.readouterr().err


def test_local_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch, lm, tiny_dir):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "store").mkdir()
    out = stages.evaluate_variant(lm, get_variant("int8"), plan=None, base_model=str(tiny_dir),
                                  settings=SMALL, register=False)
    uri = MlflowClient().get_run(out.run_id).info.artifact_uri
    assert uri.startswith((tmp_path / "store" / "artifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_a_retry_cleans_up_what_a_lost_server_left(server, lm, tiny_dir):
    """An earlier try of this Airflow task lost its tracking server mid-run: its run stayed
    RUNNING and its model version was created without tags or alias. The retry ends that run
    FAILED and deletes that version; another variant's version of the same run stays."""
    uri = tracking.configure()  # the server, for the registry too (another test set its own)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = registry.registered_name(lm.name)
    ctx = tracking.RunContext(trigger="manual", airflow_dag_id="turbo_nightly",
                              airflow_run_id="manual__lost-server")
    exp = tracking.experiment_id(lm.name)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)

    def earlier_try(variant: str) -> tuple[str, str]:
        run = client.create_run(exp, tags=ctx.tags() | {"turbo.variant": variant,
                                                        "turbo.stage": "evaluate"})
        version = client.create_model_version(name, f"runs:/{run.info.run_id}/turbo_model",
                                              run_id=run.info.run_id)
        return run.info.run_id, str(version.version)

    lost_run, half = earlier_try("turbo-int4")
    other_run, other = earlier_try("int8")
    lenient = GateSet((Gate("kv_compression", threshold=1.0),))
    out = stages.evaluate_variant(lm, get_variant("turbo-int4"), plan=None,
                                  base_model=str(tiny_dir), settings=SMALL, gates=lenient, ctx=ctx)
    versions = {str(v.version) for v in client.search_model_versions(f"name='{name}'")}
    assert out.version in versions and half not in versions and other in versions
    assert client.get_model_version(name, out.version).tags["validation_status"] == "passed_gates"
    lost = client.get_run(lost_run)
    assert lost.info.status == "FAILED" and "superseded by its retry" in lost.data.tags["turbo.error"]
    assert client.get_run(other_run).info.status == "RUNNING"  # another variant's: not ours
