"""The pipeline's parameter schema: a valid JSON schema whose defaults validate; bad values
are refused with the field named, before any work starts."""

import subprocess
import sys

import jsonschema
import pytest

from turbo_core.pipeline import params


def test_schema_is_valid_and_defaults_pass():
    jsonschema.Draft202012Validator.check_schema(params.SCHEMA)
    got = params.validate(None)
    assert got == params.defaults() and set(got["variants"]) <= set(params.PARAMS["variants"]["examples"])
    g = params.gates(params.validate({"max_ppl_delta_pct": 2.0}))
    good = {"ppl_delta_pct": 1.5, "top1_agreement": 0.9, "kv_compression": 3.8, "kl_mean": 0.01,
            "decode_speedup": 1.1, "retrieval_kept_upper": 1.0}
    assert g.evaluate(good, None).passed
    assert not g.evaluate(good | {"ppl_delta_pct": 2.5}, None).passed
    assert [x.metric for x in g.gates] == ["ppl_delta_pct", "top1_agreement", "kv_compression",
                                           "kl_mean", "decode_speedup", "retrieval_kept_upper"]
    on = params.gates(params.validate({"min_prefill_speedup": 0.5, "min_retrieval": 0.6}))
    assert on.evaluate(good | {"prefill_speedup": 0.4, "retrieval_accuracy": 0.5}).reasons == (
        "prefill_speedup = 0.4, needs >= 0.5 (misses by 0.1)",
        "retrieval_accuracy = 0.5, needs >= 0.6 (misses by 0.1)")


@pytest.mark.parametrize("conf, field, words", [
    ({"variants": ["turbo-int4", "turbo-int3"]}, "variants/1", "'turbo-int3' is not one of"),
    ({"variants": []}, "variants", "should be non-empty"),
    ({"max_ppl_delta_pct": -1}, "max_ppl_delta_pct", "less than the minimum of 0"),
    ({"deploy_target": "nomad"}, "deploy_target", "is not one of"),
    ({"namespace": "Bad_NS"}, "namespace", "does not match"),
    ({"image_repository": "repo:latest"}, "image_repository", "does not match"),
    ({"colour": "blue"}, "(top level)", "'colour' was unexpected"),
])
def test_bad_params_are_refused_naming_the_field(conf, field, words):
    with pytest.raises(ValueError, match="bad pipeline parameters") as exc:
        params.validate(conf)
    assert f"{field}: " in str(exc.value) and words in str(exc.value), str(exc.value)


def test_params_import_is_torch_free():
    code = "import sys, turbo_core.pipeline.params; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_base_image_is_the_local_base():
    from turbo_core.rollout import image

    assert params.PARAMS["base_image"]["default"] == image.LOCAL_BASE


def test_measurement_defaults_match_the_settings_they_build():
    """params.py is torch-free, so it states the sizes again: they must be the settings' own."""
    from turbo_core.hf.retrieval import RetrievalSettings
    from turbo_core.hf.speed import SpeedSettings

    d, sp, rt = params.defaults(), SpeedSettings(), RetrievalSettings()
    assert (d["speed_context"], d["speed_batch"], d["speed_repeats"]) == (sp.context, sp.batch,
                                                                          sp.repeats)
    assert (tuple(d["retrieval_lengths"]), d["retrieval_samples"]) == (rt.lengths, rt.samples)
