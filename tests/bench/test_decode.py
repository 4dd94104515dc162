"""`turbo bench decode`: every contender's step is a real decode step of its cache, and the
rows carry what the report needs. (Speed itself is the benchmark's output, not a test.)"""

import torch

from turbo_core.attention.config import TURBO_DEFAULT
from turbo_core.attention.reference import attention_exact, decode_attention_reference
from turbo_core.bench import decode
from turbo_core.testing import assert_close, assert_cosine


def test_each_contender_attends_over_its_whole_cache():
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 200, 64, generator=gen), torch.randn(2, 3, 200, 64, generator=gen)
    q, nk, nv = (torch.randn(2, s, 1, 64, generator=gen) for s in (9, 3, 3))
    full_k, full_v = torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2)
    exact = attention_exact(q, full_k, full_v)
    step, kv_bytes, backend = decode._sdpa(k, v, q, nk, nv, extra=3)
    assert backend == "sdpa" and kv_bytes == 2 * k.numel() * 4
    assert_close(exact, step(), atol=1e-5)
    step, kv_bytes, backend = decode._turbo([4, 2, 4], k, v, q, nk, nv)
    assert backend == "cpu" and 0 < kv_bytes < 2 * k.numel() * 4 / 4  # ≥ 4x under float32
    out = step()
    cache = decode.QuantizedKVLayer([4, 2, 4], 64, decode.KVQuantConfig())
    cache.append(k, v)
    cache.append(nk, nv, compress=False)
    assert_close(decode_attention_reference(q, cache.view(), math_cfg=TURBO_DEFAULT).out, out, atol=6e-3)
    step, kv_bytes, backend = decode._quanto(k, v, q, nk, nv)
    assert_cosine(exact, step(), at_least=0.99)


def test_rows_and_table(monkeypatch):
    monkeypatch.setattr(decode, "QUICK", {"shapes": ["smollm2"], "batches": [2], "contexts": [128],
                                          "prefill": [600]})
    doc = decode.run(quick=True, repeats=1, device="cpu", log=lambda m: None)
    rows = doc["results"]
    assert [r["contender"] for r in rows] == ["sdpa", "turbo-int4", "turbo-mix", "quanto-int4"]
    sdpa = rows[0]["median_ms"]
    for r in rows:
        assert r["ratio_vs_sdpa"] == sdpa / r["median_ms"] and r["limit_ms"] > 0
    assert rows[2]["kv_bytes"] < rows[1]["kv_bytes"] < rows[0]["kv_bytes"]  # mix < int4 < float
    assert doc["copy_bandwidth_gb_s"] > 0.5 and doc["device"]["type"] == "cpu"
    assert "turbo-mix" in decode.table(doc)
    # the cache write and the prefill rows: every contender, the float engine as the base
    assert {r["contender"] for r in doc["append"]} == {"sdpa-fp32", "turbo-int4", "turbo-mix",
                                                       "turbo-int4-pytorch"}
    assert all(r["median_us_per_step"] > 0 and r["batch"] == 2 for r in doc["append"])
    prefill = {r["contender"]: r for r in doc["prefill"]}
    assert set(prefill) == {"sdpa-fp32", "turbo-int4", "turbo-mix"}
    assert prefill["sdpa-fp32"]["ratio_vs_sdpa"] == 1.0 and prefill["turbo-int4"]["prompt"] == 600
    assert "Prefill through one layer" in decode.table(doc) and "Cache write" in decode.table(doc)
