"""copd_jax.losses against hand-computed numpy values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from copd_jax import losses


def test_group_advantages_sample_std_population_std_and_centred_only():
  rewards = np.array([1., 0., 0., 1., 1., 1., 1., 0.], np.float32)
  # group 1: mean 0.5, deviations +-0.5; sample std sqrt(1/3), population std 0.5
  # group 2: mean 0.75, deviations (.25, .25, .25, -.75); sample std 0.5, population sqrt(3)/4
  sample = losses.group_advantages(rewards, 4, eps=0.0)
  np.testing.assert_allclose(sample, [0.5 * np.sqrt(3), -0.5 * np.sqrt(3), -0.5 * np.sqrt(3),
                                      0.5 * np.sqrt(3), 0.5, 0.5, 0.5, -1.5], rtol=1e-6)
  population = losses.group_advantages(rewards, 4, ddof=0, eps=0.0)
  q = 4 / np.sqrt(3)
  np.testing.assert_allclose(population, [1, -1, -1, 1, .25 * q, .25 * q, .25 * q, -.75 * q],
                             rtol=1e-6)
  centred = losses.group_advantages(rewards, 4, normalize_std=False)
  np.testing.assert_allclose(centred, [.5, -.5, -.5, .5, .25, .25, .25, -.75], rtol=1e-6)


def test_group_advantages_constant_group_is_zero_and_leading_axes_kept():
  rewards = np.array([[1., 1., 0., 2.], [3., 3., 3., 3.]], np.float32)
  adv = losses.group_advantages(rewards, 2)
  assert adv.shape == (2, 4)
  np.testing.assert_allclose(adv[0, :2], 0.0)
  np.testing.assert_allclose(adv[1], 0.0)
  np.testing.assert_allclose(adv[0, 2:], [-1 / np.sqrt(2), 1 / np.sqrt(2)], rtol=1e-5)
  with pytest.raises(ValueError, match='multiple of group_size'):
    losses.group_advantages(rewards, 3)


def test_clipped_surrogate_both_edges():
  # ratios 1.5, 0.5, 1.5, 0.5, 1.1 with advantages +1, -1, -1, +1, +2
  ratio = np.array([1.5, 0.5, 1.5, 0.5, 1.1], np.float32)
  adv = np.array([1., -1., -1., 1., 2.], np.float32)
  sampler = np.full(5, -2.0, np.float32)
  lp = sampler + np.log(ratio)
  loss, low, high = losses.clipped_surrogate(lp, sampler, adv, 0.2, 0.28)
  # +A above 1+eps_high: clipped to 1.28; -A below 1-eps_low: clipped to 0.8;
  # the other two sides take the unclipped (pessimistic) term.
  np.testing.assert_allclose(loss, [-1.28, 0.8, 1.5, -0.5, -2.2], rtol=1e-5)
  np.testing.assert_array_equal(high, [True, False, False, False, False])
  np.testing.assert_array_equal(low, [False, True, False, False, False])


def test_clipped_surrogate_gradient_vanishes_only_where_clip_binds():
  ratio = np.array([1.5, 0.5, 1.5, 0.5], np.float32)
  adv = np.array([1., -1., -1., 1.], np.float32)
  sampler = np.zeros(4, np.float32)
  grad = jax.grad(lambda lp: jnp.sum(losses.clipped_surrogate(lp, sampler, adv)[0]))(
      jnp.log(ratio))
  # d(-rho A)/d lp = -rho A where unclipped
  np.testing.assert_allclose(grad, [0.0, 0.0, 1.5, -0.5], rtol=1e-5)


def test_per_sequence_advantages_broadcast_over_tokens():
  lp = np.log(np.array([[1.0, 1.1], [0.9, 1.0]], np.float32))
  per_seq = np.array([2.0, -1.0], np.float32)
  a = losses.clipped_surrogate(lp, np.zeros_like(lp), per_seq)[0]
  b = losses.clipped_surrogate(lp, np.zeros_like(lp), np.repeat(per_seq[:, None], 2, 1))[0]
  np.testing.assert_allclose(a, b)
  np.testing.assert_allclose(a, [[-2.0, -2.2], [0.9, 1.0]], rtol=1e-6)


# Two sequences: lengths 3 and 1 (mask), per-token losses with rho = 1 are -A.
_ADV = np.array([[1., 2., 3., 0.], [4., 0., 0., 0.]], np.float32)
_MASK = np.array([[1, 1, 1, 0], [0, 1, 0, 0]], bool)


def _pg(aggregation, **kw):
  zeros = np.zeros_like(_ADV)
  return losses.policy_loss(zeros, zeros, _ADV, _MASK, aggregation=aggregation, **kw)[0]


def test_aggregation_modes_hand_computed():
  # per-token losses: seq 0 -> -1, -2, -3 ; seq 1 -> 0 (its only completion token has A=0)
  np.testing.assert_allclose(_pg('seq-mean-token-mean'), ((-6 / 3) + 0 / 1) / 2, rtol=1e-6)
  np.testing.assert_allclose(_pg('token-mean'), -6 / 4, rtol=1e-6)
  np.testing.assert_allclose(_pg('seq-mean-token-sum-norm'), -6 / (2 * 4), rtol=1e-6)
  np.testing.assert_allclose(_pg('seq-mean-token-sum-norm', max_tokens=10), -6 / 20, rtol=1e-6)
  with pytest.raises(ValueError, match='unknown loss aggregation'):
    _pg('sum')


def test_sequences_without_completion_tokens_do_not_count():
  adv = np.concatenate([_ADV, np.ones((1, 4), np.float32)])
  mask = np.concatenate([_MASK, np.zeros((1, 4), bool)])
  zeros = np.zeros_like(adv)
  loss = losses.policy_loss(zeros, zeros, adv, mask)[0]
  np.testing.assert_allclose(loss, -1.0, rtol=1e-6)


@pytest.mark.parametrize('aggregation', losses.AGGREGATIONS)
def test_global_normaliser_makes_split_batches_add_up(aggregation):
  rng = np.random.default_rng(0)
  lp = rng.normal(-2, 0.3, (6, 5)).astype(np.float32)
  sampler = lp + rng.normal(0, 0.3, lp.shape).astype(np.float32)
  adv = rng.normal(size=(6, 5)).astype(np.float32)
  mask = rng.random((6, 5)) < 0.6
  mask[:, 0] = True
  full, full_metrics = losses.policy_loss(lp, sampler, adv, mask, aggregation=aggregation)
  norm = losses.aggregation_weights(mask, aggregation)[1]
  count = mask.sum()
  parts = [losses.policy_loss(lp[s], sampler[s], adv[s], mask[s], aggregation=aggregation,
                              normalizer=norm, token_count=count)
           for s in (slice(0, 2), slice(2, 6))]
  np.testing.assert_allclose(sum(p[0] for p in parts), full, rtol=1e-5)
  for key in ('clip_frac_low', 'clip_frac_high', 'approx_kl'):
    np.testing.assert_allclose(sum(p[1][key] for p in parts), full_metrics[key], rtol=1e-5)
  # and splitting without the global normaliser would be wrong (the test can fail)
  local = sum(losses.policy_loss(lp[s], sampler[s], adv[s], mask[s], aggregation=aggregation)[0]
              for s in (slice(0, 2), slice(2, 6)))
  assert not np.allclose(local, full, rtol=1e-3)


def test_k3_kl_values():
  lp = np.array([-1.0, -2.0, -0.5], np.float32)
  ref = np.array([-2.0, -2.0, -0.1], np.float32)
  d = ref - lp
  np.testing.assert_allclose(losses.k3_kl(lp, ref), np.exp(d) - d - 1, rtol=1e-5)
  np.testing.assert_allclose(losses.k3_kl(lp, ref)[0], np.exp(-1.0), rtol=1e-6)
  assert losses.k3_kl(lp, ref)[1] == 0.0


def test_policy_loss_with_reference_kl_entropy_and_metrics():
  lp = np.log(np.array([[1.5, 0.5, 1.0]], np.float32))
  sampler = np.zeros_like(lp)
  adv = np.array([[1.0, -1.0, 0.5]], np.float32)
  mask = np.array([[1, 1, 0]], bool)
  ref = np.array([[-0.2, -1.0, 0.0]], np.float32)
  entropy = np.array([[2.0, 1.0, 7.0]], np.float32)
  loss, m = losses.policy_loss(lp, sampler, adv, mask, ref_logprobs=ref, kl_coef=0.1,
                               entropy=entropy, entropy_coef=0.01, aggregation='token-mean')
  pg = (-1.28 + 0.8) / 2
  d = ref[0, :2] - lp[0, :2]
  kl = np.mean(np.exp(d) - d - 1)
  np.testing.assert_allclose(m['pg_loss'], pg, rtol=1e-5)
  np.testing.assert_allclose(m['ref_kl'], kl, rtol=1e-5)
  np.testing.assert_allclose(m['entropy'], 1.5, rtol=1e-6)
  np.testing.assert_allclose(loss, pg + 0.1 * kl - 0.01 * 1.5, rtol=1e-5)
  np.testing.assert_allclose(m['loss'], loss)
  np.testing.assert_allclose(m['clip_frac_high'], 0.5)
  np.testing.assert_allclose(m['clip_frac_low'], 0.5)
  # approx KL(sampler || policy), k3 with r = pi / pi_sampler = rho
  rho = np.array([1.5, 0.5])
  np.testing.assert_allclose(m['approx_kl'], np.mean(rho - 1 - np.log(rho)), rtol=1e-5)


def test_opd_advantage_clamp_beta_and_detached_student():
  teacher = jnp.array([[-1.0, -3.0, -0.5, -9.0]])
  student = jnp.array([[-2.0, -1.0, -0.5, -1.0]])
  mask = jnp.array([[1, 1, 1, 0]], bool)
  adv, delta = losses.opd_advantages(teacher, student, mask, beta=0.5, clamp=1.5)
  np.testing.assert_allclose(delta, [[1.0, -2.0, 0.0, 0.0]])
  np.testing.assert_allclose(adv, [[0.5, -0.75, 0.0, 0.0]])
  unclamped, _ = losses.opd_advantages(teacher, student, mask)
  np.testing.assert_allclose(unclamped, [[1.0, -2.0, 0.0, 0.0]])
  grad = jax.grad(lambda s: jnp.sum(losses.opd_advantages(teacher, s, mask)[0]))(student)
  np.testing.assert_array_equal(grad, 0.0)


def test_advantage_stats():
  adv = np.array([[1., 2., 9.], [3., 0., 0.]], np.float32)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  s = losses.advantage_stats(adv, mask)
  np.testing.assert_allclose(s['advantage_mean'], 2.0)
  np.testing.assert_allclose(s['advantage_std'], np.std([1., 2., 3.]), rtol=1e-6)
  assert s['advantage_min'] == 1.0 and s['advantage_max'] == 3.0
