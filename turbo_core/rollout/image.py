"""Serving image: wheelhouse, build context, ``docker build`` and ``push`` through the Docker SDK.

Tags are ``<repository>:<model>-<variant>-<gitsha>``; deployments use the pushed digest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from turbo_core.tracking.runs import code_version

ROOT = Path(__file__).resolve().parents[2]  # the repository
LOCAL_BASE = "turbo-base:bookworm-py311-gxx-pydev"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.")


def image_tag(repository: str, model_name: str, variant: str, sha: str | None = None) -> str:
    if not repository or any(c.isspace() for c in repository) or ":" in repository.split("/")[-1]:
        raise ValueError(f"image repository {repository!r} must be a name without a tag")
    sha = sha or code_version().split("+")[-1]
    return f"{repository}:{_slug(model_name)}-{_slug(variant)}-{_slug(sha)}"[:128 + len(repository)]


def project_wheel(dest: Path) -> Path:
    """This project's wheel, reproducible: its zip entries are dated 1980-01-01, not now, so the
    same source gives the same bytes. Docker's COPY of the wheelhouse then hits its cache and
    the image's build stage (1.2 GB of virtual environment, ~2 min) is built once per source
    tree, not once per image: a nightly building two variants stores and builds it once."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel",
                    "--no-deps", "-q", "-w", str(dest), str(ROOT)], check=True,
                   env=os.environ | {"SOURCE_DATE_EPOCH": "315532800"})
    (wheel,) = dest.glob("turbo_attention_pipeline-*.whl")
    return wheel


def build_wheelhouse(dest: Path, include_torch: bool = True) -> Path:
    """Wheels for the image from the lock: this project + its ``serve`` extra, for the image's
    Python (3.11, manylinux x86_64). Uses this machine's pip configuration for the index."""
    project_wheel(dest)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "download", "-q", "-d", str(dest), "-c", str(ROOT / "requirements.lock"),
                    "--only-binary", ":all:", "--find-links", str(dest),
                    "turbo-attention-pipeline[serve]"], check=True)
    if not include_torch:
        for whl in dest.glob("torch-*.whl"):
            whl.unlink()
    names = sorted(p.name for p in dest.glob("*.whl"))
    (dest / "requirements.txt").write_text("turbo-attention-pipeline[serve]\n")
    if not any(n.startswith("torch-") for n in names) and include_torch:
        raise ValueError("the wheelhouse has no torch wheel")
    return dest


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    image_id: str
    digest: str | None = None


def build(*, model_dir: Path, plan_path: Path, model_name: str, variant: str, repository: str,
          wheelhouse: Path, base_image: str = LOCAL_BASE, mlflow_run_id: str = "none",
          sha: str | None = None) -> BuiltImage:
    """Assemble a minimal build context (wheels, model, plan, Dockerfile) and build it."""
    import docker

    tag = image_tag(repository, model_name, variant, sha)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model directory {model_dir} has no config.json")
    if not plan_path.is_file():
        raise ValueError(f"bit plan {plan_path} not found")
    if not (wheelhouse / "requirements.txt").is_file():
        raise ValueError(f"{wheelhouse} is not a wheelhouse (no requirements.txt)")
    client = docker.from_env()
    with tempfile.TemporaryDirectory(prefix="turbo-image-") as tmp:
        ctx = Path(tmp)
        shutil.copytree(wheelhouse, ctx / "wheels")
        shutil.copytree(model_dir, ctx / "model")
        shutil.copy(plan_path, ctx / "plan.json")
        shutil.copy(ROOT / "docker" / "Dockerfile", ctx / "Dockerfile")
        for path in [ctx, *ctx.rglob("*")]:  # the image runs as a non-root user: world-readable
            path.chmod(0o755 if path.is_dir() else 0o644)
        image, logs = client.images.build(
            path=str(ctx), tag=tag, rm=True, forcerm=True, pull=False,
            buildargs={"BASE_IMAGE": base_image, "GIT_SHA": sha or code_version(),
                       "MODEL": model_name, "VARIANT": variant, "MLFLOW_RUN_ID": mlflow_run_id})
        for entry in logs:
            line = entry.get("stream", "").rstrip()
            if line:
                print(f"[image build] {line}", file=sys.stderr)
    return BuiltImage(tag=tag, image_id=image.id)


def push(tag: str) -> str:
    """Push ``tag`` and return its registry digest (``sha256:...``)."""
    import docker

    client = docker.from_env()
    repo, _, version = tag.rpartition(":")
    digest = None
    for entry in client.images.push(repo, tag=version, stream=True, decode=True):
        if "error" in entry:
            raise ValueError(f"push of {tag} failed: {entry['error']}")
        aux = entry.get("aux") or {}
        digest = aux.get("Digest", digest)
    if digest is None:
        raise ValueError(f"push of {tag} reported no digest")
    return digest
