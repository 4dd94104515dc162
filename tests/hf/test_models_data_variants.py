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


def test_a_file_that_is_not_a_gguf_model_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBO_HOME", str(tmp_path / "home"))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=r"weights\.bin is not a GGUF file \(\*\.gguf\)"):
        models.load(tmp_path / "weights.bin")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x07" * 60)  # a header and nothing else
    with pytest.raises(ValueError, match=r"cannot convert GGUF file .*broken\.gguf"):
        models.load(tmp_path / "broken.gguf")
    models_dir = tmp_path / "home" / "models"
    assert not models_dir.exists() or not any(models_dir.iterdir())


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


def test_variants_rebuild_from_their_logged_params_and_old_params_load():
    for v in VARIANTS.values():
        logged = json.loads(json.dumps(v.params()))  # what variant.json holds
        assert Variant.from_params(logged) == v, v.name
    # a version registered before description, sas_coeffs, kv_protect and the levers were logged,
    # with the smooth_k it logged then (never applied over a quantized cache)
    old = {k: val for k, val in get_variant("turbo-int4").params().items()
           if k in ("variant", "sas", "sas_degree", "sas_lut_max", "qk_int8", "pv_int8",
                    "block_size", "sparse_ratio", "kv_bits", "int2_fraction", "int2_scope",
                    "kv_chunk", "kv_k_group", "kv_v_group")} | {"smooth_k": True}
    rebuilt = Variant.from_params(old)
    assert rebuilt.kv.levers() == {k: False if isinstance(val, bool) else (0 if k == "sinks" else None)
                                   for k, val in get_variant("turbo-int4").kv.levers().items()}
    assert not rebuilt.math.smooth_k and rebuilt.math.sas == get_variant("turbo-int4").math.sas


def test_smooth_k_over_a_quantized_cache_is_refused():
    """smooth_k needs K's mean over the keys before INT8; a quantized cache has stored K at INT8
    as it arrived, so the combination would log a setting that is not applied."""
    from turbo_core.attention.config import TURBO_DEFAULT

    with pytest.raises(ValueError, match=r"smooth_k .* would not apply; set smooth_k=False"):
        Variant("x", "bad", math=TURBO_DEFAULT, kv_bits=4)
    assert not any(v.math.smooth_k for v in VARIANTS.values() if v.quantized_cache)
    Variant("ok", "float cache smooths", math=TURBO_DEFAULT)  # float K: smoothing applies


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
