"""turbo_core.bench.instructions: instruction counts of the C++ ops under a real callgrind."""

import pytest

from turbo_core.bench import instructions


@pytest.mark.slow
def test_decode_counts_are_positive_and_scale_with_the_work():
    """decode over a cache of INT4 pages: two callgrind runs (with and without the calls); the
    difference is the op's work. AVX2 needs well over a tenth of an instruction per cached value
    (a code must at least be converted and multiplied) and, for a kernel that reads its pages
    in place, well under 50 (the PyTorch reference decompresses the whole history: hundreds)."""
    row = instructions.count("decode-int4")
    assert "error" not in row, row
    assert row["calls"] == instructions.CALLS["decode"] and row["elements"] > 0
    assert 0.1 < row["instructions_per_element"] < 50, row
    text = instructions.table([row])
    assert "decode-int4" in text and f"{row['instructions_per_element']:.2f}" in text


def test_without_valgrind_the_row_says_so(monkeypatch):
    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    row = instructions.count("append-int4")
    assert row["error"].startswith("valgrind is not installed")
    assert "valgrind is not installed" in instructions.table([row])
