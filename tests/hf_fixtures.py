"""Tiny randomly initialised Hugging Face Qwen3 folders, built with transformers + save_pretrained."""
from __future__ import annotations

import torch
import transformers

TINY_CONFIGS = {
    # GQA 2:1, untied, non-default rope_theta.
    'untied_gqa2': dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, intermediate_size=80, rope_theta=5_000.0,
                        tie_word_embeddings=False),
    # Tied embeddings, multi-query (4:1), head_dim != hidden/heads.
    'tied_mqa': dict(vocab_size=80, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=24, intermediate_size=64, rope_theta=250_000.0,
                     tie_word_embeddings=True),
    # No GQA (MHA), attention biases, large theta.
    'mha_bias': dict(vocab_size=64, hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                     num_key_value_heads=5, head_dim=8, intermediate_size=72, rope_theta=1_000_000.0,
                     attention_bias=True, rms_norm_eps=1e-5),
}


def make_hf_model(name: str, seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(**TINY_CONFIGS[name])
  model = transformers.Qwen3ForCausalLM(config).eval()
  with torch.no_grad():  # random norms and biases so the test sees them used correctly
    for pname, p in model.named_parameters():
      if 'norm' in pname or pname.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_hf_model(name: str, folder, seed: int = 0):
  model = make_hf_model(name, seed)
  model.save_pretrained(str(folder))
  return model
