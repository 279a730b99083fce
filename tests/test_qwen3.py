"""The Qwen3 NNX model against transformers (PyTorch CPU), KV-cache decoding, and sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

from copd_jax import mesh as mesh_lib
from copd_jax.models import hf_io
from copd_jax.models import qwen3
from copd_jax.models.qwen3 import KVCache, Qwen3, Qwen3Config, default_positions
from tests.hf_fixtures import TINY_CONFIGS, save_hf_model


def padded_batch(vocab: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (4, 12))
  valid = np.ones_like(tokens, bool)
  valid[1, :5] = False   # left padding
  valid[2, 8:] = False   # right padding
  valid[3, :2] = False
  valid[3, 10:] = False  # both
  return tokens, valid


def torch_logits(hf_model, tokens, valid):
  positions = np.asarray(default_positions(jnp.asarray(valid)))
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(valid.astype(np.int64)),
                   position_ids=torch.tensor(positions))
  return out.logits.numpy()


@pytest.mark.parametrize('name', sorted(TINY_CONFIGS))
@pytest.mark.parametrize('scan_layers', [True, False])
def test_logits_match_transformers_on_padded_batch(tmp_path, name, scan_layers):
  hf_model = save_hf_model(name, tmp_path)
  model = hf_io.load_model(str(tmp_path), scan_layers=scan_layers)
  tokens, valid = padded_batch(TINY_CONFIGS[name]['vocab_size'])
  ours, _ = model(jnp.asarray(tokens), token_valid=jnp.asarray(valid))
  ref = torch_logits(hf_model, tokens, valid)
  diff = np.abs(np.asarray(ours) - ref)[valid]
  assert diff.max() <= 1e-4, diff.max()
  assert np.isfinite(np.asarray(ours)).all()  # padded queries must not produce NaN


def test_kv_cache_decoding_matches_full_forward(tmp_path):
  save_hf_model('untied_gqa2', tmp_path)
  model = hf_io.load_model(str(tmp_path))
  tokens, valid = padded_batch(96, seed=1)
  tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
  full, _ = model(tokens, token_valid=valid)
  positions = default_positions(valid)
  prefill = 5
  cache = KVCache.empty(model.config, batch=4, slots=16)
  logits, cache = model(tokens[:, :prefill], positions=positions[:, :prefill],
                        token_valid=valid[:, :prefill], cache=cache)
  steps = [logits]
  for t in range(prefill, tokens.shape[1]):
    logits, cache = model(tokens[:, t:t + 1], positions=positions[:, t:t + 1],
                          token_valid=valid[:, t:t + 1], cache=cache)
    steps.append(logits)
  decoded = jnp.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.asarray(decoded)[np.asarray(valid)],
                             np.asarray(full)[np.asarray(valid)], atol=1e-5)
  assert int(cache.index) == tokens.shape[1]


def test_bf16_compute_stays_close_to_fp32(tmp_path):
  save_hf_model('untied_gqa2', tmp_path)
  fp32 = hf_io.load_model(str(tmp_path))
  bf16 = hf_io.load_model(str(tmp_path), compute_dtype=jnp.bfloat16)
  tokens, valid = padded_batch(96)
  a, _ = fp32(jnp.asarray(tokens), token_valid=jnp.asarray(valid))
  b, _ = bf16(jnp.asarray(tokens), token_valid=jnp.asarray(valid))
  assert b.dtype == jnp.float32 and bf16.layers.q_proj[...].dtype == jnp.float32
  err = np.abs(np.asarray(a) - np.asarray(b))[valid]
  assert 0 < err.max() < 0.1


def test_gated_silu_gradient_matches_autodiff():
  gate, up, cotangent = jax.random.normal(jax.random.key(0), (3, 5, 7, 64)) * 6.0
  plain = lambda g, u: jax.nn.silu(g) * u
  value, vjp = jax.vjp(qwen3.gated_silu, gate, up)
  value_ref, vjp_ref = jax.vjp(plain, gate, up)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('x_shape, w_shape', [((2, 3, 16), (16, 40)), ((2, 3, 40), (40, 16)),
                                               ((5, 16), (16, 4, 8))])
def test_dense_gradient_matches_autodiff(x_shape, w_shape):
  keys = jax.random.split(jax.random.key(1), 3)
  x, w = jax.random.normal(keys[0], x_shape), jax.random.normal(keys[1], w_shape)
  cotangent = jax.random.normal(keys[2], x_shape[:-1] + w_shape[1:])
  value, vjp = jax.vjp(qwen3.dense, x, w)
  value_ref, vjp_ref = jax.vjp(lambda x, w: jnp.tensordot(x, w, axes=1), x, w)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6, atol=1e-6)
  for got, want in zip(vjp(cotangent), vjp_ref(cotangent)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_xla_cpu_backward_passes_are_used_on_cpu_only(monkeypatch):
  x, w = jnp.ones((2, 4)), jnp.ones((4, 4))
  # A new function per trace: jax caches traces by function, and the choice is made at trace time.
  model_ops = lambda: lambda x, w: qwen3.gated_silu(qwen3.dense(x, w), x)
  custom_calls = lambda: str(jax.make_jaxpr(model_ops())(x, w)).count('custom_vjp_call')
  grads = lambda: jax.grad(lambda x, w: jnp.sum(model_ops()(x, w)), argnums=(0, 1))(x, w)
  assert jax.default_backend() == 'cpu' and custom_calls() == 2
  cpu_grads = grads()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert custom_calls() == 0
  gpu_grads = grads()
  for a, b in zip(gpu_grads, cpu_grads):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_remat_gives_same_loss_and_gradients():
  config = Qwen3Config(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, intermediate_size=48)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 8)))

  def loss_and_grad(remat):
    model = Qwen3(config, rngs=nnx.Rngs(0), remat=remat)
    graphdef, params = nnx.split(model)
    def loss(p):
      logits, _ = nnx.merge(graphdef, p)(tokens)
      return jnp.mean(jax.nn.logsumexp(logits, -1))
    return jax.value_and_grad(loss)(params)

  (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_sharded_forward_equals_unsharded():
  config = Qwen3Config(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=96)
  model = Qwen3(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens, valid = padded_batch(128)
  tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
  reference, _ = model(tokens, token_valid=valid)

  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 4, 'tensor': 2})
  shardings = mesh_lib.state_shardings(params, mesh)
  sharded_params = jax.device_put(params, shardings)
  # Declared layout: embed dims over fsdp, heads / mlp / vocab over tensor.
  assert sharded_params['layers']['q_proj'].sharding.spec == P(None, 'fsdp', 'tensor', None)
  assert sharded_params['layers']['down_proj'].sharding.spec == P(None, 'tensor', 'fsdp')
  assert sharded_params['embed'].sharding.spec == P('tensor', 'fsdp')
  assert len(sharded_params['layers']['gate_proj'].addressable_shards) == 8
  shard_shape = sharded_params['layers']['gate_proj'].addressable_shards[0].data.shape
  assert shard_shape == (2, 64 // 4, 96 // 2)

  @jax.jit
  def forward(p, t, v):
    return nnx.merge(graphdef, p)(t, token_valid=v)[0]
  out = forward(sharded_params, tokens, valid)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference), atol=1e-5)


def test_indivisible_axis_is_replicated_not_an_error():
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 8, 'tensor': 1})
  spec = mesh_lib.logical_to_spec(('vocab', 'embed'), (100, 12), mesh)
  assert spec == P(None, None)  # 12 % 8 != 0 -> embed replicated
  spec = mesh_lib.logical_to_spec(('vocab', 'embed'), (100, 16), mesh)
  assert spec == P(None, 'fsdp')


@pytest.mark.parametrize('sizes,message', [
    ({'branch': 3, 'fsdp': -1}, 'not divisible'),
    ({'branch': 2, 'fsdp': 2}, 'use 4 devices but 8'),
    ({'branch': -1, 'fsdp': -1}, 'needs the number of branches K'),
    ({'data': 8}, "unknown axis 'data'"),
])
def test_mesh_config_errors_name_the_problem(sizes, message):
  with pytest.raises(mesh_lib.MeshConfigError, match=message):
    mesh_lib.make_mesh(sizes)


def test_mesh_branch_axis_must_divide_k():
  with pytest.raises(mesh_lib.MeshConfigError, match='does not divide the number of branches K=3'):
    mesh_lib.make_mesh({'branch': 2, 'fsdp': -1}, num_branches=3)
