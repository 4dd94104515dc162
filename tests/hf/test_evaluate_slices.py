"""The evaluation reads logits slice by slice (a 4096-token window of a 262k vocabulary would be
4.3 GB at once): the sliced head must be the model's own logits, soft-cap included, and a model
whose logits are anything else is refused by name."""

from pathlib import Path

import pytest
import torch
import transformers as tf

from turbo_core.hf.evaluate import check_head_slices, head_slices
from turbo_core.hf.models import LoadedModel, shape_of
from turbo_core.testing import assert_close


def _gemma3(cap):
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=300, hidden_size=128, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=64, query_pre_attn_scalar=64, sliding_window=16,
                              final_logit_softcapping=cap)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    return LoadedModel(model, None, "tiny", Path("."), shape_of(model.config, "tiny"))


@pytest.mark.parametrize("cap", [None, 0.5])  # 0.5 binds on these logits
def test_sliced_logits_are_the_models_own(cap):
    lm = _gemma3(cap)
    ids = torch.randint(0, 300, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = lm.model(ids).logits[0]
        got = torch.cat(list(head_slices(lm, ids, 16)))
    assert_close(want, got, atol=1e-5)
    check_head_slices(lm, ids)


def test_a_model_with_other_logit_processing_is_refused():
    lm = _gemma3(None)
    forward = lm.model.forward

    def scaled(*args, **kwargs):  # as if the model scaled its logits after the head
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    lm.model.forward = scaled
    with pytest.raises(ValueError, match="not its output head"):
        check_head_slices(lm, torch.randint(1, 300, (1, 8), generator=torch.Generator().manual_seed(2)))
