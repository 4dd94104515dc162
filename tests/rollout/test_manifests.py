"""k8s/ renders per overlay with kubectl kustomize and validates against real schemas; the
release layer adds the digest, namespace, labels and annotations; the registry check."""

from pathlib import Path

import pytest
from oci import push_manifest

from turbo_core.rollout import RolloutError, label_value, manifests, oci_registry, release_metadata

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("overlay", manifests.OVERLAYS)
def test_each_overlay_renders_and_validates(overlay):
    objs = manifests.render(overlay)
    assert [o["kind"] for o in objs] == ["Service", "PodDisruptionBudget", "Deployment"]
    assert manifests.validate(objs)[-1] == __import__("kubernetes_validate").latest_version()
    dep = manifests.deployment_of(objs)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 600  # room for model load
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}} in pod["volumes"]
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus == 1) if overlay == "gpu" else gpus is None
    assert dep["spec"]["replicas"] == (2 if overlay == "gpu" else 1)


def test_release_layer_sets_digest_namespace_labels_but_not_selectors():
    labels, annotations = release_metadata("HuggingFaceTB/SmolLM2-135M", "turbo-int4", "7", "r1")
    objs = manifests.render("cpu-dev", image=f"127.0.0.1:5000/turbo@{DIGEST}", namespace="serving",
                            labels=labels, annotations=annotations)
    manifests.validate(objs)
    dep = manifests.deployment_of(objs)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"127.0.0.1:5000/turbo@{DIGEST}"
    assert {o["metadata"]["namespace"] for o in objs} == {"serving"}
    tmpl = dep["spec"]["template"]["metadata"]
    assert tmpl["labels"]["turbo-attention.dev/model"] == "HuggingFaceTB-SmolLM2-135M"
    assert tmpl["labels"]["turbo-attention.dev/mlflow-version"] == "7"
    assert tmpl["annotations"]["turbo-attention.dev/model"] == "HuggingFaceTB/SmolLM2-135M"
    assert "turbo-attention.dev/model" not in dep["spec"]["selector"]["matchLabels"]
    svc = objs[0]
    assert "turbo-attention.dev/variant" not in svc["spec"]["selector"]


def test_label_values_and_bad_input():
    assert label_value("a/b c:" + "x" * 80).startswith("a-b-c-") and len(label_value("y" * 99)) == 63
    assert label_value("--x--") == "x"
    with pytest.raises(RolloutError, match="unknown overlay 'tpu'"):
        manifests.render("tpu")
    with pytest.raises(RolloutError, match="digest must be sha256"):
        manifests.split_image("repo@md5:abc")
    with pytest.raises(RolloutError, match="empty or has spaces"):
        manifests.split_image("repo name")
    broken = manifests.render("cpu-dev")
    broken[2]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(RolloutError, match=r"Deployment/turbo-attention .*containerPort"):
        manifests.validate(broken)


def test_registry_resolves_tags_to_digests_and_refuses_missing_images(local_registry):
    digest = push_manifest(local_registry, "turbo/server", "v1", "one")
    assert oci_registry.resolve_digest(f"{local_registry}/turbo/server:v1") == digest
    assert oci_registry.resolve_digest(f"{local_registry}/turbo/server@{digest}") == digest
    with pytest.raises(RolloutError, match=r"turbo/server:nope does not exist"):
        oci_registry.resolve_digest(f"{local_registry}/turbo/server:nope")
    with pytest.raises(RolloutError, match="cannot reach the registry"):
        oci_registry.resolve_digest("127.0.0.1:1/turbo:v1")
    assert oci_registry.pinned(f"{local_registry}/turbo/server:v1", digest) == \
        f"{local_registry}/turbo/server@{digest}"


def test_cli_target_none_renders_validates_and_reports(tmp_path, capsys):
    from turbo_core import cli

    ref = f"127.0.0.1:5000/turbo@{DIGEST}"
    rc = cli.main(["rollout", "--target", "none", "--image", ref, "--skip-image-check",
                   "--overlay", "gpu", "--model", "m", "--variant", "turbo-int4",
                   "--out", str(tmp_path / "out"), "--json", str(tmp_path / "r.json")])
    assert rc == 0
    doc = __import__("json").loads((tmp_path / "r.json").read_text())
    assert doc["status"] == "rendered" and doc["ok"] and doc["image_digest"] == DIGEST
    rendered = list(__import__("yaml").safe_load_all((tmp_path / "out" / "manifests.yaml").read_text()))
    assert manifests.deployment_of(rendered)["spec"]["template"]["spec"]["containers"][0]["image"] == ref
    assert (tmp_path / "out" / "rollout.json").is_file()
    with pytest.raises(SystemExit) as exc:
        cli.main(["rollout", "--target", "none", "--image", "bad image", "--json",
                  str(tmp_path / "bad.json")])
    assert exc.value.code == 2 and "empty or has spaces" in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()


def test_rollout_report_is_attached_to_an_mlflow_run():
    from mlflow.tracking import MlflowClient

    from turbo_core.rollout import RolloutResult
    from turbo_core.rollout.run import log_to_mlflow
    from turbo_core.tracking import runs as tracking

    with tracking.variant_run("tiny", "turbo-int4", "deploy") as mlrun:
        run_id = mlrun.info.run_id
    result = RolloutResult(target="kubernetes", image=f"r@{DIGEST}", image_digest=DIGEST,
                           status="rolled_back", rolled_back=True, reason="stuck",
                           verify={"ok": True, "latency_s": 0.25})
    log_to_mlflow(result, run_id)
    client = MlflowClient()
    got = client.get_run(run_id).data
    assert got.metrics == {"rollout_ok": 0.0, "rollout_rolled_back": 1.0,
                           "rollout_verify_latency_s": 0.25}
    assert got.tags["rollout.status"] == "rolled_back" and got.tags["rollout.image_digest"] == DIGEST
    local = client.download_artifacts(run_id, "rollout/rollout.json")
    assert __import__("json").loads(Path(local).read_text())["reason"] == "stuck"
