"""``torch.ops.turbo.linear`` — a decode step's linear layers, the weights streamed once —
against ``x W^T + b`` in float64: row counts on both sides of the 16-row limit, widths that are
not multiples of the 4-row micro-tile (N) or of the 8 lanes (K), with and without a bias, 3-D
and non-contiguous inputs. Each row's result does not depend on the batch it came in; above
16 rows, and for other dtypes, the op is ``F.linear`` exactly. ``StepLinear`` switches a
model's layers and keeps autograd on ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F
from turbo_kernels import cpu_ops

from turbo_core.hf.step import StepLinear, use_step_linears
from turbo_core.testing import assert_close


@pytest.fixture(autouse=True)
def _ops():
    assert cpu_ops.load(), "the C++ ops are not built: python -m turbo_kernels.cpu_ops"


def exact(x, w, b):
    y = x.double() @ w.double().T
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 7, 8, 16])
@pytest.mark.parametrize("n_out, k_in", [(192, 576), (5, 9), (7, 1), (1030, 1543)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_exact_linear(rows, n_out, k_in, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + n_out + k_in)
    x = torch.randn(rows, k_in, generator=gen)
    w = torch.randn(n_out, k_in, generator=gen) / k_in**0.5
    b = torch.randn(n_out, generator=gen) if bias else None
    out = torch.ops.turbo.linear(x, w, b)
    assert out.shape == (rows, n_out) and out.dtype == torch.float32
    assert_close(exact(x, w, b).float(), out, atol=2e-5 * k_in**0.5, rtol=1e-5)


def test_leading_dims_and_strided_input():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 2, 100, generator=gen)[:, :, 0]  # (3, 4, 100), not contiguous
    w, b = torch.randn(37, 100, generator=gen), torch.randn(37, generator=gen)
    out = torch.ops.turbo.linear(x, w, b)
    assert out.shape == (3, 4, 37)
    assert_close(exact(x, w, b).float(), out, atol=1e-4)


def test_a_rows_result_does_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 576, generator=gen)
    w = torch.randn(1536, 576, generator=gen)
    together = torch.ops.turbo.linear(x, w, None)
    for i in (0, 5, 15):
        assert torch.equal(torch.ops.turbo.linear(x[i:i + 1], w, None)[0], together[i])
    assert torch.equal(torch.ops.turbo.linear(x[3:9], w, None), together[3:9])


@pytest.mark.parametrize("x", [torch.randn(17, 64), torch.randn(300, 64), torch.randn(2, 64).double(),
                               torch.randn(4, 64).bfloat16()], ids=["17rows", "300rows", "f64", "bf16"])
def test_elsewhere_it_is_f_linear_exactly(x):
    w, b = torch.randn(33, 64, dtype=x.dtype), torch.randn(33, dtype=x.dtype)
    assert torch.equal(torch.ops.turbo.linear(x, w, b), F.linear(x, w, b))


def test_step_linear_switches_plain_float_layers_and_keeps_autograd():
    class Subclass(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Subclass(8, 8), torch.nn.Linear(8, 4).double())
    assert use_step_linears(model) == 1
    assert [type(m) for m in model] == [StepLinear, Subclass, torch.nn.Linear]
    x = torch.randn(2, 8, requires_grad=True)
    model[0](x).sum().backward()  # F.linear under autograd
    assert_close(x.grad, model[0].weight.sum(0).expand(2, 8), atol=1e-6)
    with torch.no_grad():
        assert_close(model[0](x), F.linear(x, model[0].weight, model[0].bias), atol=1e-5)
