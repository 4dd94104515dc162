"""A machine that cannot run the image tests' services fails them, naming what is missing; it
never turns them into skips. Checked for real: pytest runs in a child process with no Docker
engine reachable (``DOCKER_HOST`` on a socket nothing listens on) and no ``dockerd`` or
``docker-registry`` on ``PATH``."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_missing_docker_services_are_errors_not_skips(tmp_path):
    env = os.environ | {"DOCKER_HOST": f"unix://{tmp_path}/nothing.sock",
                        "PATH": str(Path(sys.executable).parent)}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-o", "addopts=",
         "--import-mode=importlib", "-rEs",
         "tests/rollout/test_manifests.py::test_registry_resolves_tags_to_digests_and_refuses_missing_images"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    report = out.stdout + out.stderr
    assert out.returncode != 0, report
    assert "1 error" in report and "skipped" not in report, report
    assert "no local registry binary (Debian package docker-registry" in report, report
