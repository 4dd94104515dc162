"""SAS exponent against exact math."""

import math

import pytest
import torch

from turbo_core.attention import sas
from turbo_core.attention.config import SASConfig


def test_fit_reproduces_published_cubic():
    fitted = sas.fit_exp_poly(3)
    for ours, published in zip(fitted, sas.PUBLISHED_CUBIC, strict=True):
        assert abs(ours - published) <= 3e-4, (fitted, sas.PUBLISHED_CUBIC)
    assert sas.fit_exp_poly(3) == fitted  # deterministic (and cached)


@pytest.mark.parametrize(
    ("degree", "bound"),
    [(3, 2e-3), (2, 1.5e-2)],  # docs/design.md §5: cubic 1.0e-3, quadratic 1.3e-2
)
def test_poly_max_relative_error(degree, bound):
    err = sas.poly_max_rel_error(SASConfig(degree=degree))
    assert err <= bound, f"degree {degree}: max rel err {err:.3e} > {bound}"


def test_published_cubic_error_matches_design():
    err = sas.poly_max_rel_error(SASConfig(coeffs=sas.PUBLISHED_CUBIC))
    assert 0.9e-3 <= err <= 1.1e-3, err


@pytest.mark.parametrize(
    ("dtype", "degree", "bound"),
    [
        (torch.float32, 3, 2e-3),
        (torch.float32, 2, 1.5e-2),
        # fp16 adds its own rounding (unit roundoff 4.9e-4) in the LUT, f and Horner steps
        (torch.float16, 3, 4e-3),
        (torch.float16, 2, 1.6e-2),
    ],
)
def test_sas_exp_on_kept_range(dtype, degree, bound):
    cfg = SASConfig(degree=degree, lut_max=8)
    err = sas.measured_max_rel_error(cfg, dtype)
    assert err <= bound, f"{dtype} degree {degree}: {err:.3e} > {bound}"


@pytest.mark.parametrize("lut_max", [0, 3, 8])
def test_weights_beyond_lut_are_exactly_zero(lut_max):
    cfg = SASConfig(lut_max=lut_max)
    x = -torch.linspace(0, lut_max + 5, 10_001, dtype=torch.float32)
    y = sas.sas_exp(x, cfg)
    beyond = torch.floor(-x) > lut_max
    assert beyond.any() and (~beyond).any()
    assert torch.equal(y[beyond], torch.zeros_like(y[beyond]))
    assert bool((y[~beyond] > 0).all())


def test_masked_scores_give_zero_and_dtype_is_kept():
    x = torch.tensor([0.0, -0.5, -math.inf, -20.0], dtype=torch.float16)
    y = sas.sas_exp(x, SASConfig())
    assert y.dtype == torch.float16
    assert y[2].item() == 0.0 and y[3].item() == 0.0
    assert abs(y[0].item() - 1.0) <= 1e-3


def test_zero_fraction_counts_only_valid_weights():
    cfg = SASConfig(lut_max=2)
    x = torch.tensor([[0.0, -1.0, -3.5, -math.inf], [0.0, -4.0, -10.0, -2.9]])
    # valid: 3 in row 0 (one dropped), 4 in row 1 (two dropped: n=4, n=10)
    assert sas.zero_fraction(x, cfg) == pytest.approx(3 / 7)
    assert sas.stats(cfg, x).zero_fraction == pytest.approx(3 / 7)


def test_bad_input():
    with pytest.raises(ValueError, match="x <= 0"):
        sas.sas_exp(torch.tensor([0.5]), SASConfig())
    with pytest.raises(ValueError, match="floating-point"):
        sas.sas_exp(torch.tensor([0]), SASConfig())
    with pytest.raises(ValueError, match="degree"):
        SASConfig(degree=5)
    with pytest.raises(ValueError, match="coeffs"):
        SASConfig(degree=3, coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="lut_max"):
        SASConfig(lut_max=-1)


def test_higher_degree_improves_sqnr():
    """Improvement test: the cubic must beat the quadratic on real softmax inputs."""
    from turbo_core.testing import sqnr_db

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(64, 256, generator=gen, dtype=torch.float64) * 3
    x = s - s.amax(dim=-1, keepdim=True)
    exact = torch.softmax(s, dim=-1)

    def approx(degree):
        p = sas.sas_exp(x, SASConfig(degree=degree, lut_max=12))
        return p / p.sum(dim=-1, keepdim=True)

    assert sqnr_db(exact, approx(3)) > sqnr_db(exact, approx(2)) + 10
