"""Head priority scores, INT2 head selection, and the bit-plan document."""

import json

import numpy as np
import pytest
import torch

from turbo_core.attention.config import KVQuantConfig, Scope
from turbo_core.attention.head_priority import (
    combined_priority,
    head_priority,
    int2_count,
    make_plan,
    select_int2,
)
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.plan import BitPlan, ModelShape
from turbo_core.attention.reference import attention_exact, decode_attention_reference
from turbo_core.testing import sqnr_db

SHAPE = ModelShape(name="tiny", num_layers=3, num_kv_heads=4, head_dim=64)


def activations(seed, layers=3, heads=4, tokens=128, d=64, outlier_heads=()):
    """Per-layer (H, T, D) activations; listed (layer, head) pairs get outlier channels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        x = torch.randn(heads, tokens, d, generator=gen)
        for li, h in outlier_heads:
            if li == layer:
                x[h, :, :3] = x[h, :, :3] * 8.0 + 10.0
        out.append(x)
    return out


def test_priority_matches_the_formula():
    x = torch.randn(2, 50, 16, generator=torch.Generator().manual_seed(0))
    got = head_priority(x)
    xn = x.double().numpy()
    r = xn.max(axis=1) - xn.min(axis=1)  # (H, C)
    expect = (r.max(axis=1) - r.min(axis=1)) * r.std(axis=1)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12)


def test_outlier_heads_rank_highest():
    acts = activations(1, outlier_heads=[(0, 2), (2, 1)])
    kp = torch.stack([head_priority(a) for a in acts])
    top2 = set(torch.topk(kp.flatten(), 2).indices.tolist())
    assert top2 == {0 * 4 + 2, 2 * 4 + 1}


@pytest.mark.parametrize("scope", list(Scope))
def test_selection_counts(scope):
    prio = torch.rand(5, 4, generator=torch.Generator().manual_seed(2))
    mask = select_int2(prio, 7, scope, seed=3)
    assert int(mask.sum()) == 7
    if scope is Scope.GLOBAL:
        assert prio[mask].max() <= prio[~mask].min()
    if scope is Scope.PER_LAYER:
        assert mask.sum(dim=1).tolist() == [2, 2, 1, 1, 1]
        for layer in range(5):
            if mask[layer].any() and (~mask[layer]).any():
                assert prio[layer][mask[layer]].max() <= prio[layer][~mask[layer]].min()
    assert torch.equal(mask, select_int2(prio, 7, scope, seed=3))  # deterministic


def test_priority_choice_beats_random_choice():
    """Improvement test: INT2 on the low-priority heads keeps more attention SQNR than
    INT2 on randomly chosen heads (averaged over draws)."""
    outlier = [(0, 0), (0, 3), (1, 1), (2, 2), (2, 0), (1, 3)]
    keys = activations(4, outlier_heads=outlier)
    values = activations(5)
    plan = make_plan(SHAPE, keys, values, int2_fraction=0.5, scope="global")
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 4, 64, generator=gen)

    def quality(bits_grid):
        total = 0.0
        for layer, bits in enumerate(bits_grid):
            cache = QuantizedKVLayer(bits, head_dim=64, cfg=KVQuantConfig())
            k, v = keys[layer].unsqueeze(0), values[layer].unsqueeze(0)
            cache.append(k, v)
            exact = attention_exact(q, k, v, causal=True)
            total += sqnr_db(exact, decode_attention_reference(q, cache.view()).out)
        return total / len(bits_grid)

    chosen = quality(plan.bits_grid())
    randoms = [
        quality(make_plan(SHAPE, keys, values, int2_fraction=0.5, scope="random",
                          seed=s).bits_grid())
        for s in range(4)
    ]
    assert chosen > max(randoms) - 0.5 and chosen > np.mean(randoms) + 1.0, (chosen, randoms)
    assert all(plan.layers[li].heads[h].bits == 4 for li, h in outlier)


def test_plan_round_trip_and_queries(tmp_path):
    plan = make_plan(SHAPE, activations(7), activations(8), int2_count_=5,
                     calibration={"tokens": 128, "data_hash": "abc"})
    assert plan.selection.int2_heads == 5 and plan.int2_fraction() == pytest.approx(5 / 12)
    path = plan.save(tmp_path / "plans" / "plan.json")
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temp files left
    loaded = BitPlan.load(path)
    assert loaded == plan
    doc = json.loads(path.read_text())
    assert doc["schema"] == "turbo-attention/bit-plan" and doc["version"] == 3
    assert doc["layout"] == {"rotate": False, "sinks": 0, "int2_k_group": None, "int2_v_group": None,
                             "k_channel_scale": False, "pre_rope": False}
    assert sum(b == 2 for row in loaded.bits_grid() for b in row) == 5
    loaded.check_compatible(SHAPE)


def _doc(tmp_path):
    plan = make_plan(SHAPE, activations(9), activations(10), int2_count_=2)
    return json.loads(plan.to_json())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["layers"].pop(), "lists 2 layers"),
        (lambda d: d["layers"][1]["heads"].pop(), "layer 1 lists 3 heads"),
        (lambda d: d["layers"][0]["heads"][0].update(bits=3), "bits"),
        (lambda d: d.update(schema="something-else"), "not a bit plan"),
        (lambda d: d.update(version=4), "unsupported bit plan version 4"),
        (lambda d: d["layout"].update(sinks=-1), "sinks"),
        (lambda d: d["selection"].update(int2_heads=9), "says 9 INT2 heads"),
        (lambda d: d["layers"][0].update(layer=1), "must be in order"),
        (lambda d: d.update(extra_field=1), "extra_field"),
        (lambda d: d["model"].update(num_layers=0), "num_layers"),
    ],
)
def test_invalid_plans_are_refused_with_the_reason(tmp_path, mutate, message):
    doc = _doc(tmp_path)
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        BitPlan.load(path)


def test_plan_for_another_model_is_refused(tmp_path):
    plan = make_plan(SHAPE, activations(11), activations(12), int2_count_=2)
    other = ModelShape(name="tiny", num_layers=3, num_kv_heads=4, head_dim=128)
    with pytest.raises(ValueError, match="bit plan is for model 'tiny'"):
        plan.check_compatible(other)
    with pytest.raises(ValueError, match="not for 'SmolLM2'"):
        plan.check_compatible(ModelShape(name="SmolLM2", num_layers=3, num_kv_heads=4, head_dim=64))


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        BitPlan.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BitPlan.load(tmp_path / "x.json")


def test_bad_selection_input():
    with pytest.raises(ValueError, match="exactly one"):
        int2_count(10, count=2, fraction=0.5)
    with pytest.raises(ValueError, match="outside"):
        int2_count(10, count=11, fraction=None)
    with pytest.raises(ValueError, match="outside"):
        int2_count(10, count=None, fraction=1.5)
    with pytest.raises(ValueError, match="cannot put 5 of 4"):
        select_int2(torch.rand(2, 2), 5, "per_layer")
    with pytest.raises(ValueError, match=r"cover 2 layers"):
        make_plan(SHAPE, activations(1, layers=2), activations(2, layers=2), int2_count_=1)
    with pytest.raises(ValueError, match="expected"):
        make_plan(SHAPE, activations(1, heads=3), activations(2, heads=3), int2_count_=1)
    with pytest.raises(ValueError, match="source"):
        make_plan(SHAPE, activations(1), activations(2), int2_count_=1, source="query")
    with pytest.raises(ValueError, match=r"\(H, T, C\)"):
        head_priority(torch.randn(4, 4))
    kp = torch.tensor([[1.0, 3.0]])
    assert torch.allclose(combined_priority(kp, kp * 10), torch.tensor([[1.0, 3.0]]))
