"""Training through TurboAttention: a few optimizer steps of ``TransformerBlock`` beside the same
block on ``nn.MultiheadAttention`` with the same weights give the same losses and gradients
(exact attention in training mode), dropout is applied there and unbiased, and the SAS exponent
has finite gradients under masks."""

import copy

import pytest
import torch
from torch import nn

from turbo_core.attention.config import SASConfig
from turbo_core.attention.modules import TransformerBlock, TurboAttention
from turbo_core.attention.sas import sas_exp
from turbo_core.testing import assert_close

E, H = 64, 4


class MHABlock(TransformerBlock):
    """The same block with ``nn.MultiheadAttention`` in place of TurboAttention."""

    def __init__(self, turbo: TransformerBlock):
        super().__init__(E, H, ff_dim=128)
        self.load_state_dict(copy.deepcopy(turbo.state_dict()), strict=False)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.attn.load_state_dict(turbo.attn.state_dict())  # same names and shapes


def batch(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, E, generator=gen)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[1, 9:] = True  # one sequence padded: a mask the attention must honour
    return x, torch.randn(3, 12, E, generator=gen), pad


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_few_training_steps_match_multihead_attention(optimizer):
    torch.manual_seed(0)
    turbo = TransformerBlock(E, H, ff_dim=128)  # default math: SAS + INT8 Q·Kᵀ at inference
    mha = MHABlock(turbo)
    opts = {}
    for name, block in (("turbo", turbo), ("mha", mha)):
        block.train()
        opts[name] = (torch.optim.SGD(block.parameters(), lr=0.05) if optimizer == "sgd"
                      else torch.optim.Adam(block.parameters(), lr=1e-3))
    for step in range(4):
        x, target, pad = batch(step)
        losses, grads = {}, {}
        for name, block in (("turbo", turbo), ("mha", mha)):
            opts[name].zero_grad()
            y = block(x, key_padding_mask=pad, is_causal=False)
            loss = nn.functional.mse_loss(y, target)
            loss.backward()
            losses[name] = loss.item()
            grads[name] = torch.cat([block.attn.in_proj_weight.grad.flatten(),
                                     block.attn.out_proj.weight.grad.flatten()])
            opts[name].step()
        assert bool(torch.isfinite(grads["turbo"]).all()), f"step {step}: non-finite gradient"
        assert losses["turbo"] == pytest.approx(losses["mha"], rel=1e-5), (step, losses)
        cos = nn.functional.cosine_similarity(grads["turbo"], grads["mha"], dim=0).item()
        assert cos > 0.9999, (step, cos)
    # and the weights stayed together: the last step's forward in eval mode is TurboAttention
    turbo.eval()
    mha.eval()
    x, _, _ = batch(9)
    with torch.no_grad():
        assert nn.functional.cosine_similarity(turbo(x).flatten(), mha(x).flatten(), dim=0) > 0.999


def test_dropout_is_applied_in_training_and_unbiased():
    torch.manual_seed(1)
    attn = TurboAttention(E, H, dropout=0.5, batch_first=True)
    x = torch.randn(2, 9, E, requires_grad=True)
    plain = TurboAttention(E, H, batch_first=True)
    plain.load_state_dict(attn.state_dict())
    plain.train()  # exact math, no dropout: what dropout must average to
    reference = plain(x, x, x, need_weights=False)[0].detach()
    attn.train()
    outs = torch.stack([attn(x, x, x, need_weights=False)[0].detach() for _ in range(600)])
    assert not torch.equal(outs[0], outs[1])  # a fresh mask every call
    assert (outs[0] - reference).abs().max() > 0.05  # and it changes the output
    # inverted dropout keeps the expectation: the mean of many calls is the undropped output
    assert_close(reference, outs.mean(0), atol=0.03)
    out, _ = attn(x, x, x)
    out.sum().backward()
    assert bool(torch.isfinite(x.grad).all()) and attn.in_proj_weight.grad is not None


def test_sas_exponent_has_finite_gradients_under_masks():
    x = torch.tensor([[0.0, -0.3, -2.5, -12.0, float("-inf")]], requires_grad=True)
    y = sas_exp(x, SASConfig())
    y.sum().backward()
    assert bool(torch.isfinite(x.grad).all()), x.grad
    # where a weight is kept its derivative is the weight's (d e^x / dx = e^x, to the error of
    # the cubic's derivative, < 1e-2); where SAS drops it (n > T) or it is masked, zero
    assert_close(x.grad[0, :3], y.detach()[0, :3], atol=1e-2)
    assert x.grad[0, 3:].abs().max() == 0
