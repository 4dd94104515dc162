"""``torch.ops.turbo.float_decode_attention`` — the float baseline's decode over the slotted float
cache — against exact attention in float64 per sequence: slots out of order, ragged held
ranges (a sliding window that binds and one that does not), GQA 1/3/8, head_dim 64 and an odd
one, one and several new tokens, histories longer than one split of rows."""

import pytest
import torch
from turbo_kernels import cpu_ops

from turbo_core.attention.packed import visible
from turbo_core.testing import assert_close


def exact(q, k, v, lo, hi, window):
    """float64 softmax attention of one sequence: ``q (H_q, L_q, D)`` over rows ``[lo, hi)``."""
    lq, group = q.shape[1], q.shape[0] // k.shape[0]
    rows = torch.arange(lo, hi)
    allowed = visible(rows, torch.arange(hi - lq, hi), window)  # (L_q, rows)
    kk = k[:, lo:hi].double().repeat_interleave(group, 0)
    vv = v[:, lo:hi].double().repeat_interleave(group, 0)
    s = q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1) @ vv


@pytest.fixture(autouse=True)
def _ops():
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("d", [64, 36])
@pytest.mark.parametrize("new", [1, 5])
@pytest.mark.parametrize("window", [None, 100, 5000])
def test_matches_exact_attention(group, d, new, window):
    gen = torch.Generator().manual_seed(group * 100 + d + new)
    slots_cap, hkv, rows = 5, 3, 2400
    k, v = (torch.randn(slots_cap, hkv, rows, d, generator=gen) for _ in range(2))
    slots = torch.tensor([3, 0, 4])  # out of order, slot 1 and 2 unused
    lo = torch.tensor([0, 17, 300])  # sequence 1 and 2 start past row 0 (rows moved / dropped)
    hi = torch.tensor([2300, 17 + new, 1500])  # 2300: three splits of 1024 rows
    q = torch.randn(3, hkv * group, new, d, generator=gen)
    out = cpu_ops.float_decode_attention(q, k, v, slots, lo, hi, window=window)
    for b in range(3):
        s = int(slots[b])
        ref = exact(q[b], k[s], v[s], int(lo[b]), int(hi[b]), window)
        assert_close(ref.float(), out[b], atol=2e-5)


def test_refuses_what_it_cannot_read():
    k = torch.zeros(2, 1, 16, 8)
    q = torch.zeros(1, 1, 1, 8)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="outside the cache's 2 slots"):
        cpu_ops.float_decode_attention(q, k, k, torch.tensor([2]), one, torch.tensor([4]))
    with pytest.raises(RuntimeError, match="it must hold its 1 new tokens"):
        cpu_ops.float_decode_attention(q, k, k, one, one, one)
    with pytest.raises(RuntimeError, match="inside the cache's 16 rows"):
        cpu_ops.float_decode_attention(q, k, k, one, one, torch.tensor([17]))
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        cpu_ops.float_decode_attention(q.double(), k, k, one, one, torch.tensor([4]))
