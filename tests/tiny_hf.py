"""Tiny Hugging Face models with random weights, built from small configs (nothing downloaded),
shared by the test files that read, write and merge HF folders."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


def bert(seed: int):
    """A 2-block BERT sequence classifier (width 32, 2 heads, vocabulary 100, 3 labels)."""
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100, max_position_embeddings=32,
                                  num_labels=3)
    return transformers.BertForSequenceClassification(cfg).eval()


def gpt2(seed: int):
    """A 2-block GPT-2 LM (width 32, 2 heads, vocabulary 100, 16 positions, tied head)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()
