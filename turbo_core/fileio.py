"""Torch-free file helpers shared by every writer of results, plans and reports, and the one
place that says where local caches and stores live."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename, so readers
    and crashes never leave half a file behind. The file gets the mode a plain ``open`` would
    (0666 less the umask), not the temp file's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def data_dir() -> Path:
    """Where caches and local stores live: ``$TURBO_HOME`` or ``~/.cache/turbo-attention``."""
    return Path(os.environ.get("TURBO_HOME", Path.home() / ".cache" / "turbo-attention"))
