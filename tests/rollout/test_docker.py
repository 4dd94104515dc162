"""`turbo rollout --target docker` for real: dockerd, the real serving image from the local
registry, a good rollout, a no-op re-run, an image whose /ready never passes rolled back
while the old container keeps serving, a candidate killed during its verification rolled back
the same way, and an upgrade that keeps the old container.
Skipped with the reason where no engine can run."""

import io
import json
import threading
import time
import urllib.request
from dataclasses import replace

import pytest

from turbo_core.http import free_port
from turbo_core.rollout import RolloutError, run
from turbo_core.rollout.dockerhost import DEPLOYMENT, DockerOptions
from turbo_core.rollout.verify import VerifyConfig


def _complete(port: int) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "The capital of France is",
                                                  "max_tokens": 6}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())["choices"][0]["text"]


def _kill_when_ready(client, name: str, timeout_s: float = 600) -> None:
    """Kill container ``name`` as soon as its server answers /ready (verification starts
    then): what a crash or an out-of-memory kill during the rollout's checks looks like."""
    import docker

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            c = client.containers.get(name)
        except docker.errors.NotFound:
            continue
        ports = (c.attrs["NetworkSettings"].get("Ports") or {}).get("8000/tcp") or []
        if c.status != "running" or not ports:
            continue
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]['HostPort']}/ready",
                                        timeout=2) as r:
                if r.status == 200:
                    c.kill()
                    return
        except OSError:
            continue


@pytest.mark.slow
def test_docker_rollout_good_rerun_and_bad_image_rolled_back(serving_image):
    client = serving_image.client
    opts = DockerOptions(name="turbo-rollout-test", port=free_port(), ready_timeout_s=300)
    bad_tag = "turbo-rollout-test-bad:never-ready"
    client.images.build(fileobj=io.BytesIO(
        f'FROM {serving_image.ref}\nENTRYPOINT ["python3", "-m", "http.server", "8000"]\n'.encode()),
        tag=bad_tag, rm=True, pull=False)
    killed_tag = "turbo-rollout-test-killed:3"  # the same server, killed during its verify
    client.images.build(fileobj=io.BytesIO(
        f'FROM {serving_image.ref}\nLABEL ai.turbo.release="3"\n'.encode()), tag=killed_tag,
        rm=True, pull=False)
    next_tag = "turbo-rollout-test-next:2"  # the same server, another image id
    client.images.build(fileobj=io.BytesIO(
        f'FROM {serving_image.ref}\nLABEL ai.turbo.release="2"\n'.encode()), tag=next_tag,
        rm=True, pull=False)
    kw = {"model": serving_image.model, "variant": serving_image.variant, "docker": opts}
    try:
        first = run.run("docker", serving_image.ref, **kw)
        assert first.status == "deployed" and first.changed, (first.reason, first.verify)
        assert first.verify["served_models"] == [f"{serving_image.model}:turbo-int4"]
        assert first.previous_revision is None and first.image_digest == serving_image.digest
        serving = client.containers.get(opts.name)
        assert serving.attrs["HostConfig"]["ReadonlyRootfs"] and serving.attrs["Config"]["User"] == "10001"
        assert "Paris" in _complete(opts.port)

        again = run.run("docker", serving_image.ref, **kw)
        assert again.status == "unchanged" and not again.changed and again.verify["ok"]
        assert client.containers.get(opts.name).id == serving.id

        bad = run.run("docker", bad_tag, **kw | {"docker": replace(opts, ready_timeout_s=20)})
        assert bad.status == "rolled_back" and bad.rolled_back
        assert "did not answer 200 within 20 s" in bad.reason
        assert bad.previous_revision == serving.image.id
        assert bad.rollback_verify["ok"]
        still = client.containers.get(opts.name)
        assert still.id == serving.id and still.status == "running"
        assert "Paris" in _complete(opts.port)
        names = {c.name for c in client.containers.list(all=True,
                                                        filters={"label": f"{DEPLOYMENT}={opts.name}"})}
        assert names == {opts.name}  # the failed candidate is gone

        with pytest.raises(RolloutError, match="does not exist on this Docker engine"):
            run.run("docker", "turbo-rollout-test-absent:1", **kw)
        assert client.containers.get(opts.name).id == serving.id

        # the candidate killed while it is being verified (a crash, an OOM kill): rolled
        # back, the old container never stopped serving
        killer = threading.Thread(target=_kill_when_ready, args=(client, f"{opts.name}-candidate"),
                                  daemon=True)
        killer.start()
        loaded = VerifyConfig(expected_model=f"{serving_image.model}:turbo-int4",
                              max_p95_latency_s=120.0, load_requests=16)  # verify takes seconds
        killed = run.run("docker", killed_tag, **kw | {"verify_cfg": loaded})
        killer.join(timeout=60)
        assert killed.status == "rolled_back" and killed.rolled_back, (killed.status, killed.reason)
        assert killed.reason.startswith("candidate failed verification"), killed.reason
        assert killed.rollback_verify["ok"] and client.containers.get(opts.name).id == serving.id
        assert "Paris" in _complete(opts.port)

        # an upgrade switches traffic and keeps the old container, stopped, for rollback
        up = run.run("docker", next_tag, **kw)
        assert up.status == "deployed" and up.previous_revision == serving.image.id, up.reason
        assert up.new_revision == client.images.get(next_tag).id != serving.image.id
        assert 0 < up.details["downtime_s"] < 300
        previous = client.containers.get(f"{opts.name}-previous")
        assert previous.id == serving.id and previous.status == "exited"
        assert client.containers.get(opts.name).image.id == up.new_revision
        assert "Paris" in _complete(opts.port)
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{DEPLOYMENT}={opts.name}"}):
            c.remove(force=True)
        for tag in (bad_tag, next_tag):
            client.images.remove(tag, force=True)
