"""The run's starting parameters (copd_jax/start_params.py): read tensor by tensor into the
training shardings, equal to loading the whole model on the host and stacking it, with a host
peak of about one stacked tensor (measured with tracemalloc)."""
import dataclasses
import tracemalloc

import jax
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax import mesh as mesh_lib
from copd_jax.errors import ConfigError
from copd_jax.models import hf_io
from copd_jax.start_params import (branch_sources, load_base_params, load_branch_stacked,
                                   needed_branches)
from copd_jax.steps import (branch_state_init, branch_state_shardings, init_branch_state,
                            init_stacked_branch_state)

# Six layers, so one layer-stacked tensor is a small part of the model (the MLP matrices, the
# largest, are each about a quarter of it).
SIX_LAYERS = dict(vocab_size=64, hidden_size=128, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=16, intermediate_size=256,
                  tie_word_embeddings=True)
OPTIMIZER = optax.adamw(1e-3)
RULES = mesh_lib.DEFAULT_RULES


def save_model(folder, seed: int, **overrides):
  torch.manual_seed(seed)
  config = transformers.Qwen3Config(**{**SIX_LAYERS, **overrides})
  transformers.Qwen3ForCausalLM(config).save_pretrained(str(folder))
  return str(folder)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """A base HF folder, another HF model of the same architecture, and a params-only (merged)
  checkpoint of a third set of weights."""
  tmp = tmp_path_factory.mktemp('start_params')
  base, other = save_model(tmp / 'base', 0), save_model(tmp / 'other', 1)
  third = hf_io.load_params(save_model(tmp / 'third_hf', 2))
  merged = str(tmp / 'merged')
  config = hf_io.read_config(base)
  ckpt.save_params_checkpoint(merged, third, {'model_config': dataclasses.asdict(config)})
  return base, other, merged


def branch_mesh():
  return mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_base_load_equals_the_whole_load_path(folders):
  base, _, _ = folders
  mesh = branch_mesh()
  # The path the driver took before: the whole model on the host, then stacked on the devices.
  graphdef, whole = nnx.split(hf_io.load_model(base))
  expected = init_branch_state(graphdef, whole, 2, OPTIMIZER, mesh, 3, RULES)
  model = hf_io.abstract_model(base)
  graphdef, abstract = nnx.split(model)
  params = load_base_params(base, abstract, model.config, mesh, RULES)
  assert_trees_equal(params, whole)
  shardings = mesh_lib.state_shardings(abstract, mesh, RULES)
  assert jax.tree.map(lambda x: x.sharding, params) == shardings
  state = init_branch_state(graphdef, params, 2, OPTIMIZER, mesh, 3, RULES)
  assert_trees_equal(state, expected)


def branch_layout(base: str, num_branches: int, mesh):
  """(abstract model, its abstract params, the abstract K-branch state, its shardings)."""
  model = hf_io.abstract_model(base)
  _, abstract_params = nnx.split(model)
  abstract = jax.eval_shape(branch_state_init(num_branches, OPTIMIZER, 5), abstract_params)
  return model, abstract_params, abstract, branch_state_shardings(abstract, mesh, RULES)


def test_branch_init_equals_stacking_the_whole_checkpoints(folders):
  base, other, merged = folders
  mesh = branch_mesh()
  model, abstract_params, abstract, shardings = branch_layout(base, 4, mesh)
  sources = branch_sources(['', other, merged, ''], base, model.config)
  reads = []
  def counting_open(path):
    source = ckpt.open_source(path)
    read = source.read
    def counted(key, branch=None, layer=None):
      reads.append((path, key, layer))
      return read(key, branch, layer)
    source.read = counted
    return source
  stacked = load_branch_stacked(sources, abstract.params, shardings.params, counting_open)
  assert jax.tree.map(lambda x: x.sharding, stacked) == shardings.params
  state = init_stacked_branch_state(stacked, OPTIMIZER, mesh, 5, RULES)
  # The old path: every branch's model whole on the host, stacked, then placed.
  wholes = [ckpt.load_params_for_inference(p)[1] for p in (base, other, merged, base)]
  expected = jax.tree.map(lambda *xs: np.stack(xs), *wholes)
  assert_trees_equal(nnx.to_pure_dict(state.params), expected)
  assert int(np.asarray(state.step).sum()) == 0
  assert_trees_equal(state.opt_state[0].mu, jax.tree.map(np.zeros_like, state.params))
  # Branches 0 and 3 start from the same folder: each leaf is read once per checkpoint.
  tensors = sum(x.shape[0] if path[0].key == 'layers' else 1  # layer by layer
                for path, x in jax.tree.leaves_with_path(nnx.to_pure_dict(abstract_params)))
  assert len(reads) == 3 * tensors and len(set(reads)) == 3 * tensors


def test_final_evaluation_group_reads_base_and_merge_into_the_branch_layout(folders):
  """finish.run_groups: the base and merged models are read from their folders straight into
  the branches' layout (no host copy of a whole model): slots [base, merged], the same values
  as the whole checkpoints and the same shardings as the branch parameters."""
  from types import SimpleNamespace
  from copd_jax.finish import run_groups
  from copd_jax.start_params import BranchSource
  base, other, merged = folders
  mesh = branch_mesh()
  model, _, abstract, shardings = branch_layout(base, 2, mesh)
  branches = load_branch_stacked(branch_sources([other, ''], base, model.config),
                                 abstract.params, shardings.params)
  singles = [('base', BranchSource(base, None, 'base')),
             ('merged:mean', BranchSource(merged, None, 'merged'))]
  groups = run_groups(SimpleNamespace(sample_mesh=mesh), ['b0', 'b1'], branches, singles)
  assert [g.names for g in groups] == [('b0', 'b1'), ('base', 'merged:mean')]
  assert [g.key_index for g in groups] == [(1, 2), (0, 3)]
  second = groups[1].params
  assert jax.tree.map(lambda x: x.sharding, second) == shardings.params
  wholes = [ckpt.load_params_for_inference(p)[1] for p in (base, merged)]
  assert_trees_equal(nnx.to_pure_dict(second), jax.tree.map(lambda *xs: np.stack(xs), *wholes))
  # One single model: the spare slot repeats it, unnamed, with its key number.
  groups = run_groups(SimpleNamespace(sample_mesh=mesh), ['b0', 'b1'], branches, singles[:1])
  assert groups[1].names == ('base', None) and groups[1].key_index == (0, 0)


class OneProcessOfTwo:
  """A sharding as process 0 of a two-process (branch=2, fsdp=4) run sees it: its 4 devices
  hold branch 0 of a [2, 8] array."""
  def addressable_devices_indices_map(self, shape):
    return {d: (slice(0, 1), slice(2 * d, 2 * d + 2)) for d in range(4)}


def test_a_process_reads_only_the_branches_its_devices_hold():
  sharding = jax.sharding.NamedSharding(branch_mesh(), jax.sharding.PartitionSpec('branch'))
  assert needed_branches(sharding, (2, 8)) == [0, 1]   # one process holds all 8 devices
  assert needed_branches(OneProcessOfTwo(), (2, 8)) == [0]


def test_branch_init_of_another_architecture_names_the_field(folders, tmp_path):
  base, _, _ = folders
  wider = save_model(tmp_path / 'wider', 0, intermediate_size=192)
  with pytest.raises(ConfigError, match=r'config.model.branch_init\[1\]: .* has architecture'):
    branch_sources(['', wider], base, hf_io.read_config(base))


def host_peak(load) -> int:
  """Peak host bytes (tracemalloc) while `load()` runs. On CPU a device buffer may be the host
  array it was made from: each placed array is deleted at once, so that placed leaves do not
  add up and what is measured is the loader's memory while it places one leaf."""
  place = jax.make_array_from_single_device_arrays
  def place_and_drop(*args, **kwargs):
    array = place(*args, **kwargs)
    array.delete()
    return array
  jax.make_array_from_single_device_arrays = place_and_drop
  tracemalloc.start()
  try:
    load()
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
    jax.make_array_from_single_device_arrays = place


def test_host_peak_is_about_one_stacked_tensor(folders):
  base, other, _ = folders
  mesh = branch_mesh()
  model = hf_io.abstract_model(base)
  _, abstract_params = nnx.split(model)
  sizes = [x.size * 4 for x in jax.tree.leaves(abstract_params)]
  largest, total = max(sizes), sum(sizes)
  assert total > 4 * largest
  load = lambda: load_base_params(base, abstract_params, model.config, mesh, RULES)
  load()  # once before measuring: one-off caches of jax and flax are not the loader's memory
  # The leaf being placed, its device blocks (host memory on CPU, until the array is deleted),
  # the HF tensor of one layer and jax's bookkeeping: under three tensors, whatever the number
  # of tensors (a whole-model load would be over `total`).
  peak = host_peak(load)
  assert peak < 3 * largest, (peak, largest, total)
  # Two branches from two checkpoints.
  abstract = jax.eval_shape(branch_state_init(2, OPTIMIZER, 0), abstract_params)
  shardings = branch_state_shardings(abstract, mesh, RULES).params
  sources = branch_sources(['', other], base, model.config)
  stacked = lambda: load_branch_stacked(sources, abstract.params, shardings)
  stacked()
  peak = host_peak(stacked)
  # Both branches' tensors of the leaf and their device blocks: under five tensors, where the
  # stacked model is 2 * total (over eight).
  assert peak < 5 * largest, (peak, largest, total)
  # The measure sees a whole-model load.
  assert host_peak(lambda: hf_io.load_params(base)) > total
