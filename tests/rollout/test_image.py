"""The serving image for real: debootstrap base, wheelhouse, docker build, run, /ready, a
completion, push to the local registry. Needs a Docker engine (scripts/test.sh installs and
the `docker_services` fixture starts dockerd and the registry when it can); skipped otherwise."""

import json
import urllib.request
from pathlib import Path

import pytest

from turbo_core.http import wait_ok
from turbo_core.rollout import image

ROOT = Path(__file__).resolve().parents[2]


def test_image_tag_and_bad_input(tmp_path):
    tag = image.image_tag("127.0.0.1:5000/turbo", "SmolLM2-135M-Instruct", "turbo-int4", "abc123")
    assert tag == "127.0.0.1:5000/turbo:smollm2-135m-instruct-turbo-int4-abc123"
    with pytest.raises(ValueError, match="without a tag"):
        image.image_tag("repo:latest", "m", "v")
    with pytest.raises(ValueError, match=r"no config\.json"):
        image.build(model_dir=tmp_path, plan_path=tmp_path / "p.json", model_name="m",
                    variant="v", repository="r", wheelhouse=tmp_path)


def test_project_wheel_is_reproducible(tmp_path):
    """The same source gives the same wheel bytes, so the image's build stage (the virtual
    environment) is cached across the images of one source tree instead of stored per image."""
    import hashlib
    import time

    first = image.project_wheel(tmp_path / "a")
    time.sleep(1.1)  # a wheel dated "now" would differ by now
    second = image.project_wheel(tmp_path / "b")
    assert first.name == second.name
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()


def test_dockerfile_is_hadolint_clean():
    import subprocess
    import sys

    hadolint = Path(sys.executable).parent / "hadolint"
    res = subprocess.run([str(hadolint), str(ROOT / "docker" / "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_a_rebuild_of_the_same_release_reuses_every_layer(serving_image):
    """Same model, plan, variant and code, another MLflow run: the labels differ, the layers
    (the virtual environment, the model, the compiled seed) are Docker's cached ones."""
    client = serving_image.client
    first = client.images.get(serving_image.image_id)
    again = client.images.get(image.build(**serving_image.build_args,
                                          mlflow_run_id="another-run").image_id)
    assert again.attrs["RootFS"]["Layers"] == first.attrs["RootFS"]["Layers"]
    assert again.labels["ai.turbo.mlflow_run_id"] == "another-run"
    assert first.labels["ai.turbo.mlflow_run_id"] == "none"


@pytest.mark.slow
def test_build_run_and_push_the_real_image(serving_image):
    client, registry = serving_image.client, serving_image.registry
    labels = client.images.get(serving_image.tag).labels
    assert labels["ai.turbo.variant"] == "turbo-int4" and labels["ai.turbo.model"] == serving_image.model
    container = client.containers.run(serving_image.tag, detach=True,
                                      ports={"8000/tcp": ("127.0.0.1", None)})
    try:
        container.reload()
        port = container.ports["8000/tcp"][0]["HostPort"]
        url = f"http://127.0.0.1:{port}"

        def alive():
            container.reload()
            if container.status != "running":
                return f"container {container.status}: {container.logs().decode()[-2000:]}"
            return None

        wait_ok(f"{url}/ready", 180, alive)
        req = urllib.request.Request(f"{url}/v1/completions", method="POST",
                                     data=json.dumps({"prompt": "The capital of France is",
                                                      "max_tokens": 6}).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        assert "Paris" in body["choices"][0]["text"], body
        assert container.attrs["Config"]["User"] == "10001"
        # the C++ CPU ops were built by the image's builder stage and load without compiling
        code, out = container.exec_run(["python3", "-c", "from turbo_kernels import cpu_ops; "
                                        "print(cpu_ops.stale()); assert cpu_ops.load()"])
        assert code == 0 and out.decode().strip() == "None", out.decode()[-2000:]
        # the build's warm-up compiled the decode step into the seed, and the server started
        # from a copy of it in its (writable) $TURBO_HOME
        code, out = container.exec_run(["sh", "-c", "ls /opt/turbo-seed/inductor; echo --; "
                                        "ls $TURBO_HOME/inductor"])
        seeded, _, running = out.decode().partition("--")
        assert code == 0 and seeded.split(), out.decode()
        assert set(seeded.split()) <= set(running.split()), out.decode()
    finally:
        container.remove(force=True)
    digest = serving_image.digest
    assert digest.startswith("sha256:") and len(digest) == 71
    client.images.remove(serving_image.tag, force=True)  # gone locally: the registry has it
    pulled = client.images.pull(f"{registry}/turbo-test@{digest}")
    assert pulled.labels["ai.turbo.variant"] == "turbo-int4"
