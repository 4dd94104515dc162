"""Kernel tests run on CUDA when present, else in Triton's interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama (2 layers, 4 heads, 2 KV heads, head_dim 64) saved to a folder."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
