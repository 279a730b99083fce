"""Run checkpoints (async Orbax, keep policy, fallback past damaged steps, sharded restore),
leaf-by-leaf reads, params-only checkpoints and load_params_for_inference."""
import dataclasses
import gc
import glob
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax.checkpoint import params as params_checkpoint
from copd_jax.mesh import make_mesh, state_shardings
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.tokenizer import char_tokenizer

TINY = Qwen3Config(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=8, intermediate_size=32)


class State(NamedTuple):
  """Shaped like the trainer's BranchState: every leaf stacked [K, ...]."""
  params: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def branch_params(num_branches: int, config: Qwen3Config = TINY, seed: int = 0) -> nnx.State:
  """nnx.State of the model's parameters, K random copies stacked on a leading axis (numpy
  random values, so no jax random kernels are compiled)."""
  _, shapes = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  def draw(s):
    return jnp.asarray(0.1 * rng.standard_normal((num_branches,) + s.shape).astype(np.float32))
  return jax.tree.map(draw, shapes)


def make_state(num_branches: int = 2, seed: int = 0) -> State:
  params = branch_params(num_branches, seed=seed)
  opt_state = jax.vmap(optax.adam(1e-3).init)(params)
  return State(params, opt_state, jnp.full((num_branches,), 7, jnp.int32),
               jax.random.split(jax.random.key(seed), num_branches))


def meta_for(step: int, tokenizer_dir=None, base=None) -> dict:
  return ckpt.run_meta(cycle=1, phase='opd', step=step, model_config=TINY,
                       tokenizer_dir=tokenizer_dir, base_params=base, config={'lr': 1e-6},
                       data_state={'math': '{"index": 3}'})


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def plain(tree):
  """Numpy leaves, PRNG keys as their raw data, for exact comparison."""
  def to_np(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.leaves(jax.tree.map(to_np, tree))


def assert_trees_equal(a, b):
  la, lb = plain(a), plain(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def shifted(state: State, delta: float) -> State:
  return state._replace(params=jax.tree.map(lambda x: x + delta, state.params))


def test_roundtrip_is_exact(tmp_path):
  state = make_state()
  with ckpt.RunCheckpointer(str(tmp_path)) as saver:
    assert saver.save(5, state, meta_for(5))
    saver.wait()
    restored, meta = saver.restore(abstract(state))
  assert_trees_equal(restored, state)
  assert isinstance(restored, State)
  assert meta['step'] == 5 and meta['phase'] == 'opd'
  assert meta['data_state'] == {'math': '{"index": 3}'}
  assert ckpt.model_config_from_meta(meta, 'x') == TINY


def test_sharded_restore_on_branch_mesh(tmp_path):
  mesh = make_mesh({'branch': 2, 'fsdp': 4}, num_branches=2)
  params = branch_params(2)
  shardings = state_shardings(params, mesh, branch_stacked=True)
  sharded = jax.device_put(params, shardings)
  with ckpt.RunCheckpointer(str(tmp_path)) as saver:
    saver.save(1, {'params': sharded}, meta_for(1))
    saver.wait()
  target = jax.tree.map(
      lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), params,
      shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  restored, _ = ckpt.RunCheckpointer(str(tmp_path), read_only=True).restore({'params': target})
  got = restored['params']
  for leaf, want_sharding in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
    assert leaf.sharding == want_sharding
  assert got['embed'][...].sharding.spec[0] == 'branch'
  assert len(got['embed'][...].addressable_shards) == 8
  assert_trees_equal(got, params)


def test_keep_last_and_kept_checkpoints_persist(tmp_path):
  state = make_state()
  with ckpt.RunCheckpointer(str(tmp_path), keep_last=2, save_interval_steps=2,
                            keep_fn=lambda s: s == 4) as saver:
    assert not saver.save(1, state, meta_for(1))         # off the interval
    assert saver.save(3, state, meta_for(3), keep=True)  # kept regardless of interval
    for step in (4, 6, 8, 10):
      assert saver.save(step, state, meta_for(step))
    assert not saver.save(10, state, meta_for(10))       # already saved
    saver.wait()
    assert saver.all_steps() == [3, 4, 8, 10]
  # A new checkpointer (a resumed run without keep_fn) still keeps the marked steps.
  with ckpt.RunCheckpointer(str(tmp_path), keep_last=1) as saver:
    assert saver.kept_steps() == [3, 4]
    saver.save(12, state, meta_for(12))
    saver.wait()
    assert saver.all_steps() == [3, 4, 12]


def test_phase_ends_are_kept_only_as_far_as_keep_marked(tmp_path):
  """The README run's case: a checkpoint at every phase end, keep_last=3, keep_phase_ends=0:
  three checkpoints stay, not every phase end."""
  state = make_state()
  with ckpt.RunCheckpointer(str(tmp_path), keep_last=3, keep_marked=0) as saver:
    for step in range(1, 9):
      assert saver.save(step, state, meta_for(step), keep=step % 2 == 0)
    saver.wait()
    assert saver.all_steps() == [6, 7, 8]
  # Resumed with keep_phase_ends=2: the two newest phase ends stay besides keep_last=1.
  with ckpt.RunCheckpointer(str(tmp_path), keep_last=1, keep_marked=2) as saver:
    assert saver.save(9, state, meta_for(9))
    saver.wait()
    assert saver.all_steps() == [6, 8, 9]
    assert saver.save(10, state, meta_for(10), keep=True)
    saver.wait()
    assert saver.all_steps() == [8, 9, 10]  # phase end 6 fell out of the two newest


def _save_two(tmp_path, state):
  with ckpt.RunCheckpointer(str(tmp_path)) as saver:
    saver.save(1, state, meta_for(1))
    saver.save(2, shifted(state, 1.0), meta_for(2))
  return os.path.join(str(tmp_path), 'checkpoints', '2')


def _files(step_dir):
  return sorted((f for f in glob.glob(os.path.join(step_dir, '**'), recursive=True)
                 if os.path.isfile(f)), key=os.path.getsize)


# Orbax leaves the reads of a failed restore un-awaited; the warnings about them are expected
# (gc.collect() at the end of those tests makes them surface there, not in a later test).
DAMAGE_NOISE = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@DAMAGE_NOISE
def _array_data_files(state_dir):
  """Orbax's OCDBT array data files. Which arrays each holds, and whether a file is referenced
  at all, varies from run to run, so the damages below hit every one of them."""
  return [f for f in _files(state_dir) if os.sep + 'ocdbt.process_' in f and
          os.sep + 'd' + os.sep in f]


@pytest.mark.parametrize('damage', ['truncate_data_files', 'flip_bit_in_data_files',
                                    'delete_tree_metadata', 'delete_meta'])
def test_restore_falls_back_past_damaged_newest(tmp_path, damage):
  state = make_state()
  newest = _save_two(tmp_path, state)
  data_files = _array_data_files(os.path.join(newest, 'state'))
  if damage == 'truncate_data_files':
    assert data_files
    for path in data_files:
      os.truncate(path, os.path.getsize(path) // 2)
  elif damage == 'flip_bit_in_data_files':  # silent on disk: caught by the digests
    assert data_files
    for path in data_files:
      with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
  elif damage == 'delete_tree_metadata':
    os.remove(os.path.join(newest, 'state', '_METADATA'))
  else:
    os.remove(os.path.join(newest, 'meta', 'metadata'))
  saver = ckpt.RunCheckpointer(str(tmp_path))
  with pytest.warns(UserWarning, match='unreadable checkpoint') as warned:
    restored, meta = saver.restore(abstract(state))
  assert meta['step'] == 1
  # One line says it all: what failed, the step it fell back to, where the damaged one went.
  assert len(warned) == 1 and '\n' not in str(warned[0].message)
  assert '; falling back to step 1; moved it to ' in str(warned[0].message)
  assert_trees_equal(restored, state)
  # The damaged step is set aside (not deleted), and the resumed run can save step 2 again.
  assert saver.all_steps() == [1]
  assert len(glob.glob(os.path.join(str(tmp_path), 'checkpoints_unreadable', '2-*'))) == 1
  assert saver.save(2, shifted(state, 2.0), meta_for(2))
  saver.wait()
  restored, meta = saver.restore(abstract(state))
  assert meta['step'] == 2
  assert_trees_equal(restored.params, shifted(state, 2.0).params)
  saver.close()
  gc.collect()


@DAMAGE_NOISE
def test_explicit_damaged_step_and_empty_dir_raise(tmp_path):
  state = make_state()
  newest = _save_two(tmp_path, state)
  os.remove(os.path.join(newest, 'state', '_METADATA'))
  with pytest.raises(ckpt.CheckpointError, match='checkpoints/2: cannot restore'):
    ckpt.RunCheckpointer(str(tmp_path), read_only=True).restore(abstract(state), step=2)
  with pytest.raises(ckpt.CheckpointError, match='no checkpoint to restore'):
    ckpt.RunCheckpointer(str(tmp_path / 'fresh')).restore(abstract(state))
  gc.collect()


def test_interrupted_save_is_never_listed(tmp_path):
  """What a kill -9 during an async save leaves behind: a temporary folder, never a step."""
  state = make_state()
  _save_two(tmp_path, state)
  partial = os.path.join(str(tmp_path), 'checkpoints', '3.orbax-checkpoint-tmp-1234567')
  os.makedirs(os.path.join(partial, 'state'))
  saver = ckpt.RunCheckpointer(str(tmp_path))
  assert saver.latest_step() == 2
  _, meta = saver.restore(abstract(state))
  assert meta['step'] == 2
  saver.close()


def test_async_save_is_unaffected_by_donation(tmp_path):
  state = {'w': jnp.arange(4 * 65536, dtype=jnp.float32).reshape(4, -1),
           'step': jnp.arange(4, dtype=jnp.int32)}
  expected = jax.tree.map(np.array, state)
  update = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 - 7, s), donate_argnums=0)
  with ckpt.RunCheckpointer(str(tmp_path)) as saver:
    saver.save(1, state, {'step': 1})
    state = update(update(state))  # overwrites the donated buffers while the write may run
    saver.wait()
    restored, _ = saver.restore(abstract(expected))
  assert_trees_equal(restored, expected)


def test_read_leaf_reads_one_branch_and_layer(tmp_path):
  state = make_state(num_branches=3)
  with ckpt.RunCheckpointer(str(tmp_path)) as saver:
    saver.save(1, state, meta_for(1))
  pure = nnx.to_pure_dict(state.params)
  got = ckpt.read_leaf(str(tmp_path), ('layers', 'q_proj'), branch=2, layer=1)
  np.testing.assert_array_equal(got, np.asarray(pure['layers']['q_proj'])[2, 1])
  np.testing.assert_array_equal(ckpt.read_leaf(str(tmp_path), ('embed',), branch=0),
                                np.asarray(pure['embed'])[0])
  source = ckpt.open_source(str(tmp_path))
  assert source.kind == 'run' and source.num_branches == 3
  assert source.shapes['layers']['q_proj'] == (2, 16, 2, 8)
  with pytest.raises(ckpt.CheckpointError, match='branch 3 is out of range'):
    source.read(('embed',), branch=3)


def test_params_checkpoint_roundtrip_and_atomic_write(tmp_path, monkeypatch):
  params = jax.tree.map(lambda x: np.asarray(x)[0], nnx.to_pure_dict(branch_params(1)))
  tok_dir = str(tmp_path / 'tok')
  char_tokenizer().save_pretrained(tok_dir)
  out = str(tmp_path / 'merged')
  ckpt.save_params_checkpoint(out, params, {'model_config': dataclasses.asdict(TINY), 'x': 1},
                              tokenizer_dir=tok_dir)
  got, meta = ckpt.load_params_checkpoint(out)
  assert meta['x'] == 1
  assert_trees_equal(got, params)
  assert os.path.isfile(os.path.join(out, 'tokenizer', 'tokenizer.json'))
  with pytest.raises(ckpt.CheckpointError, match='already exists'):
    ckpt.save_params_checkpoint(out, params, {'model_config': dataclasses.asdict(TINY)})
  # A write that dies midway leaves neither the target nor a complete-looking folder.
  def boom(*a, **k):
    raise OSError('disk full')
  monkeypatch.setattr(params_checkpoint.shutil, 'copy', boom)
  other = str(tmp_path / 'other')
  with pytest.raises(OSError):
    ckpt.save_params_checkpoint(other, params, {'model_config': dataclasses.asdict(TINY)},
                                tokenizer_dir=tok_dir)
  assert not os.path.exists(other)


def test_load_params_for_inference_from_every_kind(tmp_path):
  state = make_state(num_branches=2)
  tok_dir = str(tmp_path / 'tok')
  char_tokenizer().save_pretrained(tok_dir)
  workdir = str(tmp_path / 'run')
  with ckpt.RunCheckpointer(workdir) as saver:
    saver.save(3, state, meta_for(3, tokenizer_dir=tok_dir))
  pure = nnx.to_pure_dict(state.params)
  config, params, tokenizer = ckpt.load_params_for_inference(workdir, branch=1)
  assert config == TINY and tokenizer == tok_dir
  assert_trees_equal(params, jax.tree.map(lambda x: np.asarray(x)[1], pure))
  step_dir = os.path.join(workdir, 'checkpoints', '3')
  _, params0, _ = ckpt.load_params_for_inference(step_dir, branch=0)
  assert_trees_equal(params0, jax.tree.map(lambda x: np.asarray(x)[0], pure))
  with pytest.raises(ckpt.CheckpointError, match='has 2 branches'):
    ckpt.load_params_for_inference(workdir)
  hf_dir = str(tmp_path / 'hf')
  hf_io.save_hf_folder(params, TINY, hf_dir, tokenizer_from=tok_dir)
  config, hf_params, tokenizer = ckpt.load_params_for_inference(hf_dir)
  assert config == TINY and tokenizer == hf_dir
  assert_trees_equal(hf_params, params)
  with pytest.raises(ckpt.CheckpointError, match='not a checkpoint'):
    ckpt.load_params_for_inference(str(tmp_path))


def test_digests_see_one_bit_and_ignore_the_sharding():
  from copd_jax import digests
  state = make_state()
  saved = digests.tree_digests(state)
  assert len(saved) == len(jax.tree.leaves(state))   # every leaf, PRNG keys included
  assert digests.mismatches(saved, state) == []
  # The same values on an 8-device mesh (another sharding, another reduction order).
  mesh = make_mesh({'branch': 2, 'fsdp': 4}, num_branches=2)
  sharded = jax.device_put(state.params, state_shardings(state.params, mesh, branch_stacked=True))
  assert digests.mismatches(saved, state._replace(params=sharded)) == []
  # One flipped bit in one weight, and two swapped values, are both seen, in that leaf only.
  name, leaf = next((n, x) for n, x in zip(saved, jax.tree.leaves(state.params)) if x.ndim >= 2)
  bits = np.asarray(leaf).view(np.uint32).copy()
  bits.flat[5] ^= 1 << 30
  flipped = jax.tree.map(lambda x: jnp.asarray(bits.view(np.float32)) if x is leaf else x, state)
  assert digests.mismatches(saved, flipped) == [name]
  swapped = np.asarray(leaf).copy()
  swapped.flat[[0, 1]] = swapped.flat[[1, 0]]
  moved = jax.tree.map(lambda x: jnp.asarray(swapped) if x is leaf else x, state)
  assert digests.mismatches(saved, moved) == [name]


def test_per_branch_digests_add_up_to_the_whole_leaf():
  from copd_jax import digests
  state = make_state(num_branches=3)
  saved = digests.tree_digests(state, per_branch=lambda name: name.startswith('params/'))
  plain = digests.tree_digests(state)
  assert {n: r['digest'] for n, r in saved.items()} == {n: r['digest'] for n, r in plain.items()}
  pure = nnx.to_pure_dict(state.params)
  record = saved['params/layers/q_proj/value']
  q = np.asarray(pure['layers']['q_proj'])
  assert record['branches'] == [digests.array_digest(q[k]) for k in range(3)]
  assert 'branches' not in saved['step'] and record['digest'] == digests.array_digest(q)
  # Blocks of one branch, read in any order, add up to that branch's digest.
  words = digests.host_words(q[1])
  coverage = digests.Coverage(words.shape)
  got = [coverage.add(((layer, layer + 1), (0, 16), (h, h + 1), (0, 8)),
                      digests.region_digest(words[layer:layer + 1, :, h:h + 1],
                                            (layer, 0, h, 0), words.shape))
         for layer in (1, 0) for h in (0, 1)]
  assert got[:3] == [None] * 3 and got[3] == record['branches'][1]
  overlapping = digests.Coverage(words.shape)
  for region in [((0, 1), (0, 16), (0, 2), (0, 8)), ((0, 2), (0, 16), (0, 1), (0, 8)),
                 ((1, 2), (0, 16), (0, 2), (0, 8))]:
    assert overlapping.add(region, [0, 0]) is None   # never claims a verified array


def _edit_meta(step_dir, edit):
  path = os.path.join(step_dir, 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  with open(path, 'w') as f:
    json.dump(meta, f)


def test_params_source_checks_whole_and_streamed_reads_against_the_digests(tmp_path):
  state = make_state(num_branches=2)
  with ckpt.RunCheckpointer(str(tmp_path)) as saver:
    saver.save(1, state, meta_for(1))
  step_dir = os.path.join(str(tmp_path), 'checkpoints', '1')
  pure = nnx.to_pure_dict(state.params)
  source = ckpt.open_source(str(tmp_path))
  assert len(source._expected) == len(source.leaf_paths())
  assert_trees_equal(source.read_all(1), jax.tree.map(lambda x: np.asarray(x)[1], pure))

  # What a flipped bit in branch 1 of q_proj looks like to the reader: another digest.
  def corrupt(meta):
    meta[ckpt.DIGESTS]['params/layers/q_proj/value']['branches'][1][0] ^= 1 << 7
  _edit_meta(step_dir, corrupt)
  source = ckpt.open_source(str(tmp_path))
  source.read_all(0)                                       # branch 0 is intact
  with pytest.raises(ckpt.DigestMismatch) as raised:
    source.read_all(1)
  assert str(raised.value) == (f'{step_dir}: tensor layers.q_proj of branch 1 differs from the '
                               'digest saved with it (corrupted on disk)')
  # Streamed by layer and block: one piece alone passes; the piece that completes the tensor
  # raises; reading it again in pieces raises again.
  for attempt in range(2):
    source.read(('layers', 'q_proj'), 1, 0)
    source.read(('layers', 'q_proj'), 1, 1, (slice(0, 9),))
    with pytest.raises(ckpt.DigestMismatch, match='layers.q_proj of branch 1'):
      source.read(('layers', 'q_proj'), 1, 1, (slice(9, None),))
  # A checkpoint without digests (written before they existed) is read without a check.
  _edit_meta(step_dir, lambda meta: meta.pop(ckpt.DIGESTS))
  source = ckpt.open_source(str(tmp_path))
  assert source._expected == {}
  assert_trees_equal(source.read_all(1), jax.tree.map(lambda x: np.asarray(x)[1], pure))
  _, params, _ = ckpt.load_params_for_inference(step_dir, branch=1)
  assert_trees_equal(params, jax.tree.map(lambda x: np.asarray(x)[1], pure))


def test_params_checkpoint_carries_digests_and_refuses_changed_bits(tmp_path):
  from copd_jax import digests
  params = jax.tree.map(lambda x: np.asarray(x)[0], nnx.to_pure_dict(branch_params(1)))
  out = str(tmp_path / 'merged')
  ckpt.save_params_checkpoint(out, params, {'model_config': dataclasses.asdict(TINY)})
  meta = ckpt.read_meta(out)
  assert meta[ckpt.DIGESTS]['layers/up_proj']['digest'] == digests.array_digest(
      params['layers']['up_proj'])
  assert len(meta[ckpt.DIGESTS]) == len(jax.tree.leaves(params))
  def corrupt(meta):
    meta[ckpt.DIGESTS]['layers/up_proj']['digest'][1] += 1
  _edit_meta(out, corrupt)
  with pytest.raises(ckpt.DigestMismatch, match=f'^{out}: tensor layers.up_proj differs'):
    ckpt.load_params_checkpoint(out)
  source = ckpt.open_source(out)                # per layer: the second layer completes it
  source.read(('layers', 'up_proj'), None, 0)
  with pytest.raises(ckpt.DigestMismatch):
    source.read(('layers', 'up_proj'), None, 1)
