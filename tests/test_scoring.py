"""copd_jax.scoring: chunked teacher-forced scoring (logits a chunk of positions at a time,
recomputed in the backward pass) equals the whole-sequence scoring, values and gradients, and
shrinks the compiled GRPO step's temporary memory."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copd_jax import losses, mesh as mesh_lib
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.scoring import map_head_chunks, sequence_logprobs
from copd_jax.steps import (BranchState, RolloutBatch, StepConfig, branch_state_shardings,
                            make_grpo_step, shared_prompt_logprobs)

T = 13   # 12 scored positions: chunks of 5 and 7 leave a remainder, 4 and 6 divide them
CHUNKS = (1, 4, 5, 7, 12)


def _model(tied: bool, vocab: int = 97):
  """(graphdef, params) with random weights drawn by numpy (std 0.3 on the head, so the
  next-token distributions are far from uniform and the entropy is informative)."""
  config = Qwen3Config(vocab_size=vocab, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=8, intermediate_size=32, tie_word_embeddings=tied)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1 if tied else 0)
  def draw(path, v):
    if 'norm' in v.get_metadata()['logical_axes']:
      return v.replace(jnp.ones(v.shape, v.dtype))
    std = 0.25 if path[-1] in ('embed', 'lm_head') else 0.1
    return v.replace(jnp.asarray(std * rng.standard_normal(v.shape), v.dtype))
  params = jax.tree.map_with_path(lambda p, v: draw([k.key for k in p], v), abstract,
                                  is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, params


def _batch(vocab: int, rows: int = 4, seed: int = 0):
  """Rows of T tokens, right padded to different lengths, pairs of rows sharing a 4-token
  prompt (the shared-prompt layout); one row left padded."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, T)).astype(np.int32)
  tokens[:, :4] = np.repeat(tokens[::2, :4], 2, axis=0)
  pos = np.arange(T)
  valid = pos < rng.integers(6, T + 1, rows)[:, None]
  valid[:2, 0] = False
  return jnp.asarray(tokens), jnp.asarray(valid)


@pytest.fixture(scope='module', params=[pytest.param(False, marks=pytest.mark.slow), True],
                ids=['untied', 'tied'])
def setup(request):
  graphdef, params = _model(request.param)
  tokens, valid = _batch(97)
  return graphdef, params, tokens, valid


@functools.partial(jax.jit, static_argnums=(0, 5))
def _scores(graphdef, params, tokens, valid, temperature, chunk):
  return sequence_logprobs(graphdef, params, tokens, valid, temperature, chunk_size=chunk)


def test_chunked_scores_equal_whole_sequence_scores(setup):
  graphdef, params, tokens, valid = setup
  ref = _scores(graphdef, params, tokens, valid, 0.7, None)
  ent = np.asarray(ref.entropy)[:, 1:][np.asarray(valid)[:, 1:]]
  # informative distributions: neither one-hot nor near uniform (log 97 = 4.57)
  assert ent.min() > 0.1 and ent.max() < np.log(97) - 0.5
  # 2e-6 is 4 ulp at |x| in [4, 8): the whole-sequence call fuses the head differently from
  # the hidden-states path, and the difference does not grow with the number of chunks
  # (measured 1.2e-6 on an entropy since attention builds its mask per layer,
  # copd_jax/models/attention.py; 1e-6 before).
  for chunk in CHUNKS + (T, 100):
    got = _scores(graphdef, params, tokens, valid, 0.7, chunk)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, rtol=0, atol=2e-6, err_msg=f'{chunk}')
    np.testing.assert_allclose(got.entropy, ref.entropy, rtol=0, atol=2e-6, err_msg=f'{chunk}')


def _grpo_loss(params, graphdef, tokens, valid, sampler, adv, chunk, shared: bool):
  """A GRPO loss with an entropy bonus on completion positions [4, T)."""
  if shared:
    scores = shared_prompt_logprobs(graphdef, params, tokens, valid, 0.9, 2, 4, chunk)
  else:
    scores = sequence_logprobs(graphdef, params, tokens, valid, 0.9, chunk_size=chunk)
  mask = valid & (jnp.arange(T) >= 4)
  loss, _ = losses.policy_loss(scores.logprobs, sampler, adv, mask, epsilon_low=0.2,
                               epsilon_high=0.28, aggregation='seq-mean-token-mean',
                               entropy=scores.entropy, entropy_coef=0.05)
  return loss


@functools.partial(jax.jit, static_argnums=(1, 6, 7))
def _grad(params, graphdef, tokens, valid, sampler, adv, chunk, shared):
  return jax.value_and_grad(_grpo_loss)(params, graphdef, tokens, valid, sampler, adv, chunk,
                                        shared)


@pytest.mark.parametrize('tied, shared', [pytest.param(False, False, marks=pytest.mark.slow),
                                          (True, True)],
                         ids=['untied-plain', 'tied-shared_prompt'])
def test_chunked_grpo_gradients_equal_whole_sequence_gradients(tied, shared):
  graphdef, params = _model(tied)
  tokens, valid = _batch(97)
  # sampler log-probs near the model's (ratios near 1, most tokens unclipped), fixed advantages
  rng = np.random.default_rng(3)
  lp = _scores(graphdef, params, tokens, valid, 0.9, None).logprobs
  sampler = lp + jnp.asarray(0.1 * rng.standard_normal(lp.shape), jnp.float32)
  adv = jnp.asarray(rng.standard_normal((lp.shape[0], 1)), jnp.float32) * valid
  ref_loss, ref = _grad(params, graphdef, tokens, valid, sampler, adv, None, shared)
  ref_leaves = jax.tree.leaves(ref)
  assert all(np.any(np.asarray(g) != 0) for g in ref_leaves)  # every parameter gets a gradient
  for chunk in (5,):   # does not divide the 12 (plain) / 9 (shared) scored positions
    loss, got = _grad(params, graphdef, tokens, valid, sampler, adv, chunk, shared)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got), ref_leaves, strict=True):
      g, r = np.asarray(g), np.asarray(r)
      assert np.max(np.abs(g - r)) <= 1e-5 * np.max(np.abs(r)), chunk


def test_map_head_chunks_passes_aligned_targets_and_drops_padding():
  """Per-position outputs of any rank come back in order, the last partial chunk cut to T."""
  graphdef, params = _model(False, vocab=11)
  model = nnx.merge(graphdef, params)
  hidden = jnp.asarray(np.random.default_rng(0).standard_normal((3, 7, 16)), jnp.float32)
  targets = jnp.arange(21, dtype=jnp.int32).reshape(3, 7) % 11
  fn = lambda logits, tgt: (tgt, jnp.argmax(logits, -1), logits[..., :2])
  ref = map_head_chunks(fn, model, hidden, targets, None)
  got = map_head_chunks(fn, model, hidden, targets, 3)
  for g, r in zip(got, ref, strict=True):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got[0], targets)


@pytest.mark.parametrize('bad', [0, -2, 2.5, True])
def test_chunk_size_must_be_a_positive_integer(setup, bad):
  graphdef, params, tokens, valid = setup
  with pytest.raises(ValueError, match='chunk_size'):
    sequence_logprobs(graphdef, params, tokens, valid, chunk_size=bad)


def test_chunked_logits_shrink_the_compiled_grpo_steps_temporary_memory():
  """A vocabulary large against the hidden size (32k vs 64), 8 rows x 128 tokens: without
  chunks the step holds several [8, 128, 32k] fp32 buffers (128 MiB each: logits, log-softmax,
  their gradients); with 16-position chunks, only chunk-sized ones."""
  config = Qwen3Config(vocab_size=32768, hidden_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=1, head_dim=32, intermediate_size=128)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abstract)
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  optimizer = optax.sgd(1.0)
  K, N, T_long = 1, 8, 128

  def init():
    stacked = jax.tree.map(lambda x: jnp.zeros((K,) + x.shape, x.dtype), params)
    return BranchState(stacked, jax.vmap(optimizer.init)(stacked), jnp.zeros((K,), jnp.int32),
                       jnp.zeros((K, 2), jnp.uint32))

  state = jax.eval_shape(init)
  sh = branch_state_shardings(state, mesh)
  leaf = lambda dtype: jax.ShapeDtypeStruct((K, N, T_long), dtype)
  batch = RolloutBatch(leaf(jnp.int32), leaf(bool), leaf(bool), leaf(jnp.float32),
                       leaf(jnp.float32))

  def temp_bytes(chunk):
    step = make_grpo_step(graphdef, optimizer, mesh,
                          StepConfig(logits_chunk=chunk, entropy_coef=0.01), sh)
    return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes

  full, chunked = temp_bytes(None), temp_bytes(16)
  print(f'GRPO step temp memory: {full / 2**20:.1f} MiB whole-sequence logits, '
        f'{chunked / 2**20:.1f} MiB with 16-position chunks ({chunked / full:.2f}x)')
  assert full > 3 * N * T_long * config.vocab_size * 4   # the baseline really holds the logits
  assert chunked < 0.25 * full
