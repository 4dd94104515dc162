"""The README's screenshots can be retaken here: scripts/screenshots.py runs a small pipeline on
the tiny model, starts the real UIs (scripts/ui.sh) and takes the three pictures in headless
Chromium. Each must be a PNG of its size with something on it (not a blank or error page)."""

import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"airflow-trigger.png": (1400, 900), "airflow-grid.png": (1400, 900),
         "mlflow-compare.png": (1400, 1300)}


def _png(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed image data of a PNG (stdlib only)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        if data[pos + 4:pos + 8] == b"IDAT":
            chunks.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    return width, height, zlib.decompress(b"".join(chunks))


def test_the_committed_screenshots_are_the_three_pictures():
    for name, size in SIZES.items():
        width, height, _ = _png(ROOT / "docs" / "images" / name)
        assert (width, height) == size, name


@pytest.mark.slow
def test_the_screenshot_script_retakes_them(tmp_path, tiny_dir):
    assert shutil.which("chromium"), "Chromium missing (scripts/test.sh installs it as root)"
    conf = ('{"eval_tokens": 256, "eval_window": 128, "calib_tokens": 256, "speed_context": 64, '
            '"speed_batch": 2, "retrieval_lengths": [384], "retrieval_samples": 1}')
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshots.py"), "--model",
                          str(tiny_dir), "--out", str(tmp_path), "--conf", conf],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name, size in SIZES.items():
        width, height, pixels = _png(tmp_path / name)
        assert (width, height) == size, name
        # a page with text and widgets: many distinct byte values, not one flat colour
        assert len(set(pixels[::97])) > 40, name
