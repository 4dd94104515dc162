"""The calibrated low-rank K/V cache lever (``KVQuantConfig.low_rank``): the store keeps the
``r`` coordinates of K and V in per-head SVD bases and gives back their reconstruction, with
the bytes of an ``r``-channel store; the bases are what SVD says; bad bases are refused."""

import pytest
import torch

from turbo_core.attention.config import KVQuantConfig
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.variants import get_variant
from turbo_core.hf import calibrate, data, evaluate, lowrank, models
from turbo_core.hf.lowrank import top_directions

from ..small import EVAL


def _kv(seed, heads=2, dim=64, tokens=150, rank=None):
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        return (torch.randn(1, heads, tokens, dim, generator=gen) for _ in range(2))
    span = torch.linalg.qr(torch.randn(heads, dim, rank, generator=gen, dtype=torch.float64))[0].float()
    return ((torch.randn(1, heads, tokens, rank, generator=gen) @ span.transpose(-1, -2)[None])
            for _ in range(2))


def test_top_directions_span_the_data():
    k, _ = _kv(0, rank=12)
    u, kept = top_directions(k[0], 12)
    assert u.shape == (2, 64, 12)
    torch.testing.assert_close(u.transpose(-1, -2) @ u, torch.eye(12).expand(2, -1, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(kept, torch.ones(2), atol=1e-6, rtol=0)  # rank-12 data: all kept
    torch.testing.assert_close(k[0] @ u @ u.transpose(-1, -2), k[0], atol=1e-4, rtol=0)
    _, half = top_directions(torch.randn(2, 500, 64), 32)
    assert bool((half > 0.5).all() and (half < 0.7).all())  # isotropic data: ~r/D and a bit more


@pytest.mark.parametrize("bits", [[4, 4], [2, 8]])
def test_store_holds_coordinates_and_reconstructs(bits):
    k, v = _kv(1)
    uk, _ = top_directions(k[0], 24)
    uv, _ = top_directions(v[0], 24)
    low = QuantizedKVLayer(bits, 64, KVQuantConfig(low_rank=24), basis=(uk, uv))
    low.append(k, v)
    # the same as a 24-channel store fed the coordinates, reconstructed by hand
    narrow = QuantizedKVLayer(bits, 24, KVQuantConfig())
    narrow.append(k @ uk[None], v @ uv[None])
    nk, nv = narrow.keys_values(0)
    lk, lv = low.keys_values(0)
    assert lk.shape == (2, 150, 64)
    torch.testing.assert_close(lk, nk @ uk.transpose(-1, -2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lv, nv @ uv.transpose(-1, -2), rtol=1e-6, atol=1e-6)
    assert low.nbytes() == narrow.nbytes()
    full = QuantizedKVLayer(bits, 64, KVQuantConfig())
    full.append(k, v)
    assert low.nbytes() < 0.5 * full.nbytes()


def test_bad_bases_are_refused_by_name():
    u = torch.linalg.qr(torch.randn(2, 64, 16))[0]
    with pytest.raises(ValueError, match="needs the calibrated bases"):
        QuantizedKVLayer([4, 4], 64, KVQuantConfig(low_rank=16))
    with pytest.raises(ValueError, match=r"expected \(2, 64, 16\)"):
        QuantizedKVLayer([4, 4], 64, KVQuantConfig(low_rank=16), basis=(u[:, :32], u))
    with pytest.raises(ValueError, match="orthonormal"):
        QuantizedKVLayer([4, 4], 64, KVQuantConfig(low_rank=16), basis=(u * 2, u))
    with pytest.raises(ValueError, match="low_rank is not set"):
        QuantizedKVLayer([4, 4], 64, KVQuantConfig(), basis=(u, u))
    with pytest.raises(ValueError, match="exceeds head_dim"):
        QuantizedKVLayer([4, 4], 8, KVQuantConfig(low_rank=16))
    with pytest.raises(ValueError, match="not with rotate or pre_rope"):
        KVQuantConfig(low_rank=16, rotate=True)


@pytest.mark.slow  # two evaluations of the tiny model (~35 s)
def test_evaluate_runs_the_lever_end_to_end_on_a_model(tiny_dir):
    lm = models.load(tiny_dir)
    split = data.load_split()
    base = get_variant("turbo-int4")
    variant = base.with_overrides(kv=KVQuantConfig(low_rank=lm.shape.head_dim // 2))
    plan = calibrate.calibrate(lm, variant, max_tokens=256, progress=False)
    bases, report = lowrank.calibrate_bases(lm, lm.shape.head_dim // 2, max_tokens=256, progress=False)
    assert len(report["energy_kept_k"]) == lm.shape.num_layers and 0 < report["energy_kept_k_min"] <= 1
    low = evaluate.evaluate(lm, variant, split, plan=plan.with_bases(bases), settings=EVAL, progress=False)
    full = evaluate.evaluate(lm, base, split, settings=EVAL, progress=False)
    assert low["kv_bytes_per_token"] < 0.6 * full["kv_bytes_per_token"]
    assert low["ppl_variant"] > 0 and low["kl_mean"] >= 0 and low["retrieval_accuracy"] is not None
    with pytest.raises(ValueError, match="needs the calibrated bases"):
        evaluate.evaluate(lm, variant, split, plan=plan, settings=EVAL, progress=False)
