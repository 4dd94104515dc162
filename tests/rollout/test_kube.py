"""`turbo rollout --target kubernetes` against the kmock API emulator (no real API server can
run here, docs/design.md §4) with a test-side controller (tests/kube_emulator.py) driving Deployment
status; images live in a real local registry, so tags resolve to real digests.

Scenarios: a good rollout, re-running it (no change), a stuck rollout (timeout → rollback), a
crash-looping one (→ rollback), one that becomes available but serves the wrong model (verify
fails → rollback), a failed first rollout (created objects removed); and bad input."""

import pytest
from kube_emulator import RunningCluster
from oci import push_manifest

from turbo_core.rollout import RolloutError, run
from turbo_core.rollout.kube import HASH_KEY, REVISION_KEY, KubeOptions

MODEL, VARIANT = "SmolLM2-135M-Instruct", "turbo-int4"
SERVED = f"{MODEL}:{VARIANT}"


@pytest.fixture
def cluster():
    with RunningCluster() as c:
        c.cluster.namespaces.add("serving")
        yield c


@pytest.fixture(scope="module")
def images(local_registry):
    """tag → pinned reference, one real manifest per behaviour."""
    out = {}
    for tag in ("good-v1", "good-v2", "stuck", "crash", "wrong-model"):
        digest = push_manifest(local_registry, "turbo/server", tag, tag)
        out[tag] = f"{local_registry}/turbo/server@{digest}"
    return out


def _deploy(cluster, kubeconfig, image_ref, tag, **kw):
    opts = KubeOptions(namespace="serving", kubeconfig=str(kubeconfig), poll_s=0.05,
                       timeout_s=kw.pop("timeout_s", 5.0))
    return run.run("kubernetes", image_ref.split("@")[0].rsplit("/", 2)[0] + f"/turbo/server:{tag}",
                   overlay="cpu-dev", model=MODEL, variant=VARIANT, mlflow_version=kw.pop("v", "1"),
                   kube=opts, **kw)


def _setup(cluster, images, tmp_path):
    c = cluster.cluster
    for tag, ref in images.items():
        c.behaviour[ref] = "good" if tag.startswith("good") else tag
        c.models[ref] = "someone-else:fp16" if tag == "wrong-model" else SERVED
    return cluster.kubeconfig(tmp_path / "kubeconfig")


def test_good_rollout_then_rerun_changes_nothing_then_upgrade(cluster, images, tmp_path):
    kc = _setup(cluster, images, tmp_path)
    first = _deploy(cluster, kc, images["good-v1"], "good-v1")
    assert first.status == "deployed" and first.changed and not first.rolled_back, first.reason
    assert first.previous_revision is None and first.new_revision == "1"
    assert first.image == images["good-v1"] and first.image_digest == images["good-v1"].split("@")[1]
    assert first.verify["ok"] and first.verify["served_models"] == [SERVED]
    dep = cluster.deployment("serving")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == images["good-v1"]
    assert dep["metadata"]["annotations"]["turbo-attention.dev/mlflow-version"] == "1"
    assert dep["spec"]["template"]["metadata"]["labels"]["turbo-attention.dev/variant"] == VARIANT
    applied = cluster.patches()
    assert applied == ["/api/v1/namespaces/serving/services/turbo-attention",
                       "/apis/policy/v1/namespaces/serving/poddisruptionbudgets/turbo-attention",
                       "/apis/apps/v1/namespaces/serving/deployments/turbo-attention"]

    again = _deploy(cluster, kc, images["good-v1"], "good-v1")
    assert again.status == "unchanged" and not again.changed and again.verify["ok"]
    assert cluster.patches() == applied  # not one write
    assert cluster.deployment("serving")["metadata"]["generation"] == dep["metadata"]["generation"]

    up = _deploy(cluster, kc, images["good-v2"], "good-v2", v="2")
    assert up.status == "deployed" and up.previous_revision == "1" and up.new_revision == "2"
    assert up.details["previous_image"] == images["good-v1"]
    dep2 = cluster.deployment("serving")
    assert dep2["spec"]["template"]["spec"]["containers"][0]["image"] == images["good-v2"]
    assert dep2["metadata"]["generation"] == dep["metadata"]["generation"] + 1


def test_verify_reaches_a_server_that_requires_an_api_key(cluster, images, tmp_path,
                                                          monkeypatch):
    """With the API-key Secret set, the server refuses /v1 without the key. The Service proxy
    keeps ``Authorization`` for the API server, so the key must reach the pod another way."""
    kc = _setup(cluster, images, tmp_path)
    cluster.cluster.api_keys[images["good-v1"]] = "s3cret"
    monkeypatch.delenv("TURBO_API_KEY", raising=False)
    keyless = _deploy(cluster, kc, images["good-v1"], "good-v1")
    assert keyless.status == "rolled_back" and "/v1/models answered 401" in keyless.reason
    monkeypatch.setenv("TURBO_API_KEY", "s3cret")
    keyed = _deploy(cluster, kc, images["good-v1"], "good-v1")
    assert keyed.verify["ok"] and keyed.verify["served_models"] == [SERVED], keyed.verify
    assert keyed.status == "deployed", keyed.reason


@pytest.mark.parametrize("bad, reason", [("stuck", "rollout not complete after"),
                                         ("crash", "CrashLoopBackOff"),
                                         ("wrong-model", "verification failed: models")])
def test_failed_rollout_rolls_back_to_the_recorded_revision(cluster, images, tmp_path, bad, reason):
    kc = _setup(cluster, images, tmp_path)
    assert _deploy(cluster, kc, images["good-v1"], "good-v1").status == "deployed"
    before = cluster.deployment("serving")

    res = _deploy(cluster, kc, images[bad], bad, v="2", timeout_s=2.0)
    assert res.status == "rolled_back" and res.rolled_back and res.changed
    assert reason in res.reason
    assert res.previous_revision == "1"
    assert res.rollback_revision == "3"  # as `kubectl rollout undo`: the old template, a new number
    assert res.rollback_verify["ok"] and res.rollback_verify["served_models"] == [SERVED]
    after = cluster.deployment("serving")
    assert after["spec"]["template"] == before["spec"]["template"]  # the recorded template
    assert after["metadata"]["annotations"][HASH_KEY] == before["metadata"]["annotations"][HASH_KEY]
    assert after["metadata"]["annotations"]["turbo-attention.dev/mlflow-version"] == "1"
    assert after["metadata"]["annotations"][REVISION_KEY] == "3"
    # a re-run of the good release afterwards is a no-op again
    assert _deploy(cluster, kc, images["good-v1"], "good-v1").status == "unchanged"


def test_failed_first_rollout_removes_what_it_created(cluster, images, tmp_path):
    kc = _setup(cluster, images, tmp_path)
    res = _deploy(cluster, kc, images["crash"], "crash", timeout_s=2.0)
    assert res.status == "rolled_back" and res.previous_revision is None
    assert "CrashLoopBackOff" in res.reason
    assert cluster.deployment("serving") is None
    deletes = [p for m, p in cluster.cluster.calls if m == "DELETE"]
    assert deletes == ["/apis/apps/v1/namespaces/serving/deployments/turbo-attention",
                       "/apis/policy/v1/namespaces/serving/poddisruptionbudgets/turbo-attention",
                       "/api/v1/namespaces/serving/services/turbo-attention"]


def test_bad_input_changes_nothing(cluster, images, tmp_path, local_registry):
    kc = _setup(cluster, images, tmp_path)
    with pytest.raises(RolloutError, match=r"no kubeconfig at .*missing"):
        _deploy(cluster, tmp_path / "missing", images["good-v1"], "good-v1")
    opts = KubeOptions(namespace="nowhere", kubeconfig=str(kc))
    with pytest.raises(RolloutError, match="namespace 'nowhere' does not exist"):
        run.run("kubernetes", images["good-v1"], overlay="cpu-dev", kube=opts)
    with pytest.raises(RolloutError, match="turbo/server:absent does not exist"):
        _deploy(cluster, kc, images["good-v1"], "absent")
    with pytest.raises(RolloutError, match="has no digest"):
        run.run("kubernetes", f"{local_registry}/turbo/server:good-v1", check_image=False,
                kube=KubeOptions(namespace="serving", kubeconfig=str(kc)))
    with pytest.raises(RolloutError, match="unknown target"):
        run.run("nomad", images["good-v1"])
    assert cluster.patches() == []


def test_cli_kubernetes_target_exit_status_and_json(cluster, images, tmp_path, local_registry):
    import json

    from turbo_core import cli

    kc = _setup(cluster, images, tmp_path)
    args = ["rollout", "--target", "kubernetes", "--overlay", "cpu-dev", "--namespace", "serving",
            "--kubeconfig", str(kc), "--model", MODEL, "--variant", VARIANT, "--timeout", "2"]
    assert cli.main([*args, "--image", f"{local_registry}/turbo/server:good-v1",
                     "--json", str(tmp_path / "ok.json")]) == 0
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["status"] == "deployed" and ok["image"] == images["good-v1"] and ok["ok"]
    assert cli.main([*args, "--image", f"{local_registry}/turbo/server:stuck",
                     "--json", str(tmp_path / "bad.json")]) == 1
    bad = json.loads((tmp_path / "bad.json").read_text())
    assert bad["status"] == "rolled_back" and bad["previous_revision"] == "1" and not bad["ok"]
