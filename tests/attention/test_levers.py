"""The packed cache's accuracy levers (rotation, attention sinks, INT2 group sizes): each one
raises the SQNR of attention outputs against exact attention on data with the outliers it is
meant for (torchao-style improvement tests), rotation is exact without quantization, and the
bytes, the reservations and the bit plans account for them."""

import pytest
import torch

from turbo_core.attention.config import EXACT, TURBO_DEFAULT, KVQuantConfig
from turbo_core.attention.functional import BACKEND_ENV, turbo_attention
from turbo_core.attention.kvcache import QuantizedKVLayer
from turbo_core.attention.plan import BitPlan, ModelShape, build_plan
from turbo_core.attention.reference import attention_exact
from turbo_core.attention.rotation import rotate, rotation, unrotate
from turbo_core.hf.cache import TurboCache
from turbo_core.testing import assert_close, sqnr_db

B, H, G, D = 2, 3, 3, 64


def outlier_kv(length=320, seed=0):
    """K with two outlier channels (one scaled, one offset, as LLM keys have), V with one."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, length, D, generator=gen) for _ in range(2))
    k[..., 5] *= 20
    k[..., 17] += 8
    v[..., 3] *= 10
    return k, v


def sqnr_over_cache(cfg, bits, k, v, q, backend, monkeypatch, math_cfg=EXACT):
    monkeypatch.setenv(BACKEND_ENV, backend)
    store = QuantizedKVLayer([bits] * H, D, cfg)
    store.append(k, v)
    out = turbo_attention(q, None, None, kv_store=store, math_cfg=math_cfg).out
    return sqnr_db(attention_exact(q, k, v), out)


def queries(seed=1, lq=1):
    return torch.randn(B, H * G, lq, D, generator=torch.Generator().manual_seed(seed))


def test_rotation_is_orthogonal_and_exact_without_quantization():
    r = rotation(D)
    assert_close(torch.eye(D), r @ r.t(), atol=1e-6)
    assert set(torch.unique((r * D ** 0.5).round()).tolist()) == {-1.0, 1.0}  # a signed Hadamard
    k, v = outlier_kv(100)
    q = queries(lq=5)
    exact = attention_exact(q, k, v, causal=True)
    rotated = unrotate(attention_exact(rotate(q), rotate(k), rotate(v), causal=True))
    assert_close(exact, rotated, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        rotation(96)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize(("bits", "gain_db"), [(8, 6.0), (4, 3.0), (2, 0.8)])
def test_rotation_raises_sqnr_on_outlier_channels(bits, gain_db, backend, monkeypatch):
    k, v = outlier_kv()
    q = queries()
    plain = sqnr_over_cache(KVQuantConfig(), bits, k, v, q, backend, monkeypatch)
    rotated = sqnr_over_cache(KVQuantConfig(rotate=True), bits, k, v, q, backend, monkeypatch)
    assert rotated >= plain + gain_db, (plain, rotated)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_rotated_cache_serves_turbo_math_and_several_new_tokens(backend, monkeypatch):
    k, v = outlier_kv(200)
    q = queries(lq=4)
    monkeypatch.setenv(BACKEND_ENV, backend)
    outs = {}
    for rot in (False, True):
        store = QuantizedKVLayer([4] * H, D, KVQuantConfig(rotate=rot))
        store.append(k[:, :, :196], v[:, :, :196])
        store.append(k[:, :, 196:], v[:, :, 196:], compress=False)
        outs[rot] = turbo_attention(q, None, None, kv_store=store, math_cfg=TURBO_DEFAULT).out
    exact = attention_exact(q, k, v, causal=True)
    assert sqnr_db(exact, outs[True]) >= sqnr_db(exact, outs[False]) + 3.0


def sink_kv(length=256, seed=2):
    """An attention sink: token 0's key lines up with every query (it takes most of the weight)
    and its value is large, so its quantization error dominates the output."""
    gen = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, H, length, D, generator=gen) for _ in range(2))
    q = queries(seed=3)
    k[:, :, 0] = 3.0 * q.reshape(B, H, G, D).mean(2) / q.reshape(B, H, G, D).mean(2).norm(dim=-1,
                                                                                        keepdim=True)
    v[:, :, 0] = 6.0 * torch.randn(B, H, D, generator=gen)
    return k, v, q


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("bits", [4, 2])
def test_sinks_raise_sqnr_when_the_first_token_takes_the_weight(bits, backend, monkeypatch):
    k, v, q = sink_kv()
    plain = sqnr_over_cache(KVQuantConfig(), bits, k, v, q, backend, monkeypatch)
    sinks = sqnr_over_cache(KVQuantConfig(sinks=4), bits, k, v, q, backend, monkeypatch)
    assert sinks >= plain + 3.0, (plain, sinks)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_smaller_int2_groups_raise_sqnr_and_cost_their_scale_bytes(backend, monkeypatch):
    k, v = outlier_kv()
    q = queries()
    plain = sqnr_over_cache(KVQuantConfig(), 2, k, v, q, backend, monkeypatch)
    fine = KVQuantConfig(int2_k_group=16, int2_v_group=16)
    grouped = sqnr_over_cache(fine, 2, k, v, q, backend, monkeypatch)
    assert grouped >= plain + 1.0, (plain, grouped)
    # INT4 heads keep groups of 64: the finer groups touch only INT2 pages
    sizes = {}
    for cfg in (KVQuantConfig(), fine):
        store = QuantizedKVLayer([2, 4], D, cfg)
        store.append(*(torch.zeros(1, 2, 64, D) for _ in range(2)))
        sizes[cfg.int2_k_group] = store.nbytes()
    # per INT2 head and page, K has D x (64/16 - 64/64) more (scale, offset) byte pairs and
    # V (D/16 - D/64) x 64 more
    assert sizes[16] - sizes[None] == 2 * (D * (4 - 1) + (D // 16 - D // 64) * 64)


def test_sinks_stay_at_int8_and_reservations_cover_them():
    cfg = KVQuantConfig(sinks=16)
    store = QuantizedKVLayer([4, 2], D, cfg)
    gen = torch.Generator().manual_seed(4)
    for step, n in enumerate([5, 6, 70, 1, 1, 200]):  # below, at and past the sinks
        k, v = (torch.randn(1, 2, n, D, generator=gen) for _ in range(2))
        store.append(k, v)
        held = store.seq_lens()[0]
        view = store.view()
        sinks = min(held, 16)
        assert int(view.buffer_len[0]) == sinks + (held - sinks) % 64, step
        assert int(view.n_chunks[0]) == (held - sinks) // 64
        assert store.bytes_for(held) >= store.nbytes(), (held, store.bytes_for(held), store.nbytes())
    # the sinks are the sequence's first tokens, stored once at INT8 with per-token scales
    first = store.view().buffer_k
    again = QuantizedKVLayer([4, 2], D, cfg)
    gen = torch.Generator().manual_seed(4)
    k, v = (torch.randn(1, 2, 5, D, generator=gen) for _ in range(2))
    again.append(k, v)
    assert torch.equal(first.values[0, :, :5], again.view().buffer_k.values[0, :, :5])


def test_lever_settings_are_validated():
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        QuantizedKVLayer([4], 96, KVQuantConfig(rotate=True, v_group=32))
    with pytest.raises(ValueError, match="int2_k_group"):
        KVQuantConfig(int2_k_group=48)
    with pytest.raises(ValueError, match="sinks"):
        KVQuantConfig(sinks=-1)
    with pytest.raises(ValueError, match="int2_v_group"):
        QuantizedKVLayer([2], 64, KVQuantConfig(int2_v_group=48))


SHAPE = ModelShape(name="tiny", num_layers=2, num_kv_heads=3, head_dim=64)


def plan(layout=None):
    return build_plan(SHAPE, [[1.0, 2.0, 3.0]] * 2, [[True, False, False]] * 2, scope="global",
                      layout=layout)


def test_plans_record_their_layout_and_refuse_another():
    rotated = KVQuantConfig(rotate=True, sinks=16)
    p = BitPlan.parse(__import__("json").loads(plan(rotated.levers()).to_json()))
    assert p.version == 3 and p.layout.rotate and p.layout.sinks == 16
    TurboCache(SHAPE, p, rotated)  # the layout it was made for
    with pytest.raises(ValueError, match=r"rotate=True \(cache: False\).*sinks=16 \(cache: 0\)"):
        TurboCache(SHAPE, p, KVQuantConfig())


def test_older_plans_load_with_the_levers_they_lacked_off_and_unknown_versions_are_refused():
    doc = __import__("json").loads(plan().to_json())
    v1 = {k: val for k, val in doc.items() if k != "layout"} | {"version": 1}
    new_levers = ("k_channel_scale", "pre_rope")
    v2 = doc | {"version": 2, "layout": {k: val for k, val in doc["layout"].items()
                                         if k not in new_levers}}
    assert BitPlan.parse(v2).layout == BitPlan.parse(doc).layout
    with pytest.raises(ValueError, match="version 2 bit plan has no k_channel_scale, pre_rope in its layout"):
        BitPlan.parse(v2 | {"layout": doc["layout"]})
    old = BitPlan.parse(v1)
    assert old.version == 3 and old.layout.differences(KVQuantConfig().levers()) == []
    TurboCache(SHAPE, old, KVQuantConfig())
    with pytest.raises(ValueError, match="rotate=False"):
        TurboCache(SHAPE, old, KVQuantConfig(rotate=True))
    with pytest.raises(ValueError, match="version 1 bit plan has no 'layout'"):
        BitPlan.parse(v1 | {"layout": doc["layout"]})
    with pytest.raises(ValueError, match="unsupported bit plan version 4; this code reads versions 1, 2, 3"):
        BitPlan.parse(doc | {"version": 4})

