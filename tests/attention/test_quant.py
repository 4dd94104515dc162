"""INT8 / INT4 / INT2 quantization bounds and exact bit packing."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turbo_core.attention import quant


def _tensor(seed: int, shape, scale=1.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(1, 150),
    dim=st.sampled_from([1, 7, 64]),
    block=st.sampled_from([1, 16, 64]),
    scale=st.floats(1e-3, 1e3),
    qmax=st.sampled_from([119, 127]),
)
def test_int8_error_within_half_a_step(seed, length, dim, block, scale, qmax):
    x = _tensor(seed, (2, 3, length, dim), scale)
    q = quant.quantize_int8_blockwise(x, block_size=block, qmax=qmax)
    assert q.values.dtype == torch.int8 and q.scale.shape == (2, 3, length)
    assert int(q.values.abs().max()) <= qmax
    err = (x - q.dequantize()).abs()
    bound = q.scale.unsqueeze(-1) * (0.5 + 1e-5)
    assert bool((err <= bound).all()), f"max err/step {float((err / q.scale.unsqueeze(-1)).max())}"
    # one scale per block: rows of a block share it, and it is max|x_block| / qmax
    blocks = torch.arange(length) // block
    for b in blocks.unique():
        rows = blocks == b
        s = q.scale[..., rows]
        assert torch.equal(s, s[..., :1].expand_as(s))
        expected = x[..., rows, :].abs().amax(dim=(-1, -2)) / qmax
        torch.testing.assert_close(s[..., 0], expected, rtol=1e-6, atol=0)


def test_int8_all_zero_block_is_exact_and_finite():
    x = torch.zeros(1, 1, 8, 4)
    q = quant.quantize_int8_blockwise(x, block_size=4)
    assert torch.equal(q.dequantize(), x) and bool(torch.isfinite(q.scale).all())


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([2, 4]),
    group=st.sampled_from([4, 16, 32, 64]),
    n_groups=st.integers(1, 3),
    axis=st.sampled_from([-1, -2]),
    protect=st.sampled_from([119, 127]),
)
def test_lowbit_error_within_half_integer_scale(seed, bits, group, n_groups, axis, protect):
    gen = torch.Generator().manual_seed(seed)
    shape = [2, 3, group * n_groups, 8] if axis == -2 else [2, 3, 8, group * n_groups]
    q8 = torch.randint(-protect, protect + 1, shape, generator=gen).to(torch.int8)
    lb = quant.quantize_lowbit(q8, bits, dim=axis, group=group)
    assert int(lb.codes.max()) <= (1 << bits) - 1
    assert lb.scale.dtype == torch.uint8 and int(lb.scale.min()) >= 1
    back = quant.dequantize_lowbit(lb)
    assert back.dtype == torch.int8
    # |q8 - q8'| <= S/2 for the group's integer scale S (saturation only moves toward q8)
    s = lb.scale.repeat_interleave(group, dim=axis).to(torch.int32)
    err = (back.to(torch.int32) - q8.to(torch.int32)).abs()
    assert bool((2 * err <= s).all())


@pytest.mark.parametrize(("bits", "limit"), [(4, 127), (2, 121)])
def test_protective_range_keeps_lowbit_inside_int8_without_saturation(bits, limit):
    gen = torch.Generator().manual_seed(1)
    q8 = torch.randint(-119, 120, (512, 4096), generator=gen).to(torch.int8)
    q8[:, 0], q8[:, 1] = -119, 119  # widest groups
    # groups with a range just above a multiple of the levels overshoot the most
    levels = (1 << bits) - 1
    for i, r in enumerate(range(levels + 1, 239, levels)):
        q8[i, 64:128] = torch.linspace(119 - r, 119, 64).round().to(torch.int8)
    lb = quant.quantize_lowbit(q8, bits, dim=-1, group=64)
    raw = quant.dequantize_lowbit(lb, saturate=False)
    assert int(raw.abs().max()) <= limit


def test_saturation_guards_inputs_outside_the_protective_range():
    q8 = torch.tensor([[-127, 127, 60, 127]], dtype=torch.int8)
    lb = quant.quantize_lowbit(q8, 2, dim=-1, group=4)
    assert int(quant.dequantize_lowbit(lb, saturate=False).max()) > 127
    assert int(quant.dequantize_lowbit(lb).max()) == 127


def test_exact_integer_values_round_trip():
    # a group spanning exactly levels * S is reconstructed without error
    q8 = torch.tensor([[-30, -15, 0, 15]], dtype=torch.int8)
    lb = quant.quantize_lowbit(q8, 2, dim=-1, group=4)
    assert torch.equal(quant.dequantize_lowbit(lb), q8)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 40))
def test_pack_unpack_exact(seed, bits, n):
    per = 8 // bits
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (3, 5, n * per), generator=gen).to(torch.uint8)
    packed = quant.pack(codes, bits)
    assert packed.shape == (3, 5, n * per * bits // 8)  # bits/8 bytes per value
    assert torch.equal(quant.unpack(packed, bits), codes)


def test_pack_layout_is_planar():
    codes = torch.tensor([1, 2, 3, 0, 3, 2, 1, 0], dtype=torch.uint8)
    # 2 bits: byte j holds codes j, j+2, j+4, j+6 from the low bits up
    assert quant.pack(codes, 2).tolist() == [1 | 3 << 2 | 3 << 4 | 1 << 6, 2 | 0 << 2 | 2 << 4 | 0 << 6]
    assert quant.pack(codes, 4).tolist() == [1 | 3 << 4, 2 | 2 << 4, 3 | 1 << 4, 0 | 0 << 4]


def test_bad_input():
    with pytest.raises(ValueError, match="unsupported KV bits 3"):
        quant.pack(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="exceed 4 bits"):
        quant.pack(torch.full((8,), 16, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack(torch.zeros(6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="2 or 4 bits"):
        quant.quantize_lowbit(torch.zeros(4, dtype=torch.int8), 3, dim=-1, group=4)
    with pytest.raises(ValueError, match="int8"):
        quant.quantize_lowbit(torch.zeros(4), 4, dim=-1, group=4)
    with pytest.raises(ValueError, match="must divide"):
        quant.quantize_lowbit(torch.zeros(6, dtype=torch.int8), 4, dim=-1, group=4)
    with pytest.raises(ValueError, match=r"\(\.\.\., L, D\)"):
        quant.quantize_int8_blockwise(torch.zeros(5))
    with pytest.raises(ValueError, match="float"):
        quant.quantize_int8_blockwise(torch.zeros(2, 2, dtype=torch.int32))
