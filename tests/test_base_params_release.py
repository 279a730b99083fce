"""The base model's un-stacked parameters leave the devices after set-up unless the k3 KL term
uses them (copd_jax/run_setup.py: starting_state): after `setup_run` on a tiny HF folder, the
live device arrays with the base's shapes and placements are counted against those there were
before it (jax.live_arrays). kl_coef = 0: none is left (with or without model.branch_init);
kl_coef > 0: exactly one copy, the run's reference."""
import collections
import gc

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from copd_jax.config import load_config
from copd_jax.run_setup import setup_run
from scripts.faults import cli, model_inputs


def placement(shape, dtype, sharding) -> tuple:
  """What identifies an array on the devices: shape, dtype and which block each device holds."""
  blocks = sharding.devices_indices_map(tuple(shape))
  return (tuple(shape), str(dtype),
          tuple(sorted((device.id, str(index)) for device, index in blocks.items())))


def live_placements() -> collections.Counter:
  gc.collect()
  return collections.Counter(placement(x.shape, x.dtype, x.sharding) for x in jax.live_arrays()
                             if not x.is_deleted())


def base_placements(run) -> collections.Counter:
  """The un-stacked base params as the run would place them: every branch-stacked parameter
  without its leading 'branch' axis (steps.reference_shardings)."""
  return collections.Counter(
      placement(x.shape[1:], x.dtype, NamedSharding(x.sharding.mesh, P(*x.sharding.spec[1:])))
      for x in jax.tree.leaves(run.state.params))


def base_copies_after_setup(tmp_path, *overrides) -> tuple[collections.Counter, object]:
  """(live base-shaped arrays setup_run added, the run)."""
  folder = model_inputs.hf_folder(str(tmp_path))
  config = load_config(cli.TOY_CONFIG, [*cli.BASE_OVERRIDES, '--config.model.source=hf',
                                        f'--config.model.hf_path={folder}', *overrides])
  before = live_placements()
  run = setup_run(config, str(tmp_path / 'w'), log=lambda _: None)
  added = live_placements() - before
  base = base_placements(run)
  run.checkpointer.close()
  return collections.Counter({p: n for p, n in added.items() if p in base}), run


@pytest.mark.parametrize('branch_init', [(), ('', '')])
def test_without_the_kl_term_no_base_params_outlive_set_up(tmp_path, branch_init):
  overrides = [f'--config.model.branch_init={branch_init!r}'] if branch_init else []
  left, run = base_copies_after_setup(tmp_path, *overrides)
  assert run.config.grpo.kl_coef == 0 and run.ref == ()
  assert tuple(run.config.model.branch_init) == branch_init
  assert not left, f'{sum(left.values())} base params still on the devices'


def test_with_the_kl_term_exactly_one_base_copy_stays_as_the_reference(tmp_path):
  left, run = base_copies_after_setup(tmp_path, '--config.grpo.kl_coef=0.05')
  (ref,) = run.ref
  assert left == base_placements(run) == collections.Counter(
      placement(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(ref))


def test_a_resume_restores_into_shapes_and_never_reads_the_base(tmp_path, monkeypatch):
  """On a resume the checkpoint is the state: set-up builds only its restore target (shapes and
  shardings), so with kl_coef = 0 the base's weights are never read, and the restored params
  are the saved ones."""
  import numpy as np
  from copd_jax import checkpoint as ckpt
  from copd_jax import run_setup
  folder = model_inputs.hf_folder(str(tmp_path))
  config = load_config(cli.TOY_CONFIG, [*cli.BASE_OVERRIDES, '--config.model.source=hf',
                                        f'--config.model.hf_path={folder}'])
  workdir = str(tmp_path / 'w')
  run = setup_run(config, workdir, log=lambda _: None)
  # A checkpoint of params that differ from the base, as a trained step's would.
  state = run.state._replace(params=jax.tree.map(lambda x: x + 1.0, run.state.params))
  run.checkpointer.save(0, state, ckpt.run_meta(
      cycle=0, phase='rl', step=0, model_config=run.model_config, tokenizer_dir=run.base_path,
      base_params=run.base_path, config=run.config, data_state=run.sources.get_state(),
      phases=run.phases.get_state(), data_files=run.data_files), force=True)
  run.checkpointer.close()

  def refuse(*args, **kwargs):
    raise AssertionError('the base weights were read on a resume')
  monkeypatch.setattr(run_setup, 'load_base_params', refuse)
  monkeypatch.setattr(run_setup, 'load_vl_base_params', refuse)
  resumed = setup_run(config, workdir, log=lambda _: None)
  resumed.checkpointer.close()
  assert resumed.start_step == 1
  for want, got in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.state.params)):
    assert got.sharding == want.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
