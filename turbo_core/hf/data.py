"""Text for calibration and evaluation, offline.

Default corpus: the English prose Python ships in ``pydoc_data/topics.py`` (the language
reference topics), split deterministically into a calibration part and a held-out evaluation
part. Any UTF-8 text file can be used instead.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SOURCE = "stdlib:pydoc_data.topics"
CALIBRATION_SHARE = 0.25  # first quarter of the topics calibrates, the rest evaluates


@dataclass(frozen=True)
class TextSplit:
    """A corpus split into disjoint calibration and evaluation text."""

    source: str
    calibration: str
    evaluation: str

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(self.calibration.encode())
        h.update(b"\0")
        h.update(self.evaluation.encode())
        return h.hexdigest()


def _stdlib_topics() -> list[str]:
    topics = importlib.import_module("pydoc_data.topics").topics
    return [topics[k].strip() for k in sorted(topics)]


def load_split(path: str | Path | None = None, calibration_share: float = CALIBRATION_SHARE) -> TextSplit:
    """The default corpus (``path=None``) or a text file, split by paragraphs (blank lines) or,
    in a file without any (one document per line, a common corpus layout), by lines.

    Raises:
        ValueError: missing or non-UTF-8 file, one that holds fewer than two documents, or a
            share outside (0, 1).
    """
    if not 0.0 < calibration_share < 1.0:
        raise ValueError(f"calibration share must be in (0, 1), got {calibration_share}")
    if path is None:
        parts, source = _stdlib_topics(), DEFAULT_SOURCE
    else:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"text file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"text file {p} is not UTF-8: {exc}") from None
        parts = [para.strip() for para in text.split("\n\n") if para.strip()]
        if len(parts) < 2:  # no paragraphs: one document per line
            parts = [line.strip() for line in text.splitlines() if line.strip()]
        source = str(p)
    if len(parts) < 2:
        raise ValueError(f"text {source} holds {len(parts)} non-empty paragraph or line; a "
                         f"calibration and an evaluation part need at least two")
    total = sum(len(x) for x in parts)
    cut, acc = 1, 0
    for i, part in enumerate(parts):
        acc += len(part)
        if acc >= calibration_share * total:
            cut = max(1, min(i + 1, len(parts) - 1))
            break
    return TextSplit(source, "\n\n".join(parts[:cut]), "\n\n".join(parts[cut:]))
