"""``--deploy-target auto`` (the main command's): a machine without a running Docker engine gets
target ``none``, and the run's report says why and the one command that makes the next run build
and deploy. The engine check is real (a ping to a socket nothing listens on); which programs are
installed is what the test varies."""

import shutil

import pytest

from turbo_core.pipeline import local


@pytest.fixture
def dead_engine(monkeypatch, tmp_path):
    where = f"unix://{tmp_path}/no-engine.sock"
    monkeypatch.setenv("DOCKER_HOST", where)
    return where


def installed(monkeypatch, *names):
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda n: f"/usr/bin/{n}" if n in names else
                        (None if n in ("docker", "dockerd", "systemctl") else real(n)))


@pytest.mark.parametrize(("programs", "command"), [
    (("docker", "dockerd", "systemctl"), "`sudo systemctl start docker`"),
    (("docker", "dockerd"), "`sudo dockerd > dockerd.log 2>&1 &`"),
    ((), "`sudo apt-get install docker.io`"),
])
def test_no_engine_means_none_and_the_report_says_how_to_get_one(programs, command, dead_engine,
                                                                monkeypatch):
    installed(monkeypatch, *programs)
    target, why = local.default_target()
    assert target == "none"
    assert dead_engine in why and command in why and "no image was built or deployed" in why
    assert ("is installed but no engine answers" in why) == bool(programs)
    result = {"run_id": "manual__x", "state": "success", "seconds": 1.0, "tasks": [],
              "summary": None, "deploy_target": target}
    assert f"Deploy target none (auto): {why}" in local.report(result, why).splitlines()
