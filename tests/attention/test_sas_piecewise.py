"""The piecewise SAS exponent and the finer LUT (the article's higher-order approximations):
their error against exact ``exp``, that they improve on the single cubic, and that the fused
kernels refuse them by name instead of reading the wrong polynomial."""

import math

import pytest
import torch

from turbo_core.attention import sas
from turbo_core.attention.config import AttentionMath, SASConfig
from turbo_core.attention.functional import choose_backend
from turbo_core.attention.reference import attention_details


def _worst(cfg: SASConfig) -> float:
    """Max relative error over the whole kept range in float64, measured on a grid independent
    of the module's own error helper."""
    x = -torch.linspace(0.0, cfg.lut_max + 1.0, 400_001, dtype=torch.float64)[:-1]
    return float(((sas.sas_exp(x, cfg) - torch.exp(x)).abs() / torch.exp(x)).max())


@pytest.mark.parametrize("degree", [2, 3])
@pytest.mark.parametrize(("pieces", "lut_steps"), [(2, 1), (4, 1), (1, 4), (3, 2)])
def test_more_pieces_beat_the_single_polynomial(degree, pieces, lut_steps):
    single = _worst(SASConfig(degree=degree))
    finer = _worst(SASConfig(degree=degree, pieces=pieces, lut_steps=lut_steps))
    # a polynomial of degree d on an interval h times shorter: error ~ h^(d+1) smaller
    width = pieces * lut_steps
    assert finer < single / width ** degree, (degree, pieces, lut_steps, single, finer)


def test_error_bound_of_the_least_squares_pieces():
    # Taylor's remainder bounds the best polynomial of degree d on [0, h): |e^-f - P| <=
    # h^(d+1) / (d+1)! on each piece (relative, as e^-f <= 1 there and the LUT is exact);
    # least squares is within a small factor of the best one
    for degree in (2, 3):
        for width in (1, 2, 4, 8):
            cfg = SASConfig(degree=degree, pieces=width)
            bound = (1.0 / width) ** (degree + 1) / math.factorial(degree + 1) * math.e
            assert _worst(cfg) <= bound, (degree, width, _worst(cfg), bound)


def test_module_error_helper_agrees_and_single_form_is_unchanged():
    cfg = SASConfig(pieces=4)
    assert sas.poly_max_rel_error(cfg) == pytest.approx(_worst(cfg), rel=0.05)
    plain = SASConfig()
    # the one-piece path is the published form: LUT * cubic(f)
    x = -torch.rand(1000, dtype=torch.float64) * 9
    n = torch.floor(-x)
    c = sas.fit_exp_poly(3)
    f = -x - n
    manual = torch.exp(-n) * (c[0] + f * (c[1] + f * (c[2] + f * c[3])))
    torch.testing.assert_close(sas.sas_exp(x, plain), manual, rtol=1e-12, atol=0)


def test_cutoff_is_the_same_for_every_form():
    x = -torch.linspace(0, 12, 20_001, dtype=torch.float32)
    for cfg in (SASConfig(lut_max=5), SASConfig(lut_max=5, pieces=3, lut_steps=4)):
        y = sas.sas_exp(x, cfg)
        dropped = torch.floor(-x) > 5
        assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))
        assert bool((y[~dropped] > 0).all())


def test_op_counts_and_tables():
    assert sas.op_count(SASConfig())["fma"] == 3
    assert sas.op_count(SASConfig(lut_steps=4))["table_floats"] == 36  # (T + 1) * 4
    assert sas.op_count(SASConfig(pieces=4))["coefficient_floats"] == 16
    assert sas.op_count(SASConfig(pieces=4))["ops_per_weight"] > sas.op_count(SASConfig())["ops_per_weight"]


def test_piecewise_attention_is_closer_to_exact():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 50, 32, dtype=torch.float64) for _ in range(3))
    exact = attention_details(q, k, v).out
    err = {p: (attention_details(q, k, v, math_cfg=AttentionMath(sas=SASConfig(pieces=p))).out
               - exact).abs().max().item() for p in (1, 4)}
    assert err[4] < err[1] / 20, err


def test_kernels_refuse_piecewise_forms_by_name():
    q = torch.randn(1, 2, 8, 16)
    for cfg, name in ((SASConfig(pieces=2), "piecewise SAS exponent"),
                      (SASConfig(lut_steps=2), "piecewise SAS exponent"),
                      (SASConfig(head_lut_max=(4, 8)), "per-head SAS cut-offs")):
        backend, reason = choose_backend(q, q, q, math_cfg=AttentionMath(sas=cfg))
        assert backend == "reference" and name in reason, (backend, reason)
        with pytest.raises(ValueError, match=name):
            sas.kernel_args(cfg)


@pytest.mark.parametrize("bad", [dict(pieces=0), dict(pieces=65), dict(lut_steps=True),
                                 dict(pieces=2, coeffs=(1.0, -1.0, 0.5, -0.1)),
                                 dict(head_lut_max=()), dict(head_lut_max=(3, -1)),
                                 dict(head_lut_max=[3, 4])])
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError, match="SASConfig"):
        SASConfig(**bad)
