"""Atomic writes: the whole text or the old file, never half, and the mode a plain open gives."""

import os
import stat

import pytest

from turbo_core.fileio import write_atomic


def test_written_files_get_the_umask_mode_not_the_temp_files_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "report.md", "hello\n")
    finally:
        os.umask(old)
    assert path.read_text() == "hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # was 0600 (mkstemp's)
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp file left

def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = write_atomic(tmp_path / "plan.json", "old\n")

    with pytest.raises(TypeError):
        write_atomic(path, 42)  # not text: the write fails after the temp file exists
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
