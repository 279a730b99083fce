"""Attention implementations (copd_jax/models/attention.py): blockwise equals dense, forward and
gradients, with padding, GQA, cached (offset) queries and lengths not divisible by the block;
the per-backend choice; the model option end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from copd_jax.models import attention as attn
from copd_jax.models.attention import Attention, Mask
from copd_jax.models.qwen3 import Qwen3, Qwen3Config, cached_mask, causal_mask

TOL = dict(rtol=2e-5, atol=2e-6)  # fp32: float reordering only


def _inputs(B, T, S, H, K, hd, seed=0):
  rng = np.random.RandomState(seed)
  q = jnp.asarray(rng.randn(B, T, H, hd), jnp.float32)
  k_t = jnp.asarray(rng.randn(B, K, hd, S), jnp.float32)
  v = jnp.asarray(rng.randn(B, K, S, hd), jnp.float32)
  return q, k_t, v


def _padded_valid(B, S):
  valid = np.ones((B, S), bool)
  valid[1, :7] = False          # left padding
  valid[2, S - 4:] = False      # right padding
  valid[3, :3] = False
  valid[3, S - 2:] = False      # both
  return jnp.asarray(valid)


def _assert_close_to_scale(actual, desired, tol=1e-5):
  """Elementwise within tol of the array's largest magnitude: float reordering in sums of
  terms of mixed sign leaves small entries with large relative error (measured: <= 1e-6)."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  err = np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-30)
  assert err <= tol, err


def _real_queries(mask: Mask) -> np.ndarray:
  """[B, T] queries that see at least one key (padding queries' outputs are never read)."""
  return np.asarray(mask.dense().any(-1)[:, 0])


@pytest.mark.parametrize('T,block,H,K', [(37, 8, 4, 2), (33, 5, 6, 1), (16, 16, 2, 2)])
def test_blockwise_equals_dense_forward_and_gradients(T, block, H, K):
  q, k_t, v = _inputs(4, T, T, H, K, 8)
  mask = causal_mask(_padded_valid(4, T))
  real = _real_queries(mask)
  # A loss that reads real queries only, as every caller does.
  w = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32) * real[:, :, None, None]

  def loss(fn, q, k_t, v):
    return jnp.sum(fn(q, k_t, v, mask) * w)
  dense = lambda q, k, v, m: attn.dense_attention(q, k, v, m)
  block_fn = lambda q, k, v, m: attn.blockwise_attention(q, k, v, m, block)
  out_d, out_b = dense(q, k_t, v, mask), block_fn(q, k_t, v, mask)
  np.testing.assert_allclose(np.asarray(out_b)[real], np.asarray(out_d)[real], **TOL)
  # Fully masked queries: both give the mean of all values.
  np.testing.assert_allclose(np.asarray(out_b), np.asarray(out_d), **TOL)
  g_d = jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2))(q, k_t, v)
  g_b = jax.grad(lambda *a: loss(block_fn, *a), argnums=(0, 1, 2))(q, k_t, v)
  for a, b in zip(g_b, g_d):
    _assert_close_to_scale(a, b)


def test_blockwise_equals_dense_over_a_cache_with_an_offset():
  """Prefill / chunked queries at slots index..index+T-1 of a longer cache."""
  S, T, index = 45, 11, 20
  q, k_t, v = _inputs(4, T, S, 4, 2, 8, seed=3)
  valid = np.array(_padded_valid(4, S))
  valid[:, index + T:] = False  # not yet written
  mask = cached_mask(jnp.asarray(valid), jnp.int32(index), T)
  real = _real_queries(mask)
  out_d = attn.dense_attention(q, k_t, v, mask)
  out_b = attn.blockwise_attention(q, k_t, v, mask, 8)
  np.testing.assert_allclose(np.asarray(out_b)[real], np.asarray(out_d)[real], **TOL)


def test_blockwise_keeps_bf16_close():
  q, k_t, v = (x.astype(jnp.bfloat16) for x in _inputs(2, 40, 40, 4, 2, 16))
  mask = causal_mask(jnp.ones((2, 40), bool))
  out_d = attn.dense_attention(q, k_t, v, mask).astype(jnp.float32)
  out_b = attn.blockwise_attention(q, k_t, v, mask, 16)
  assert out_b.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out_b.astype(jnp.float32)), np.asarray(out_d), atol=3e-2)


def test_choice_per_backend():
  q32 = jnp.zeros((1, 600, 4, 64), jnp.float32)
  k600 = jnp.zeros((1, 2, 64, 600))
  short_q, short_k = q32[:, :100], k600[..., :100]
  assert attn.choose('auto', 512, short_q, short_k, 'cpu') == 'dense'
  assert attn.choose('auto', 512, q32, k600, 'cpu') == 'blockwise'
  assert attn.choose('auto', 512, q32[:, :1], k600, 'cpu') == 'dense'   # one-token decode
  assert attn.choose('auto', 512, q32, k600, 'tpu') == 'blockwise'
  assert attn.choose('auto', 512, q32, k600, 'gpu') == 'blockwise'      # fp32: no cuDNN
  assert attn.choose('auto', 512, q32.astype(jnp.bfloat16), k600, 'gpu') == 'cudnn'
  assert attn.choose('auto', 512, q32[..., :1, :].astype(jnp.bfloat16), k600, 'gpu') == 'cudnn'
  assert attn.choose('dense', 512, q32, k600, 'gpu') == 'dense'
  with pytest.raises(ValueError, match='attention must be one of'):
    Attention('flash')


CONFIG = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48)


def test_model_blockwise_equals_dense_logits_and_gradients():
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 23)))
  valid = _padded_valid(4, 23)
  weight = valid[:, :, None].astype(jnp.float32)

  def loss_and_grad(impl):
    model = Qwen3(CONFIG, rngs=nnx.Rngs(0), init_std=0.2, attention=impl, attention_block=8)
    graphdef, params = nnx.split(model)
    def loss(params):
      logits, _ = nnx.merge(graphdef, params)(tokens, token_valid=valid)
      return jnp.sum(jax.nn.log_softmax(logits) * weight), logits
    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, logits, grads
  v_d, l_d, g_d = loss_and_grad('dense')
  v_b, l_b, g_b = loss_and_grad('blockwise')
  real = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(l_b)[real], np.asarray(l_d)[real], **TOL)
  np.testing.assert_allclose(float(v_b), float(v_d), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_d)):
    _assert_close_to_scale(a, b)


@pytest.mark.slow   # three compiles, ~25 s each on a 2-core machine
def test_grpo_step_memory_grows_linearly_with_length():
  """XLA's temporaries of a compiled GRPO step (tiny model, blockwise attention) at 1,024 ->
  2,048 -> 4,096 tokens: each doubling less than 2.2x (dense scores quadruple; measured
  1.45x and 1.62x, BENCHMARKS.md 'Attention memory')."""
  from benchmarks.attention_memory import grpo_step_temp_bytes
  sizes = [grpo_step_temp_bytes(t, 'blockwise') for t in (1024, 2048, 4096)]
  ratios = [b / a for a, b in zip(sizes, sizes[1:])]
  assert all(r < 2.2 for r in ratios), (sizes, ratios)
