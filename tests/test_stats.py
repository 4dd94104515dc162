"""The binomial bound the recall gate reads, against its definition."""

import math

import pytest

from turbo_core.stats import binomial_upper


@pytest.mark.parametrize("k, n", [(0, 1), (0, 4), (3, 8), (11, 12), (25, 32)])
def test_upper_bound_is_where_seeing_k_or_fewer_gets_five_percent(k, n):
    p = binomial_upper(k, n)
    assert k / n < p < 1
    assert sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)) == \
        pytest.approx(0.05, abs=1e-9)


def test_all_kept_or_nothing_known_bounds_at_one_and_bad_counts_are_refused():
    assert binomial_upper(5, 5) == 1.0 and binomial_upper(0, 0) == 1.0
    with pytest.raises(ValueError, match="0 <= successes <= trials, got 3 of 2"):
        binomial_upper(3, 2)
    with pytest.raises(ValueError, match="confidence must be in"):
        binomial_upper(1, 2, confidence=1.0)
