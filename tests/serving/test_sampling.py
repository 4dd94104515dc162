"""One token from logits: greedy at temperature 0, top-p over the tempered softmax, and the
extremes a schema fuzz sends (a temperature or top_p just above 0) giving a token, not NaN."""

import pytest
import torch

from turbo_core.serving.engine import Sampling


def test_extremes_pick_the_likeliest_token_instead_of_failing():
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    gen = torch.Generator().manual_seed(0)
    assert Sampling(temperature=0.0).pick(logits, gen) == 1
    # a temperature this small overflowed logits / T to inf, and softmax to NaN
    assert Sampling(temperature=1e-300).pick(logits, gen) == 1
    # top_p below float32's smallest number kept no token at all (all-zero probabilities)
    assert Sampling(temperature=1.0, top_p=4e-260).pick(logits, gen) == 1


def test_top_p_draws_from_the_nucleus_in_its_proportions():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(1)
    s = Sampling(temperature=1.0, top_p=0.7)  # keeps 0.5 and 0.3 (the one crossing 0.7)
    picks = torch.tensor([s.pick(logits, gen) for _ in range(4000)])
    assert set(picks.tolist()) == {0, 1}
    assert (picks == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
