"""The INT8 quantize kernel against turbo_core.quant (bit-exact)."""

import pytest
import torch

from turbo_core import quant

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(2, 3, 100, 64), (1, 2, 64, 96), (1, 1, 5, 17)])
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("qmax", [119, 127])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_kernel_is_bit_exact(shape, block, qmax, dtype):
    from turbo_kernels.quantize import quantize_int8_blockwise

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype).to(DEVICE)
    x[..., 0, 0] = 0.5 * 127 / 127  # exercise ties at least once
    got = quantize_int8_blockwise(x, block, qmax)
    ref = quant.quantize_int8_blockwise(x, block, qmax)
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
