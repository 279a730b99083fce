"""copd_jax.opd_signals: the OPD signal variants' per-position losses and gradients against
independent references, the jitted OPD step of each variant against a hand-made update, the
delta = 0 case (a teacher identical to its student leaves only the native GRPO update), the
per-edge signal metrics and the config checks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copd_jax import metrics as metrics_lib, opd_signals
from copd_jax.errors import UserInputError
from copd_jax.models.qwen3 import Qwen3
from copd_jax.scoring import (apply_model, logprobs_from_logits, map_head_chunks,
                              next_token_logprobs, pad_first_position)
from copd_jax.steps import StepConfig, make_grpo_step, make_opd_step
from tests.test_steps import (CONFIG, _batch, _one_device_mesh, _perturbed_stack, _state,
                              model)  # noqa: F401  (model: the fixture)

V = 11


def _random(seed, shape, scale=2.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _mask(seed, shape):
  """A completion mask with masked-out positions (padding) in every row."""
  mask = np.random.default_rng(seed).random(shape) < 0.7
  mask[..., -1] = False
  return jnp.asarray(mask, jnp.float32)


# ----------------------------------------------------------------------------- per position

def test_top_k_by_argmax_equals_lax_top_k():
  x = _random(9, (3, 4, V))
  for k in (1, 4, V):
    ids, values = opd_signals.top_k_by_argmax(x, k)
    want_values, want_ids = jax.lax.top_k(x, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(values, want_values)


def test_topk_forward_kl_value_and_gradient_against_a_dense_reference():
  """KL(q || softmax(z)) with q the teacher's top-k renormalised, written densely over V (q = 0
  off the top-k); its gradient in the logits is softmax(z) - q (closed form)."""
  z, teacher = _random(0, (3, 5, V)), _random(1, (3, 5, V))
  mask, k = _mask(2, (3, 5)), 4
  t_lp, ids = jax.lax.top_k(jax.nn.log_softmax(teacher), k)
  ids = jnp.where(mask[..., None] > 0, ids, -1)   # the probe's marking of unused positions

  def ours(z):
    return jnp.sum(mask * opd_signals.topk_forward_kl(jax.nn.log_softmax(z), ids, t_lp))

  top = jax.nn.one_hot(jax.lax.top_k(teacher, k)[1], V).sum(-2)   # [3, 5, V] 0/1
  q = top * jnp.exp(teacher) / jnp.sum(top * jnp.exp(teacher), axis=-1, keepdims=True)

  def dense(z):
    log_s = jax.nn.log_softmax(z)
    return jnp.sum(mask * jnp.sum(jax.scipy.special.xlogy(q, q) - q * log_s, axis=-1))

  np.testing.assert_allclose(ours(z), dense(z), rtol=1e-5)
  grad = jax.grad(ours)(z)
  np.testing.assert_allclose(grad, jax.grad(dense)(z), atol=1e-6)
  np.testing.assert_allclose(grad, mask[..., None] * (jax.nn.softmax(z) - q), atol=1e-6)
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)


def test_topk_forward_kl_with_k_equal_vocab_is_zero_for_an_identical_teacher():
  z = _random(3, (4, V))
  lp, ids = jax.lax.top_k(jax.nn.log_softmax(z), V)
  f = lambda z: jnp.sum(opd_signals.topk_forward_kl(jax.nn.log_softmax(z), ids, lp))
  np.testing.assert_allclose(f(z), 0.0, atol=1e-5)
  np.testing.assert_allclose(jax.grad(f)(z), 0.0, atol=1e-6)


def test_reverse_kl_value_and_gradient_against_autodiff_of_the_plain_formula():
  z, teacher = _random(4, (3, 5, V)), jax.nn.log_softmax(_random(5, (3, 5, V)))
  mask = _mask(6, (3, 5))
  ours = lambda z: jnp.sum(mask * opd_signals.reverse_kl(jax.nn.log_softmax(z), teacher))

  def plain(z):
    s = jax.nn.softmax(z)
    return jnp.sum(mask * jnp.sum(s * (jnp.log(s) - teacher), axis=-1))

  np.testing.assert_allclose(ours(z), plain(z), rtol=1e-5)
  grad = jax.grad(ours)(z)
  np.testing.assert_allclose(grad, jax.grad(plain)(z), atol=1e-6)
  assert np.abs(np.asarray(grad)).max() > 1e-2
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)


def _vocabulary_view_scores(graphdef, params, tokens, valid, teacher_logp, temperature, chunk,
                            clamp):
  """The 'full_reverse_kl' student pass as it was when the teacher sent its whole [B, T, V]
  log-probs (`scoring.next_token_logprobs`): the student's scores and reverse_kl per position
  against those log-probs, logits `chunk` positions at a time."""
  model = nnx.merge(graphdef, params)
  hidden, _ = model.hidden_states(tokens, token_valid=valid)

  def per_chunk(logits, inputs):
    targets, teacher = inputs
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return (logprobs_from_logits(logits, targets, temperature).logprobs,
            opd_signals.reverse_kl(logp, teacher, clamp))

  out = map_head_chunks(per_chunk, model, hidden[:, :-1], (tokens[:, 1:], teacher_logp[:, 1:]),
                        chunk)
  return tuple(pad_first_position(x) * valid for x in out)


def _random_params(graphdef, abstract, seed):
  rng = np.random.default_rng(seed)
  def draw(v):
    if 'norm' in v.get_metadata()['logical_axes']:
      return v.replace(jnp.ones(v.shape, v.dtype))
    return v.replace(jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype))
  return jax.tree.map(draw, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.mark.parametrize('tied,chunk,clamp', [(False, 5, None),
                                              pytest.param(True, None, 0.5, marks=pytest.mark.slow),
                                              (True, 4, 0.5)])
def test_full_reverse_kl_from_teacher_hidden_states_equals_the_vocabulary_sized_view(tied, chunk,
                                                                                    clamp):
  """Old vs new on the same inputs: 2 native rows, then 2 rounds of 3 distillation rows taught
  by two different teachers. The student's log-probs, the divergence and the gradient of a loss
  using both, with the teachers' logits formed at the student from their hidden states and
  heads, equal those against the teachers' whole [B, T, V] log-probs."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(
      dataclasses.replace(CONFIG, tie_word_embeddings=tied), rngs=nnx.Rngs(0))))
  student, *teachers = (_random_params(graphdef, abstract, seed) for seed in range(3))
  batch = _batch(11, (8,))
  tokens, valid = jnp.asarray(batch.tokens), jnp.asarray(batch.token_valid)
  mask = jnp.asarray(batch.completion_mask, jnp.float32).at[:2].set(0.0)
  native, rounds = 2, [slice(2, 5), slice(5, 8)]

  def teacher_part(fn):   # jitted: eager op-by-op dispatch of the model is slow
    fn = jax.jit(fn)
    return [fn(teacher, tokens[rows], valid[rows]) for teacher, rows in zip(teachers, rounds)]

  old_teacher = jnp.concatenate([jnp.zeros((native, tokens.shape[1], CONFIG.vocab_size))] +
                                teacher_part(lambda p, t, v: next_token_logprobs(
                                    graphdef, p, t, v, TEMPERATURE, chunk)))
  views = teacher_part(lambda p, t, v: opd_signals.teacher_view(
      graphdef, p, t, v, opd_signals.FULL_REVERSE_KL, TEMPERATURE, 1, chunk))
  hidden = jnp.concatenate([jnp.zeros((native,) + views[0].hidden.shape[1:])] +
                           [view.hidden for view in views])
  heads = jnp.stack([jax.jit(lambda p: opd_signals.teacher_head(graphdef, p))(p)
                     for p in teachers])
  view = opd_signals.TeacherView(jnp.zeros(tokens.shape), hidden=hidden)

  def loss(scores_and_divergence):
    logprobs, divergence = scores_and_divergence
    return jnp.sum(mask * (divergence + 0.1 * logprobs)), scores_and_divergence

  def new_pass(p):
    scores, divergence = opd_signals.student_scores(
        graphdef, p, tokens, valid, view, opd_signals.FULL_REVERSE_KL, TEMPERATURE, chunk, clamp,
        heads, native)
    return scores.logprobs, divergence

  new = jax.jit(jax.value_and_grad(lambda p: loss(new_pass(p)), has_aux=True))
  old = jax.jit(jax.value_and_grad(lambda p: loss(_vocabulary_view_scores(
      graphdef, p, tokens, valid, old_teacher, TEMPERATURE, chunk, clamp)), has_aux=True))
  (new_loss, (new_scores, new_divergence)), new_grad = new(student)
  (old_loss, (old_scores, old_divergence)), old_grad = old(student)
  np.testing.assert_allclose(new_scores, old_scores, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_divergence[native:], old_divergence[native:], rtol=1e-5,
                             atol=1e-6)
  assert np.all(np.asarray(new_divergence[:native]) == 0)
  assert np.asarray(new_divergence[native:]).max() > 0.1
  np.testing.assert_allclose(new_loss, old_loss, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(new_grad), jax.tree.leaves(old_grad)):   # entries up to ~2
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  # the teacher's token log-probs sent beside the hidden states are those of its whole view
  for view_r, rows in zip(views, rounds):
    want = jnp.take_along_axis(old_teacher[rows], tokens[rows][..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(view_r.token_logprobs, want, rtol=1e-5, atol=1e-6)


def test_reverse_kl_clamp_clips_each_vocabulary_delta_in_the_gradient_only():
  """With a clamp c the gradient in the logits is s * (sum_v s_v c_v - c_v), c_v =
  clip(log t_v - log s_v, +-clamp) (the closed form of -sum_v s_v c_v grad log s_v); the value
  stays the exact KL."""
  z, teacher = _random(7, (2, 3, V)), jax.nn.log_softmax(_random(8, (2, 3, V)))
  clamp = 0.5
  f = lambda z: jnp.sum(opd_signals.reverse_kl(jax.nn.log_softmax(z), teacher, clamp))
  s = jax.nn.softmax(z)
  c = jnp.clip(teacher - jax.nn.log_softmax(z), -clamp, clamp)
  assert np.abs(np.asarray(teacher - jax.nn.log_softmax(z))).max() > clamp   # it binds
  want = s * (jnp.sum(s * c, axis=-1, keepdims=True) - c)
  np.testing.assert_allclose(jax.grad(f)(z), want, atol=1e-6)
  np.testing.assert_allclose(f(z), jnp.sum(s * (jnp.log(s) - teacher)), rtol=1e-5)


# ----------------------------------------------------------------------------- OPD step
# One device, K = 2 (each branch teaches the other), 4 native + 4 distillation rows per branch,
# plain SGD with learning rate 1 (no clipping), so a parameter change is minus the gradient.
SGD = optax.sgd(1.0)
BETA, TEMPERATURE = 0.7, 0.8


@pytest.fixture(scope='module')
def steps(model):
  """graphdef, the mesh, the state shardings, the GRPO step (shared: one compile per shape) and
  a factory of OPD steps."""
  graphdef, params = model
  mesh = _one_device_mesh()
  sh = _state(_perturbed_stack(params, 2), SGD, mesh)[1]
  cfg = lambda **kw: StepConfig(opd_beta=BETA, temperature=TEMPERATURE, **kw)
  return dict(graphdef=graphdef, mesh=mesh, sh=sh,
              grpo=make_grpo_step(graphdef, SGD, mesh, cfg(), sh),
              opd=lambda **kw: make_opd_step(graphdef, SGD, mesh, cfg(**kw), sh, ((1, 0),)))


def _seq_mean_weights(mask):
  """'seq-mean-token-mean' weights per token and its normaliser (sequences with a token)."""
  lengths = mask.sum(-1, keepdims=True)
  return mask / np.maximum(lengths, 1), float((lengths > 0).sum())


def _reference_divergence_grad(graphdef, student, teacher, distill_k, signal, k, normalizer,
                               clamp=None):
  """Gradient of BETA * sum_rows,t w * divergence / normalizer written from the full logits of
  both models (apply_model, no chunking, no routing); with a clamp, the reverse KL's clamped
  gradient (opd_signals.reverse_kl, checked against its closed form above)."""
  tok, valid, mask = distill_k
  weights = jnp.asarray(_seq_mean_weights(np.asarray(mask, np.float32))[0])
  logp = lambda p: jax.nn.log_softmax(
      apply_model(graphdef, p, tok, token_valid=valid)[0][:, :-1] / TEMPERATURE, axis=-1)
  t = jax.lax.stop_gradient(logp(teacher))

  def loss(p):
    s = logp(p)
    if signal == 'topk_forward_kl':
      top = jax.nn.one_hot(jax.lax.top_k(t, k)[1], t.shape[-1]).sum(-2)
      q = top * jnp.exp(t) / jnp.sum(top * jnp.exp(t), axis=-1, keepdims=True)
      div = jnp.sum(jax.scipy.special.xlogy(q, q) - q * s, axis=-1)
    elif clamp is None:
      div = jnp.sum(jnp.exp(s) * (s - t), axis=-1)
    else:
      div = opd_signals.reverse_kl(s, t, clamp)
    return BETA * jnp.sum(weights[:, 1:] * div) / normalizer

  return jax.grad(loss)(student)


@pytest.mark.parametrize('signal', [pytest.param('topk_forward_kl', marks=pytest.mark.slow),
                                    'full_reverse_kl'])
def test_distribution_signal_step_equals_grpo_update_plus_reference_divergence_gradient(
    model, steps, signal):
  """opd_step with a distribution signal = the GRPO update of the combined batch whose
  distillation rows have advantage 0, plus minus the gradient of beta * the aggregated
  divergence computed independently; teacher = the other branch; logits in chunks of 5."""
  graphdef, mesh, grpo = steps['graphdef'], steps['mesh'], steps['grpo']
  stacked, k = _perturbed_stack(model[1], 2), 5
  native, distill = _batch(2, (2, 4)), _batch(3, (1, 2, 4))
  opd = steps['opd'](opd_signal=signal, opd_topk=k, logits_chunk=5)
  got, metrics = opd(_state(stacked, SGD, mesh)[0], native, distill)

  combined = type(native)(*(np.concatenate([n, d[0]], axis=1)
                            for n, d in zip(native[:5], distill[:5])))
  combined = combined._replace(advantages=np.concatenate(
      [native.advantages, np.zeros_like(distill.advantages[0])], axis=1))
  base, _ = grpo(_state(stacked, SGD, mesh)[0], combined)
  normalizers = [_seq_mean_weights(np.asarray(combined.completion_mask[b], np.float32))[1]
                 for b in range(2)]
  for b in range(2):
    branch = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
    rows = tuple(np.asarray(x[0, b]) for x in (distill.tokens, distill.token_valid,
                                               distill.completion_mask))
    g = _reference_divergence_grad(graphdef, branch(stacked, b), branch(stacked, 1 - b), rows,
                                   signal, k, normalizers[b])
    want = jax.tree.map(lambda x, gx: x - gx, branch(base.params, b), g)
    moved = 0.0
    for x, y, z in zip(jax.tree.leaves(branch(got.params, b)), jax.tree.leaves(want),
                       jax.tree.leaves(branch(base.params, b))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
      moved = max(moved, float(np.abs(np.asarray(y) - np.asarray(z)).max()))
    assert moved > 1e-4   # the divergence part is not trivially zero
  assert np.all(np.asarray(metrics['opd_divergence_mean']) > 0)


@pytest.mark.slow   # compiles a K = 3 OPD step and a GRPO step: ~2 min on a loaded 2-core machine
def test_full_reverse_kl_step_with_two_teachers_per_student_and_micro_batches(model):
  """K = 3, every branch taught by both others (two rounds), 2 micro-batches, a delta clamp:
  each micro-batch holds native rows, then its share of round 0's and of round 1's rows, and
  each round's rows must meet that round's teacher head. The step equals the GRPO update of the
  combined batch plus minus the reference divergence gradients of both teachers."""
  graphdef, params = model
  mesh = _one_device_mesh()
  stacked = _perturbed_stack(params, 3)
  sh = _state(stacked, SGD, mesh)[1]
  cfg = lambda **kw: StepConfig(opd_beta=BETA, temperature=TEMPERATURE, num_micro_batches=2,
                                **kw)
  rounds = ((1, 2, 0), (2, 0, 1))
  opd = make_opd_step(graphdef, SGD, mesh, cfg(opd_signal='full_reverse_kl', opd_clamp=0.3,
                                               logits_chunk=5), sh, rounds)
  native, distill = _batch(6, (3, 4)), _batch(7, (2, 3, 4))
  got, metrics = opd(_state(stacked, SGD, mesh)[0], native, distill)

  cat = lambda n, d: np.concatenate([n, d[0], d[1]], axis=1)
  combined = type(native)(*(cat(n, d) for n, d in zip(native, distill)))
  combined = combined._replace(advantages=cat(native.advantages,
                                              np.zeros_like(distill.advantages)))
  base, _ = make_grpo_step(graphdef, SGD, mesh, cfg(), sh)(_state(stacked, SGD, mesh)[0],
                                                           combined)
  branch = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  for b in range(3):
    normalizer = _seq_mean_weights(np.asarray(combined.completion_mask[b], np.float32))[1]
    want = branch(base.params, b)
    for r, teacher_of in enumerate(rounds):
      rows = tuple(np.asarray(x[r, b]) for x in (distill.tokens, distill.token_valid,
                                                 distill.completion_mask))
      g = _reference_divergence_grad(graphdef, branch(stacked, b),
                                     branch(stacked, teacher_of[b]), rows, 'full_reverse_kl', 0,
                                     normalizer, clamp=0.3)
      want = jax.tree.map(lambda x, gx: x - gx, want, g)
    for x, y in zip(jax.tree.leaves(branch(got.params, b)), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
  assert np.all(np.asarray(metrics['opd_divergence_mean']) > 0)


@pytest.mark.parametrize('signal,kw', [('sampled_token', {}), ('full_reverse_kl', {}),
                                       ('topk_forward_kl', {'opd_topk': CONFIG.vocab_size})])
def test_identical_teacher_gives_delta_zero_and_only_the_native_grpo_update(model, steps,
                                                                           signal, kw):
  """A student taught by a teacher with its own parameters: delta = 0 on every distillation
  token, and the OPD update is the pure GRPO update of the native rows, scaled by the share of
  the native sequences in the combined batch (their common 'seq-mean-token-mean' normaliser):
  the distillation rows add nothing (entropy and KL terms off)."""
  mesh, grpo = steps['mesh'], steps['grpo']
  same = _perturbed_stack(model[1], 1)
  stacked = jax.tree.map(lambda x: jnp.concatenate([x, x]), same)   # two identical branches
  native, distill = _batch(4, (2, 4)), _batch(5, (1, 2, 4))
  opd = steps['opd'](opd_signal=signal, **kw)
  got, metrics = opd(_state(stacked, SGD, mesh)[0], native, distill)
  pure, _ = grpo(_state(stacked, SGD, mesh)[0], native)
  assert np.asarray(metrics['opd_delta_abs_mean']).max() <= 1e-6
  for b in range(2):
    n_native = _seq_mean_weights(np.asarray(native.completion_mask[b], np.float32))[1]
    n_distill = _seq_mean_weights(np.asarray(distill.completion_mask[0, b], np.float32))[1]
    share = n_native / (n_native + n_distill)
    for x, y, p0 in zip(*(jax.tree.leaves(jax.tree.map(lambda v: v[b], t))
                          for t in (got.params, pure.params, stacked))):
      np.testing.assert_allclose(np.asarray(x) - np.asarray(p0),
                                 share * (np.asarray(y) - np.asarray(p0)), rtol=1e-4, atol=1e-7)
  moved = max(np.abs(np.asarray(a) - np.asarray(b)).max()
              for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(stacked)))
  assert moved > 1e-4   # the native GRPO part did move the parameters


# ----------------------------------------------------------------------------- metrics

def test_opd_edge_metrics_by_hand():
  tokens = np.array([[3, 1, 2, 0]])
  student_ids = np.array([[[3, 4], [1, 0], [5, 6], [0, 1]]])
  teacher_ids = np.array([[[3, 0], [2, 4], [2, 1], [0, 2]]])
  s_lp = np.log(np.array([[0.5, 0.4, 0.1, 0.9]]))
  t_lp = np.log(np.array([[0.25, 0.1, 0.2, 0.3]]))
  mask = np.array([[False, True, True, True]])
  got = metrics_lib.opd_edge_metrics(tokens, student_ids, teacher_ids, s_lp, t_lp, mask,
                                     beta=2.0, delta_clamp=1.0)
  delta = np.log([0.1 / 0.4, 0.2 / 0.1, 0.3 / 0.9])
  np.testing.assert_allclose(got['delta_abs'], np.abs(delta).mean())
  np.testing.assert_allclose(got['teacher_mass'], (0.1 + 0.2 + 0.3) / 3)
  np.testing.assert_allclose(got['student_mass'], (0.4 + 0.1 + 0.9) / 3)
  # position 0 is masked out, 1 and 2 miss one top-k set: only position 3 overlaps
  np.testing.assert_allclose(got['overlap_advantage'], 2.0 * max(delta[2], -1.0))
  np.testing.assert_allclose(got['overlap_share'], 1 / 3)
  none = metrics_lib.opd_edge_metrics(tokens, student_ids, teacher_ids, s_lp, t_lp,
                                      np.array([[False, True, True, False]]), beta=1.0)
  assert np.isnan(none['overlap_advantage']) and none['overlap_share'] == 0.0


def test_probe_logs_the_signal_metrics_under_each_edge_name():
  """driver.probe on a stand-in run (K = 2, one round, both branches learn): every edge gets
  opd/<metric>/<student><-<teacher>, computed from that edge's own probe arrays."""
  from types import SimpleNamespace
  from copd_jax import driver
  from copd_jax.edge_topk import EdgeTopK
  rng = np.random.default_rng(0)
  K, M, T, k = 2, 3, 6, 2
  tokens = rng.integers(0, 4, (K, M, T))
  mask = np.ones((K, M, T), bool)
  mask[:, :, 0] = False
  ids = lambda: rng.integers(0, 4, (1, K, M, T, k))
  lp = lambda: np.log(rng.uniform(0.05, 1.0, (1, K, M, T)))
  edge = EdgeTopK(ids(), np.zeros((1, K, M, T, k)), ids(), np.zeros((1, K, M, T, k)), lp(), lp())
  stacked = SimpleNamespace(tokens=tokens[None], completion_mask=mask[None])   # R = 1
  run = SimpleNamespace(probe=lambda params, stacked: edge, rounds=((1, 0),),
                        names=('b0_count', 'b1_sort'), mesh=None,
                        config=SimpleNamespace(opd=SimpleNamespace(beta=0.5, delta_clamp=0.0)))
  distill = SimpleNamespace(stacked=stacked)
  out = driver.probe(run, SimpleNamespace(params=None), distill)
  for s, name in ((0, 'b0_count<-b1_sort'), (1, 'b1_sort<-b0_count')):
    want = metrics_lib.opd_edge_metrics(tokens[s], edge.student_ids[0, s], edge.teacher_ids[0, s],
                                        edge.student_token_logprob[0, s],
                                        edge.teacher_token_logprob[0, s], mask[s], 0.5)
    for key in ('delta_abs', 'teacher_mass', 'student_mass', 'overlap_advantage',
                'overlap_share'):
      np.testing.assert_allclose(out[f'opd/{key}/{name}'], want[key], err_msg=key)
  assert out['opd/delta_abs/b0_count<-b1_sort'] != out['opd/delta_abs/b1_sort<-b0_count']


# ----------------------------------------------------------------------------- config

def test_signal_fields_are_checked_and_reach_the_step_config():
  from configs.base import base_config
  from copd_jax.config import ConfigError, validate
  with pytest.raises(UserInputError, match=r'^StepConfig.opd_signal:'):
    StepConfig(opd_signal='reverse_kl')
  with pytest.raises(UserInputError, match=r'^StepConfig.opd_topk:'):
    StepConfig(opd_signal='topk_forward_kl', opd_topk=0)
  with pytest.raises(UserInputError, match=r'^StepConfig.opd_clamp:'):
    StepConfig(opd_signal='topk_forward_kl', opd_clamp=1.0)
  config = base_config()
  config.mesh.branch, config.mesh.fsdp = 1, -1
  assert StepConfig.from_config(config, 8).opd_signal == 'sampled_token'
  config.opd.signal, config.opd.topk = 'topk_forward_kl', 16
  validate(config, check_files=False)
  step_config = StepConfig.from_config(config, 8)
  assert (step_config.opd_signal, step_config.opd_topk) == ('topk_forward_kl', 16)
  config.opd.topk = 10_000   # the toy vocabulary is smaller
  with pytest.raises(ConfigError, match=r'^config.opd.topk:'):
    validate(config, check_files=False)
  config.opd.topk, config.opd.delta_clamp = 16, 0.5
  with pytest.raises(ConfigError, match=r'^config.opd.delta_clamp:'):
    validate(config, check_files=False)
  config.opd.signal = 'full'
  with pytest.raises(ConfigError, match=r'^config.opd.signal:'):
    validate(config, check_files=False)
