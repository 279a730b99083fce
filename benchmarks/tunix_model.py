"""The peer's side of the benchmarks: a random-init Tunix Qwen3 of the benchmark config and a word
tokenizer. Imported only inside the Tunix worker (its own venv); nothing of Tunix is copied here."""
from __future__ import annotations


def random_tunix_qwen3(c: dict, dtype=None, fsdp: int = 1):
  """(model, mesh) for config dict c (vocab, hidden, layers, heads, kv_heads, head_dim,
  intermediate, tied), parameters and compute in `dtype` (default float32). An (fsdp x 1)
  ('fsdp', 'tp') mesh with Auto axes (jax 0.10's Explicit default breaks Tunix's embedding
  lookup); MLP kernels re-drawn, since Tunix initialises them to zero."""
  import jax
  from flax import nnx
  from jax.sharding import AxisType
  from tunix.models.qwen3 import model as qwen3_lib

  config = qwen3_lib.ModelConfig(
      num_layers=c['layers'], vocab_size=c['vocab'], embed_dim=c['hidden'],
      hidden_dim=c['intermediate'], num_heads=c['heads'], head_dim=c['head_dim'],
      num_kv_heads=c['kv_heads'], rope_theta=1_000_000, norm_eps=1e-6,
      use_tied_embedding=c.get('tied', False), **({'dtype': dtype, 'param_dtype': dtype}
                                                  if dtype is not None else {}))
  mesh = jax.make_mesh((fsdp, 1), ('fsdp', 'tp'), axis_types=(AxisType.Auto, AxisType.Auto))
  with jax.set_mesh(mesh):
    model = qwen3_lib.Qwen3(config, rngs=nnx.Rngs(0))
  key = jax.random.key(1)
  for layer in model.layers:
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
      key, sub = jax.random.split(key)
      kernel = proj.kernel[...]
      proj.kernel[...] = 0.02 * jax.random.normal(sub, kernel.shape, kernel.dtype)
  return model, mesh


class WordTokenizer:
  """Ids as words 'w<id>' (ids 0 pad, 1 BOS, 2 EOS); the duck-typed interface Tunix's
  TokenizerAdapter accepts, so both sides see the same token ids."""

  def encode(self, text: str, **_) -> list[int]:
    return [int(w[1:]) for w in text.split()]

  def decode(self, ids, **_) -> str:
    return ' '.join(f'w{int(i)}' for i in ids)

  def bos_id(self) -> int:
    return 1

  def eos_id(self) -> int:
    return 2

  def pad_id(self) -> int:
    return 0
