"""Prompt chunks over the packed cache on CPU — the C++ op ``torch.ops.turbo.prefill_attention``
(sgemm per tile of pages, the reference's row max) — against the pure-PyTorch reference:
ragged sequences, mixed INT2/INT4/INT8 heads, GQA, SAS cubic and quadratic, INT8 Q·Kᵀ on and
off, a first chunk (nothing compressed yet) and later ones, tiles partly seen (causal
diagonal, sinks)."""

import pytest
import torch
from turbo_kernels import cpu_ops

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, AttentionMath, SASConfig
from turbo_core.attention.reference import decode_attention_reference
from turbo_core.testing import assert_close

from .test_cpu_decode import ragged

MATHS = {"exact": EXACT, "turbo": TURBO_DEFAULT, "sas-no-int8": AttentionMath(sas=SASConfig()),
         "sas-quadratic": AttentionMath(sas=SASConfig(degree=2, lut_max=6), qk_int8=True)}
def atol(math_cfg: AttentionMath) -> float:
    """The op takes the reference's row max (two passes), so only float rounding differs; under
    SAS a score that rounding moves across an integer of the LUT changes that one weight by the
    polynomial's max relative error (its step there), hence 1e-4 with SAS, 2e-5 without."""
    return 2e-5 if math_cfg.sas is None else 1e-4


def counts_agree(dropped: int, ref_dropped: int, valid: int) -> bool:
    """SAS zeros as the reference's, but for scores float rounding moves across the cut."""
    return abs(dropped - ref_dropped) <= 1e-5 * valid


def prefill_attention_cpu(q, view, *, math_cfg):
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"
    return cpu_ops.prefill_attention(q, view, math_cfg=math_cfg)


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
    assert_close(ref.out, out, atol=atol(MATHS[name]))
    assert valid == ref.candidates
    assert counts_agree(dropped, ref.sas_dropped, valid), (dropped, ref.sas_dropped)
    if MATHS[name].sas is not None and max(lengths) > 300:
        assert dropped > 0  # long rows: SAS really cut weights


def test_int8_pv_is_refused():
    assert cpu_ops.load()
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
    assert_close(ref.out, out, atol=atol(TURBO_DEFAULT))
    assert valid == ref.candidates and counts_agree(dropped, ref.sas_dropped, valid)


def test_scores_recomputed_when_they_do_not_fit_between_passes():
    """256 query rows over a 33k-token history: more scores than a job keeps between its two
    passes (8M floats), so the second pass computes them again — the same result."""
    from turbo_core.attention.config import KVQuantConfig
    from turbo_core.attention.kvcache import QuantizedKVLayer

    assert cpu_ops.load()
    gen = torch.Generator().manual_seed(11)
    cache = QuantizedKVLayer([4], 64, KVQuantConfig())
    k, v = (torch.randn(1, 1, 33_000, 64, generator=gen) for _ in range(2))
    cache.append(k[:, :, :-256], v[:, :, :-256])
    cache.append(k[:, :, -256:], v[:, :, -256:], compress=False)
    q = 4 * torch.randn(1, 1, 256, 64, generator=gen)
    view = cache.view()
    out, dropped, valid = prefill_attention_cpu(q, view, math_cfg=TURBO_DEFAULT)
    ref = decode_attention_reference(q, view, math_cfg=TURBO_DEFAULT)
    assert_close(ref.out, out, atol=atol(TURBO_DEFAULT))
    assert valid == ref.candidates and counts_agree(dropped, ref.sas_dropped, valid)
