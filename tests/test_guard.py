"""Numerical guard and frozen branches inside the train step: a non-finite loss in one branch
skips that branch's update (params and optimizer state unchanged), frozen branches never move,
and the other branches update exactly as they would alone."""
import jax
import numpy as np
import optax
import pytest

from copd_jax.steps import StepConfig, make_grpo_step
from tests.test_steps import _batch, _one_device_mesh, _perturbed_stack, _state, model  # noqa: F401

OPTIMIZER = optax.adamw(1e-2)


def _run(model, batch, **step_kw):
  graphdef, params = model
  mesh = _one_device_mesh()
  state, sh = _state(_perturbed_stack(params, 2), OPTIMIZER, mesh)
  before = jax.tree.map(np.asarray, (state.params, state.opt_state))
  step = make_grpo_step(graphdef, OPTIMIZER, mesh, StepConfig(**step_kw), sh)
  state, metrics = step(state, batch)
  return before, jax.tree.map(np.asarray, (state.params, state.opt_state)), metrics


def _branch(tree, k):
  return [x[k] for x in jax.tree.leaves(tree)]


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_nonfinite_branch_is_skipped_and_reported(model):
  batch = _batch(0, (2, 8))
  poisoned = batch._replace(advantages=batch.advantages.copy())
  poisoned.advantages[1] = np.nan
  before, after, metrics = _run(model, poisoned)
  np.testing.assert_array_equal(np.asarray(metrics['skipped_nonfinite']), [0.0, 1.0])
  assert _same(_branch(after, 1), _branch(before, 1))       # branch 1: untouched
  assert not _same(_branch(after, 0), _branch(before, 0))   # branch 0: updated
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(after))
  # Branch 0's update is the one it gets from the clean batch.
  _, clean_after, _ = _run(model, batch)
  for x, y in zip(_branch(after, 0), _branch(clean_after, 0)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_frozen_branch_never_moves(model):
  before, after, metrics = _run(model, _batch(1, (2, 8)), frozen_branches=(0,))
  assert _same(_branch(after, 0), _branch(before, 0))
  assert not _same(_branch(after, 1), _branch(before, 1))
  np.testing.assert_array_equal(np.asarray(metrics['skipped_nonfinite']), [0.0, 0.0])
