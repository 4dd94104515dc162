"""Offline model loading, text splits and the variant registry."""

import json
import sys

import pytest

from turbo_core.attention.variants import VARIANTS, Variant, get_variant
from turbo_core.hf import data, models


def test_load_local_dir(tiny_dir):
    lm = models.load(tiny_dir)
    assert lm.shape.num_layers == 2 and lm.shape.num_kv_heads == 2 and lm.shape.head_dim == 64
    assert lm.weights_sha256 == models.weights_hash(tiny_dir)
    assert len(lm.weights_sha256) == 64


def test_missing_model_and_hub_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a local directory"):
        models.load(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"hub is never contacted"):
        models.load("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        models.load(tmp_path / "empty")


def test_corrupt_weights_are_refused(tmp_path, tiny_factory):
    path = tiny_factory(tmp_path / "broken")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cannot load model from .*broken"):
        models.load(path)


def test_text_split_is_deterministic_and_disjoint(tmp_path):
    a, b = data.load_split(), data.load_split()
    assert a == b and a.sha256 == b.sha256
    assert a.calibration and a.evaluation and a.evaluation not in a.calibration
    assert len(a.evaluation) > 2 * len(a.calibration)
    f = tmp_path / "t.txt"
    f.write_text("first paragraph\n\nsecond paragraph\n\nthird one")
    s = data.load_split(f)
    assert s.calibration == "first paragraph" and s.evaluation.startswith("second")


def test_a_file_with_one_document_per_line_splits_on_lines(tmp_path):
    f = tmp_path / "docs.jsonl.txt"  # no blank line anywhere, as many corpora are laid out
    f.write_text("".join(f"document number {i} says something\n" for i in range(8)))
    s = data.load_split(f, calibration_share=0.25)
    assert s.calibration.split("\n\n") == [f"document number {i} says something" for i in range(2)]
    assert s.evaluation.split("\n\n")[0] == "document number 2 says something"
    assert len(s.evaluation.split("\n\n")) == 6
    # a file with paragraphs keeps splitting on them, lines inside a paragraph stay together
    g = tmp_path / "paras.txt"
    g.write_text("line one\nline two\n\nanother paragraph")
    assert data.load_split(g).calibration == "line one\nline two"


def test_bad_text_input(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.load_split(tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("only one paragraph\n\n\n")
    with pytest.raises(ValueError, match=r"one\.txt holds 1 non-empty paragraph or line; .* at least two"):
        data.load_split(tmp_path / "one.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load_split(tmp_path / "bin.txt")


def test_registry():
    assert list(VARIANTS)[:2] == ["fp16", "sas"]
    assert {"int8", "turbo-int4", "turbo-mix", "turbo-int2"} <= set(VARIANTS)
    mix = get_variant("turbo-mix")
    assert mix.needs_calibration and mix.kv_bits == 4 and 0 < mix.int2_fraction < 1
    json.dumps(mix.params())  # JSON-ready
    with pytest.raises(ValueError, match="unknown variant 'nope'; known variants: fp16"):
        get_variant("nope")
    with pytest.raises(ValueError, match="needs kv_bits=4"):
        Variant("x", "bad", kv_bits=2, int2_fraction=0.5)
    with pytest.raises(ValueError, match="unsupported KV bits 3"):
        Variant("x", "bad", kv_bits=3)
    with pytest.raises(ValueError, match="must be non-empty"):
        Variant("a b", "bad")


def test_registry_import_is_torch_free():
    import subprocess

    code = "import sys, turbo_core.attention.variants, turbo_core.hf.data; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
