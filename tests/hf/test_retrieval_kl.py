"""KL per token against exact math; the synthetic retrieval prompts (lengths, needles, depths,
seeding, scoring); the speed harness's arithmetic on a fake clock."""

import math
import random

import pytest
import torch

from turbo_core.hf import data, evaluate, models, retrieval, speed


def test_token_kl_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    ref, out = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    got = evaluate.token_kl(ref, out)
    for row in range(5):
        p = [math.exp(x) for x in ref[row].double().tolist()]
        q = [math.exp(x) for x in out[row].double().tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        want = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
        assert abs(float(got[row]) - want) < 1e-12
    assert float(evaluate.token_kl(ref, ref).abs().max()) < 1e-12
    assert float(evaluate.token_kl(ref, ref + 3.0).abs().max()) < 1e-12  # logits shift: same


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's own: sentences of ~20 tokens, so a needle's depth is placed finely."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(models.resolve("smollm2")[1])


def test_prompts_have_the_needles_at_their_depths(tokenizer):
    st = retrieval.RetrievalSettings(lengths=(1024, 2048), samples=3, needles=3)
    samples = retrieval.make_samples(tokenizer, data.load_split().evaluation, st)
    assert [(s.task, s.length) for s in samples] == [
        (t, n) for n in (1024, 2048) for _ in range(3) for t in retrieval.TASKS]
    assert samples == retrieval.make_samples(tokenizer, data.load_split().evaluation, st)
    for s in samples:
        text = tokenizer.decode(s.ids)
        assert s.length - 40 <= len(s.ids) <= s.length, (s.task, len(s.ids))
        if s.task == "passkey":
            assert text.count(s.answer) == 2 and text.endswith("The pass key is")
            head, tail = _tokens_before(tokenizer, s.ids, retrieval.PASSKEY_INTRO), 12
        else:
            assert text.count("special magic numbers for") == 3 and text.count(s.answer) == 1
            head, tail = 0, 25
        # depth: a fraction of the haystack's tokens (intro and question aside), in tokens
        at = (_tokens_before(tokenizer, s.ids, s.answer) - head) / (len(s.ids) - tail - head)
        assert abs(at - s.depth) < 0.05, (s.task, s.depth, at)
    # depths evenly spaced over a task's 6 prompts, interleaved across the two lengths
    assert [round(s.depth, 3) for s in samples[::2]] == [0.083, 0.417, 0.75, 0.25, 0.583, 0.917]
    capped = retrieval.make_samples(tokenizer, data.load_split().evaluation, st, max_length=1500)
    assert {s.length for s in capped} == {1024, 1500}


def _tokens_before(tokenizer, ids, needle):
    """The fewest leading tokens whose text contains ``needle``."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if needle in tokenizer.decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_scoring_and_bad_settings(tokenizer):
    assert retrieval.answered(" 48213. Remember", "48213")
    assert not retrieval.answered(" 4821 3", "48213") and not retrieval.answered(" none", "1")
    assert not retrieval.answered(" 482134", "48213")
    with pytest.raises(ValueError, match="too short"):
        retrieval.make_samples(tokenizer, "Some text. More.", retrieval.RetrievalSettings(
            lengths=(128,), samples=1, needles=8))
    with pytest.raises(ValueError, match=">= 128"):
        retrieval.RetrievalSettings(lengths=(64,))


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Fake:
    """A contender whose prefill and steps take known (fake-clock) time per token."""

    def __init__(self, name, clock, prefill_s, step_s, jitter=0.0):
        self.name, self.clock = name, clock
        self.prefill_s, self.step_s, self.rng, self.jitter = prefill_s, step_s, random.Random(0), jitter

    def _tick(self, seconds):
        self.clock.now += seconds * (1 + self.rng.uniform(-self.jitter, self.jitter))

    def start(self, prompts):
        self._tick(self.prefill_s * sum(len(p) for p in prompts))
        return object(), torch.zeros(len(prompts), 7)

    def step(self, state, tokens):
        self._tick(self.step_s)
        return torch.zeros(len(tokens), 7)


def test_speed_harness_reports_medians_and_ratios(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(speed.time, "perf_counter", clock)
    st = speed.SpeedSettings(context=32, batch=3, new_tokens=4, repeats=5)
    base = _Fake("base", clock, prefill_s=0.002, step_s=0.1, jitter=0.2)
    fast = _Fake("fast", clock, prefill_s=0.001, step_s=0.04)
    prompts = speed.prompts_from(torch.arange(500), st)
    assert len(prompts) == 8 and {len(p) for p in prompts} == {32} and len({p[0] for p in prompts}) == 8
    got = speed.measure(base, fast, prompts, st)
    assert got["prefill_tokens_per_s"] == pytest.approx(1000.0)
    assert got["decode_tokens_per_s"] == pytest.approx(3 / 0.04)
    assert 0.8 * 3 / 0.1 < got["decode_tokens_per_s_baseline"] < 1.25 * 3 / 0.1
    assert 2.5 * 0.8 < got["decode_speedup"] < 2.5 * 1.25 and 2 * 0.8 < got["prefill_speedup"] < 2.5
    assert (got["speed_context"], got["speed_batch"], got["speed_repeats"]) == (32, 3, 5)
    same = speed.measure(base, _Fake("base", clock, prefill_s=0.002, step_s=0.05), prompts, st)
    assert same["decode_speedup"] == pytest.approx(2.0, rel=0.3)  # one name, two contenders
    with pytest.raises(ValueError, match="speed context"):
        speed.prompts_from(torch.arange(10), st)
