"""Merge methods against hand-computed numpy, the streaming merge against plain Orbax reads,
input checks, and the merged model exported to Hugging Face against transformers' logits."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax.checkpoint import source as checkpoint_source
from copd_jax import merge as mg
from copd_jax.__main__ import main
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3
from copd_jax.models.tokenizer import char_tokenizer
from tests.test_checkpoint import TINY, branch_params

K = 3


def _unstack(tree, k):
  return jax.tree.map(lambda x: np.asarray(x)[k], tree)


def make_run(root, name, *, config=TINY, num_branches=K, seed=0, tokenizer_dir=None, base=None):
  """A run workdir holding one checkpoint of K branches; returns (workdir, pure params [K,...])."""
  params = branch_params(num_branches, config, seed)
  workdir = os.path.join(str(root), name)
  meta = ckpt.run_meta(cycle=2, phase='opd', step=10, model_config=config,
                       tokenizer_dir=tokenizer_dir, base_params=base, config={})
  with ckpt.RunCheckpointer(workdir) as saver:
    saver.save(10, {'params': params, 'step': jnp.zeros((num_branches,), jnp.int32)}, meta)
  return workdir, nnx.to_pure_dict(params)


def make_base(root, seed=9, config=TINY):
  base = _unstack(nnx.to_pure_dict(branch_params(1, config, seed)), 0)
  path = os.path.join(str(root), f'base{seed}')
  ckpt.save_params_checkpoint(path, base, {ckpt.META_MODEL_CONFIG: dataclasses.asdict(config)})
  return path, base


def assert_close_trees(got, want, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=atol, rtol=0)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('merge')
  tok = os.path.join(str(root), 'tok')
  char_tokenizer().save_pretrained(tok)
  base_path, base = make_base(root)
  workdir, params = make_run(root, 'run', tokenizer_dir=tok, base=base_path)
  return dict(root=root, tok=tok, workdir=workdir, params=params, base_path=base_path, base=base)


# ---------------------------------------------------------------------------------------------
# Leaf functions
# ---------------------------------------------------------------------------------------------

def test_ties_matches_hand_computed_example():
  base = np.array([1.0, -1.0, 0.5, 0.0, 2.0], np.float32)
  tau = np.array([[3.0, -1.0, 2.5, 2.0, -4.0],     # top-3 |.|: -4, 3, 2.5
                  [1.5, 2.0, -3.0, -0.2, -1.0]],   # top-3 |.|: -3, 2, 1.5
                 np.float32)
  # trimmed: [3, 0, 2.5, 0, -4] and [1.5, 2, -3, 0, 0]; summed [4.5, 2, -0.5, 0, -4] elects
  # signs [+, +, -, none, -]; disjoint means [(3+1.5)/2, 2, -3, 0, -4].
  merged = np.array([2.25, 2.0, -3.0, 0.0, -4.0], np.float32)
  got = mg.ties(base + tau, base, density=0.6, lam=0.5)
  np.testing.assert_allclose(got, base + 0.5 * merged, atol=1e-6)
  np.testing.assert_allclose(mg.ties(base + tau, base, density=0.6, lam=1.0), base + merged,
                             atol=1e-6)


def test_task_arithmetic_weighted_and_dare_reduce_to_the_mean():
  rng = np.random.default_rng(0)
  thetas = rng.standard_normal((3, 4, 5)).astype(np.float32)
  base = rng.standard_normal((4, 5)).astype(np.float32)
  np.testing.assert_allclose(mg.task_arithmetic(thetas, base, 1.0), mg.mean(thetas), atol=1e-6)
  np.testing.assert_array_equal(mg.task_arithmetic(thetas, base, 0.0), base)
  np.testing.assert_allclose(mg.weighted(thetas, [2, 2, 2]), mg.mean(thetas), atol=1e-6)
  np.testing.assert_allclose(mg.weighted(thetas, [1, 0, 3]), 0.25 * thetas[0] + 0.75 * thetas[2],
                             atol=1e-6)
  np.testing.assert_allclose(mg.dare(thetas, base, density=1.0), mg.mean(thetas), atol=1e-6)
  dropped = mg.dare(thetas, base, density=0.5, rng=np.random.default_rng(1))
  assert not np.allclose(dropped, mg.mean(thetas))
  with pytest.raises(mg.MergeError, match='--weights'):
    mg.weighted(thetas, [1, 1])


# ---------------------------------------------------------------------------------------------
# Streaming merge
# ---------------------------------------------------------------------------------------------

def test_mean_merge_equals_mean_of_branches_read_with_plain_orbax(run, tmp_path):
  out = str(tmp_path / 'merged')
  result = mg.merge_checkpoints(run['workdir'], out=out)
  state_dir = os.path.join(run['workdir'], 'checkpoints', '10', 'state')
  restored = ocp.StandardCheckpointer().restore(state_dir)
  branches = jax.tree.map(np.asarray, restored['params'])
  want: dict = {}
  for path, _, leaf in checkpoint_source._variable_leaves(branches):
    ckpt.set_path(want, path, leaf.mean(axis=0))
  assert_close_trees(result.params, want)
  written, meta = ckpt.load_params_checkpoint(out)
  assert_close_trees(written, want)
  assert meta['merge']['method'] == 'mean' and len(meta['merge']['inputs']) == K
  assert meta[ckpt.META_MODEL_CONFIG] == dataclasses.asdict(TINY)


def test_task_arithmetic_lambda_one_is_the_mean_and_base_defaults_to_the_runs(run):
  mean = mg.merge_checkpoints(run['workdir']).params
  ta = mg.merge_checkpoints(run['workdir'], 'task_arithmetic', lam=1.0)  # base from run meta
  assert ta.meta['base_params'] == run['base_path']
  assert_close_trees(ta.params, mean)
  half = mg.merge_checkpoints(run['workdir'], 'task_arithmetic', base=run['base_path'], lam=0.5)
  assert_close_trees(half.params, jax.tree.map(lambda b, m: b + 0.5 * (m - b), run['base'], mean))


def test_ties_merge_trims_per_layer_tensor(run):
  got = mg.merge_checkpoints(run['workdir'], 'ties', density=0.3, lam=0.8).params
  thetas = np.asarray(run['params']['layers']['gate_proj'])  # [K, L, D, F]
  base = run['base']['layers']['gate_proj']
  for layer in range(TINY.num_layers):
    want = mg.ties(thetas[:, layer], base[layer], density=0.3, lam=0.8)
    np.testing.assert_allclose(got['layers']['gate_proj'][layer], want, atol=1e-6)
  want_embed = mg.ties(np.asarray(run['params']['embed']), run['base']['embed'], 0.3, 0.8)
  np.testing.assert_allclose(got['embed'], want_embed, atol=1e-6)


def test_blocked_merge_equals_whole_tensor_merge_with_hf_base(run, tmp_path):
  hf_base = str(tmp_path / 'base_hf')
  hf_io.save_hf_folder(run['base'], TINY, hf_base)
  models = mg.resolve_models(run['workdir'])
  recipe = mg.MergeRecipe('task_arithmetic', lam=0.7)
  base = ckpt.open_source(hf_base)
  whole = mg.merge_models(models, recipe, base)
  blocked = mg.merge_models(models, recipe, base, block_bytes=256)  # many blocks per tensor
  assert mg._blocks((16, 64), 'mean', 256) == [(slice(None), slice(i, i + 4))
                                               for i in range(0, 64, 4)]
  assert_close_trees(blocked, whole, atol=0)
  want = jax.tree.map(lambda b, x: b + 0.7 * (np.asarray(x) - b).mean(0), run['base'],
                      run['params'])
  assert_close_trees(whole, want, atol=1e-6)


def _corrupt_digest(step_dir, name, branch=None):
  """Changes one saved digest in the meta: what a flipped bit on disk looks like to a reader."""
  path = os.path.join(step_dir, 'meta', 'metadata')
  with open(path) as f:
    meta = json.load(f)
  record = meta[ckpt.DIGESTS][name]
  (record['digest'] if branch is None else record['branches'][branch])[0] ^= 1
  with open(path, 'w') as f:
    json.dump(meta, f)


def test_streaming_merge_verifies_every_tensor_it_reads(run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(run['workdir'], workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '10')
  _corrupt_digest(step_dir, 'params/layers/down_proj/value', branch=2)
  out = str(tmp_path / 'merged')
  with pytest.raises(ckpt.DigestMismatch,
                     match=f'^{step_dir}: tensor layers.down_proj of branch 2 differs'):
    mg.merge_checkpoints(workdir, out=out)
  assert not os.path.exists(out)
  models = mg.resolve_models(workdir)  # in blocks of layers: the last block of the last layer
  with pytest.raises(ckpt.DigestMismatch, match='layers.down_proj of branch 2'):
    mg.merge_models(models, mg.MergeRecipe('mean'), block_bytes=256)
  # A params-only base is verified too (merge_checkpoints's output carries digests).
  base = str(tmp_path / 'base')
  shutil.copytree(run['base_path'], base)
  _corrupt_digest(base, 'final_norm')
  with pytest.raises(ckpt.DigestMismatch, match=f'^{base}: tensor final_norm differs'):
    mg.merge_checkpoints(run['workdir'], 'task_arithmetic', base=base)


def test_branch_selectors(run):
  got = mg.merge_checkpoints([f'{run["workdir"]}:0', f'{run["workdir"]}:2']).params
  want = jax.tree.map(lambda x: (np.asarray(x)[0] + np.asarray(x)[2]) / 2, run['params'])
  assert_close_trees(got, want)
  with pytest.raises(mg.MergeError, match='branch 5 is out of range'):
    mg.merge_checkpoints([f'{run["workdir"]}:0', f'{run["workdir"]}:5'])


# ---------------------------------------------------------------------------------------------
# Mismatching inputs
# ---------------------------------------------------------------------------------------------

def test_mismatching_architecture_tokenizer_and_shapes_are_named(run, tmp_path, capsys):
  wide = dataclasses.replace(TINY, intermediate_size=48)
  other, _ = make_run(tmp_path, 'wide', config=wide, num_branches=1, tokenizer_dir=run['tok'])
  with pytest.raises(mg.MergeError, match=r'model_config.intermediate_size is 32 in .* but 48'):
    mg.merge_checkpoints([run['workdir'], other])

  tok2 = str(tmp_path / 'tok2')
  tokenizer = char_tokenizer()
  tokenizer.chat_template = '{{ messages[0]["content"] }}'
  tokenizer.save_pretrained(tok2)
  other_tok, _ = make_run(tmp_path, 'tok2run', num_branches=1, tokenizer_dir=tok2)
  with pytest.raises(mg.MergeError, match=r'tokenizer file \S+ of .* are not the same'):
    mg.merge_checkpoints([f'{run["workdir"]}:0', other_tok])

  bad = jax.tree.map(np.copy, run['base'])
  bad['layers']['q_norm'] = np.ones((TINY.num_layers, 4), np.float32)
  bad_path = str(tmp_path / 'bad')
  ckpt.save_params_checkpoint(bad_path, bad, {ckpt.META_MODEL_CONFIG: dataclasses.asdict(TINY)})
  with pytest.raises(mg.MergeError, match=r'tensor layers.q_norm has shape \(2, 8\) in .* but '
                                          r'\(2, 4\)'):
    mg.merge_checkpoints([f'{run["workdir"]}:0', bad_path])

  code = main(['merge', '--inputs', run['workdir'], other, '--out', str(tmp_path / 'x')])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('error: merge inputs differ: model_config.')
  assert len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / 'x')


def test_base_is_required_for_ties_without_a_recorded_base(tmp_path):
  workdir, _ = make_run(tmp_path, 'nobase', num_branches=2)
  with pytest.raises(mg.MergeError, match='--base: required for --method ties'):
    mg.merge_checkpoints(workdir, 'ties')


# ---------------------------------------------------------------------------------------------
# Hugging Face export
# ---------------------------------------------------------------------------------------------

def _copd_logits(params, tokens):
  model = nnx.eval_shape(lambda: Qwen3(TINY, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return np.asarray(model(jnp.asarray(tokens))[0])


def _hf_logits(folder, tokens):
  import torch
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_merged_and_branch_exports_load_in_transformers(run, tmp_path, capsys):
  import transformers
  out, hf = str(tmp_path / 'merged'), str(tmp_path / 'merged_hf')
  assert main(['merge', '--workdir', run['workdir'], '--out', out, '--hf-out', hf]) == 0
  assert main(['export-hf', '--checkpoint', run['workdir'], '--branch', '1',
               '--out', str(tmp_path / 'b1')]) == 0
  assert main(['export-hf', '--checkpoint', out, '--out', str(tmp_path / 'm2')]) == 0
  capsys.readouterr()

  tokens = np.array([[1, 17, 30, 5, 44, 63, 2, 9], [1, 3, 3, 60, 12, 8, 40, 21]])
  merged, _ = ckpt.load_params_checkpoint(out)
  want = _copd_logits(merged, tokens)
  np.testing.assert_allclose(_hf_logits(hf, tokens), want, atol=1e-4, rtol=0)
  np.testing.assert_allclose(_hf_logits(str(tmp_path / 'm2'), tokens), want, atol=1e-4, rtol=0)
  branch1 = _copd_logits(_unstack(run['params'], 1), tokens)
  np.testing.assert_allclose(_hf_logits(str(tmp_path / 'b1'), tokens), branch1, atol=1e-4, rtol=0)
  assert not np.allclose(branch1, want, atol=1e-3)  # the merge is not just one branch

  tokenizer = transformers.AutoTokenizer.from_pretrained(hf)
  assert tokenizer('a=1').input_ids == char_tokenizer()('a=1').input_ids
  config = transformers.AutoConfig.from_pretrained(hf)
  assert config.eos_token_id == char_tokenizer().eos_token_id
  assert main(['merge', '--workdir', run['workdir'], '--out', out]) == 2  # exists
