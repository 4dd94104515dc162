"""Prompt chunks over the packed cache on CPU (BLAS products + the fused softmax pass) against
the pure-PyTorch reference: ragged sequences, mixed INT2/INT4/INT8 heads, GQA, SAS cubic and
quadratic, INT8 Q·Kᵀ on and off, a first chunk (nothing compressed yet) and later ones."""

import pytest
import torch
from turbo_kernels.cpu_prefill import prefill_attention_cpu

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, SASConfig
from turbo_core.attention.reference import decode_attention_reference
from turbo_core.testing import assert_close

from .test_cpu_decode import ragged

MATHS = {"exact": EXACT, "turbo": TURBO_DEFAULT, "sas-no-int8": AttentionMath(sas=SASConfig()),
         "sas-quadratic": AttentionMath(sas=SASConfig(degree=2, lut_max=6), qk_int8=True)}
# the same row max as the reference, so only float rounding differs (FMA in the polynomial)
ATOL = 2e-5


@pytest.mark.parametrize("bits", [[4, 4, 4], [2, 4, 8]])
@pytest.mark.parametrize(("lengths", "new"), [([200], 200), ([700, 300], 150), ([129, 640], 129)])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("name", list(MATHS))
def test_prompt_chunk_matches_reference(bits, lengths, new, group, name):
    cache = ragged(bits, lengths, new=new)
    view = cache.view()
    # scores spread wide enough (x4) that SAS cuts weights past its LUT
    q = 4 * torch.randn(len(lengths), 3 * group, new, 64, generator=torch.Generator().manual_seed(2))
    out, dropped, valid = prefill_attention_cpu(q, view, math_cfg=MATHS[name])
    ref = decode_attention_reference(q, view, math_cfg=MATHS[name])
    assert_close(ref.out, out, atol=ATOL)
    assert valid == ref.candidates
    assert dropped == ref.sas_dropped
    if MATHS[name].sas is not None and max(lengths) > 300:
        assert dropped > 0  # long rows: SAS really cut weights, and counted the same ones


def test_int8_pv_is_refused():
    cache = ragged([4], [200], new=200)
    with pytest.raises(ValueError, match="INT8 P·V"):
        prefill_attention_cpu(torch.randn(1, 1, 200, 64), cache.view(),
                              math_cfg=AttentionMath(pv_int8=True))


def test_prompt_chunk_over_sinks_and_int2_groups_matches_reference():
    from .test_cpu_decode import LEVERS

    cache = ragged([2, 4, 2], [400, 150], new=140, cfg=LEVERS)
    view = cache.view()
    q = 4 * torch.randn(2, 6, 140, 64, generator=torch.Generator().manual_seed(7))
    out, dropped, valid = prefill_attention_cpu(q, view, math_cfg=TURBO_DEFAULT)
    ref = decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT)
    assert_close(ref.out, out, atol=ATOL)
    assert (dropped, valid) == (ref.sas_dropped, ref.candidates)
