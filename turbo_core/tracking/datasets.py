"""The text a variant was calibrated and evaluated on, logged as MLflow datasets: the run's
inputs and the UI's Datasets column then name it (name, digest, source) with its token count,
so two runs on different text are told apart at a glance. Torch-free; MLflow imported late."""

from __future__ import annotations

import hashlib
from pathlib import Path

STDLIB_PREFIX = "stdlib:"  # the default corpus's source, e.g. "stdlib:pydoc_data.topics"


def text_digest(text: str) -> str:
    """The first 16 hex digits of the text's SHA-256 (MLflow keeps digests short)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _source(source: str):
    """A file as MLflow's local-file source; the bundled corpus as a code source naming the
    Python module the text comes from (it ships with the interpreter, no file to point at)."""
    import platform

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import get_registered_sources

    if source.startswith(STDLIB_PREFIX):
        return CodeDatasetSource({"python_module": source.removeprefix(STDLIB_PREFIX),
                                  "python_version": platform.python_version()})
    # MLflow makes this class at import (and registers it twice): found by name, not imported
    local = next(cls for cls in get_registered_sources()
                 if cls.__name__ == "LocalArtifactDatasetSource")
    return local(Path(source).resolve().as_uri())


def log_text(context: str, text: str, source: str, tokens: int) -> None:
    """Log ``text`` (``tokens`` of it used) from ``source`` as the active run's input in
    ``context`` ("calibration" or "evaluation")."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    name = f"{Path(source).name if not source.startswith(STDLIB_PREFIX) else source}:{context}"
    dataset = MetaDataset(_source(source), name=name, digest=text_digest(text),
                          schema=Schema([ColSpec("string", "text")]))
    mlflow.log_input(dataset, context=context,
                     tags={"tokens": str(tokens), "characters": str(len(text))})
