"""Shared fixtures: tiny randomly initialised causal LMs saved as local HF directories."""

from __future__ import annotations

import pytest
import torch


def _tokenizer(vocab: int = 320):
    """A small byte-level BPE tokenizer trained on the stdlib prose (offline, < 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from turbo_core.data import load_split

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_split().calibration[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def make_tiny(path, family: str = "llama", seed: int = 0):
    """Save a tiny random model of ``family`` + tokenizer to ``path``; returns ``path``."""
    import transformers as tf

    tok = _tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                  bos_token_id=tok.eos_token_id)
    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM),
    }
    cfg_cls, model_cls = classes[family]
    extra = {"head_dim": 64} if family == "gemma" else {}
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**common, **extra)).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_factory():
    """``tiny_factory(path, family)`` saves a tiny random model of another family."""
    return make_tiny
