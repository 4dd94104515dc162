"""The INT8 quantize kernel against turbo_core.attention.quant (bit-exact)."""

import pytest
import torch

from turbo_core.attention import quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(2, 3, 100, 64), (1, 2, 64, 96), (1, 1, 5, 17)])
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("qmax", [119, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_kernel_is_bit_exact(shape, block, qmax, dtype):
    from turbo_kernels.quantize import quantize_int8_blockwise

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    # real ties: the first block's largest value is qmax, so its scale is exactly 1 and 2.5 and
    # -3.5 sit exactly halfway between two codes (round half to even: 2 and -4)
    x[..., 0, :3] = torch.tensor([2.5, float(qmax), -3.5], dtype=dtype)
    x = x.to(DEVICE)
    got = quantize_int8_blockwise(x, block, qmax)
    ref = quant.quantize_int8_blockwise(x, block, qmax)
    assert bool((ref.scale[..., 0] == 1.0).all())
    ties = ref.values[..., 0, :3].reshape(-1, 3).cpu()
    assert torch.equal(ties, torch.tensor([[2, qmax, -4]], dtype=torch.int8).expand_as(ties))
    assert torch.equal(got.scale.cpu(), ref.scale.cpu())
    assert torch.equal(got.values.cpu(), ref.values.cpu())


def test_non_contiguous_input_and_bad_input():
    from turbo_kernels.quantize import quantize_int8_blockwise

    x = torch.randn(2, 64, 3, 32, device=DEVICE).transpose(1, 2)  # (2, 3, 64, 32), strided
    got = quantize_int8_blockwise(x, 32)
    ref = quant.quantize_int8_blockwise(x.contiguous(), 32)
    assert torch.equal(got.values.cpu(), ref.values.cpu())
    with pytest.raises(ValueError, match="power-of-two"):
        quantize_int8_blockwise(x, 48)
    with pytest.raises(ValueError, match="float"):
        quantize_int8_blockwise(x.to(torch.int32), 32)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("along_tokens", "group"), [(True, 64), (True, 16), (False, 64), (False, 32)])
def test_compress_chunk_is_bit_exact(bits, along_tokens, group):
    from turbo_kernels.quantize import compress_chunk

    gen = torch.Generator().manual_seed(bits + group)
    q8 = torch.randint(-119, 120, (2, 3, 64, 64), generator=gen).to(torch.int8)
    packed, scale, low = compress_chunk(q8.to(DEVICE), bits, group, along_tokens)
    ref = quant.quantize_lowbit(q8, bits, dim=-1 if along_tokens else -2, group=group)
    assert torch.equal(scale.cpu(), ref.scale) and torch.equal(low.cpu(), ref.low)
    assert torch.equal(packed.cpu(), quant.pack(ref.codes, bits))


def test_compress_chunk_bad_input():
    from turbo_kernels.quantize import compress_chunk

    with pytest.raises(ValueError, match="power-of-two head_dim"):
        compress_chunk(torch.zeros(1, 1, 96, 64, dtype=torch.int8, device=DEVICE), 4, 64, True)
    with pytest.raises(ValueError, match="2 or 4 bits"):
        compress_chunk(torch.zeros(1, 1, 64, 64, dtype=torch.int8, device=DEVICE), 8, 64, True)
