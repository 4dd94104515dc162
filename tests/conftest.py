"""Shared fixtures: tiny randomly initialised causal LMs saved as local HF directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

from turbo_core.http import free_port, stop_group, wait_ok


def _tokenizer(vocab: int = 320):
    """A small byte-level BPE tokenizer trained on the stdlib prose (offline, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from turbo_core.hf.data import load_split

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_split().calibration[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny(path, family: str = "llama", seed: int = 0):
    """Save a tiny random model of ``family`` + tokenizer to ``path``; returns ``path``."""
    import transformers as tf

    tok = _tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id)
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }
    cfg_cls, model_cls = classes[family]
    extra = {"head_dim": 64} if family == "gemma" else {}
    if family == "gemma3":  # Gemma-3 style: a 32-token sliding window on the first layer only
        extra = {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 32,
                 "layer_types": ["sliding_attention", "full_attention"]}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common, **extra)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_factory():
    """``tiny_factory(path, family)`` saves a tiny random model of another family."""
    return make_tiny


@pytest.fixture(scope="session", autouse=True)
def _local_mlflow_store(tmp_path_factory):
    """Every test's MLflow writes go to a throwaway sqlite store unless a test points
    MLFLOW_TRACKING_URI at the real server fixture."""
    import os

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 (sqlite backend, proxied artifacts),
    started in its own process group and stopped with it."""
    import os
    import subprocess
    import sys
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = (root / "server.log").open("w")
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def alive():
            if proc.poll() is not None:
                return "mlflow server exited: " + (root / "server.log").read_text()[-2000:]
            return None

        wait_ok(f"{url}/health", 120, alive)
        yield url
    finally:
        stop_group(proc, timeout_s=20)
        log.close()


def _clear_stale_engine_state() -> None:
    """Before starting our own dockerd (none runs): remove what a dockerd that was killed left.

    A container still running when its engine died leaves a network namespace bound under
    /run/docker/netns with a veth on the docker0 bridge, which outlives the engine. Its address
    and MAC (172.17.0.2, 02:42:ac:11:00:02) are the ones the next engine gives its first
    container, whose published port then answers nothing. With no engine running, every
    such namespace is stale: unmount and remove them, and drop the bridge (dockerd makes it
    again)."""
    import subprocess

    netns = Path("/run/docker/netns")
    for entry in sorted(netns.iterdir()) if netns.is_dir() else ():
        subprocess.run(["umount", str(entry)], capture_output=True)
        entry.unlink(missing_ok=True)
    if Path("/sys/class/net/docker0").exists():
        subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True)


@pytest.fixture(scope="session")
def docker_services(tmp_path_factory, local_registry):
    """A Docker engine (the running one, or a dockerd started here) and a local registry on
    127.0.0.1 (Debian's docker-registry), both stopped at the end if started here. A machine
    where no engine runs fails these tests with the reason: the image, rollout and DAG tests
    need a real one, and an environment failure is not a pass."""
    import contextlib
    import os
    import shutil
    import subprocess
    import time

    import docker

    started = []

    def ping():
        try:
            client = docker.from_env()
            client.ping()
            return client
        except docker.errors.DockerException:
            return None

    client = ping()
    root = tmp_path_factory.mktemp("docker-services")
    data_root = None
    if client is None:
        if not shutil.which("dockerd") or os.geteuid() != 0:
            pytest.fail("no Docker engine reachable and dockerd cannot be started here (needs "
                        "the docker.io package and root; scripts/test.sh installs it as root)")
        # Our own engine keeps its images in a folder of this run's, removed at the end: a
        # session builds ~7 GB of images, and a disk that keeps them fills within a day.
        data_root = root / "data-root"
        _clear_stale_engine_state()
        proc = subprocess.Popen(["dockerd", "--data-root", str(data_root)],
                                stdout=(root / "dockerd.log").open("w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        for _ in range(60):
            client = ping()
            if client is not None:
                break
            time.sleep(1)
        else:
            pytest.fail("dockerd did not come up in 60 s: " + (root / "dockerd.log").read_text()[-500:])
    before = {image.id for image in client.images.list(all=True)}
    try:
        yield client, local_registry
    finally:
        # A running engine is somebody's: take back only what this run built.
        for image in client.images.list(all=True):
            if image.id not in before:
                # already gone with a parent, or still used by a container: left alone
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(image.id, force=True)
        client.api.prune_builds()
        if started:
            # Our own engine: its containers go with it. One left running when dockerd stops
            # keeps its network namespace (/run/docker/netns) and veth on docker0, holding
            # 172.17.0.2 and that address's MAC, so the next engine's first container is
            # unreachable from the host (a rollout then waits out its ready timeout).
            for container in client.containers.list(all=True):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True)
        for proc in reversed(started):
            stop_group(proc)
        if data_root is not None:
            shutil.rmtree(data_root, ignore_errors=True)


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory):
    """A real image registry (Debian's docker-registry, the CNCF distribution server) on
    127.0.0.1, stopped at the end. Needs no Docker engine. Yields ``host:port``."""
    import os
    import shutil
    import signal
    import subprocess


    if not shutil.which("docker-registry"):
        pytest.fail("no local registry binary (Debian package docker-registry; "
                    "scripts/test.sh installs it when run as root)")
    root = tmp_path_factory.mktemp("registry")
    port = free_port()
    (root / "registry.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "registry.yml")],
                            stdout=(root / "registry.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_ok(f"http://127.0.0.1:{port}/v2/", 60,
                lambda: None if proc.poll() is None else (root / "registry.log").read_text())
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def serving_image(docker_services, tmp_path_factory):
    """The real serving image (SmolLM2, turbo-int4), built once from the local debootstrap
    base and pushed to the local registry. ``ref`` (repo@digest) stays pullable all session."""
    import subprocess
    from types import SimpleNamespace

    from turbo_core.attention.variants import get_variant
    from turbo_core.hf import calibrate, models
    from turbo_core.rollout import image

    client, registry = docker_services
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("serving-image")
    subprocess.run([str(root / "docker" / "base" / "make_base.sh")], check=True)
    lm = models.load()
    plan = tmp / "plan.json"
    calibrate.uniform_plan(lm, get_variant("turbo-int4")).save(plan)
    build_args = {"model_dir": lm.path, "plan_path": plan, "model_name": lm.name,
                  "variant": "turbo-int4", "repository": f"{registry}/turbo-test",
                  "wheelhouse": image.build_wheelhouse(tmp / "wheels")}
    built = image.build(**build_args)
    digest = image.push(built.tag)
    return SimpleNamespace(client=client, registry=registry, tag=built.tag, digest=digest,
                           ref=f"{registry}/turbo-test@{digest}", model=lm.name,
                           variant="turbo-int4", image_id=built.image_id, build_args=build_args)
