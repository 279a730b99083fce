"""Scale-out: the CoPD driver as a JAX multi-controller program, and sampling in its own layout.

Slow tests launch real processes on this machine through the CLI's own multi-host path
(JAX_COORDINATOR_ADDRESS / JAX_PROCESS_COUNT / JAX_PROCESS_ID -> distributed.maybe_initialize,
a localhost coordinator, gloo CPU collectives): two processes with 4 CPU devices each run the tiny
driver config on a (branch=2, fsdp=4) mesh over the 8 global devices, and are compared with one
process holding all 8 devices. The fast test checks that `config.mesh_sampling` layouts sample
the same tokens as the training layout.
"""
import collections
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copd_jax import checkpoint as ckpt
from copd_jax import mesh as mesh_lib
from copd_jax.config import read_config
from copd_jax.data import synthetic_domain
from copd_jax.metrics import read_metrics
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.tokenizer import char_tokenizer, char_vocab_size
from copd_jax.rollouts import PromptEncoder, sample_and_score
from copd_jax.run_setup import load_domains
from copd_jax.sampling import SamplingParams
from copd_jax.steps import branch_state_shardings, init_branch_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/test_driver.py's tiny run, one RL and one OPD step, on a (branch=2, fsdp=4) mesh.
TINY = [
    '--config.copd.num_cycles=1', '--config.copd.s_rl=1', '--config.copd.s_opd=1',
    '--config.warmstart.steps=30', '--config.grpo.prompts_per_step=2', '--config.grpo.group_size=4',
    '--config.opd.prompts_per_step=2', '--config.opd.samples_per_prompt=2',
    '--config.sampling.max_new_tokens=6', '--config.eval.num_examples=4',
    '--config.eval.samples_k=2', '--config.checkpoint.every_steps=1',
    '--config.domains.reverse.num_train=200',
    '--config.domains.sort.num_train=200', '--config.domains.reverse.num_eval=8',
    '--config.domains.sort.num_eval=8', '--config.model.toy.hidden_size=32',
    '--config.model.toy.intermediate_size=64', '--config.mesh.branch=2', '--config.mesh.fsdp=4',
    # Evaluation during training after each step, and rewards that log which process scored
    # which row ('exact' otherwise; $COPD_TEST_REWARD_LOG, set per run by run_processes).
    '--config.eval.every_steps=1',
    '--config.domains.count.reward=tests.reward_functions:exact_logging_rows',
    '--config.domains.sort.reward=tests.reward_functions:exact_logging_rows',
]
SAMPLING_TENSOR = ['--config.mesh_sampling.branch=2', '--config.mesh_sampling.fsdp=1',
                   '--config.mesh_sampling.tensor=4']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'COPD_JAX_'))}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', **extra)
  return env


def _command(workdir, extra=()):
  return [sys.executable, '-m', 'copd_jax', 'train', '--config', 'configs/toy_copd.py',
          '--workdir', str(workdir), '--no-progress', *TINY, *extra]


def run_processes(workdir, num_processes: int, extra=()) -> list[str]:
  """The tiny run on `num_processes` processes of 8 // num_processes devices; their outputs."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    dist_env = {} if num_processes == 1 else dict(
        JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_PROCESS_COUNT=str(num_processes),
        JAX_PROCESS_ID=str(i))
    dist_env['COPD_TEST_REWARD_LOG'] = str(workdir) + '.reward_rows'
    procs.append(subprocess.Popen(_command(workdir, extra), cwd=ROOT,
                                  env=_env(8 // num_processes, **dist_env),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-4000:]}'
  return outputs


def final_params(workdir):
  source = ckpt.open_source(str(workdir))
  return {k: dict(ckpt.flatten_paths(source.read_all(k))) for k in range(source.num_branches)}


def scored_rows(workdir) -> list[collections.Counter]:
  """Per process, the rows its reward calls scored ((domain, id, completion) -> count)."""
  out = []
  for i in range(2):
    path = f'{workdir}.reward_rows.{i}'
    if os.path.exists(path):
      with open(path) as f:
        out.append(collections.Counter(tuple(json.loads(line)) for line in f))
  return out


def eval_ids() -> set[str]:
  """Ids of the examples the evaluations score (each domain's first eval.num_examples)."""
  config = read_config(os.path.join(ROOT, 'configs', 'toy_copd.py'), TINY)
  return {e.id for _, held_out in load_domains(config).values()
          for e in held_out[:config.eval.num_examples]}


def comparable_metrics(workdir):
  return [{k: v for k, v in r.items() if 'seconds' not in k} for r in read_metrics(workdir)]


# Why not bitwise: the 8 devices and the compiled program are the same, but on several processes
# XLA:CPU runs the 'fsdp' all-reduces through gloo, which sums in another order (last-bit
# differences, e.g. one ulp in a step-0 entropy). In this tiny run the branches are still equal to
# the base at the OPD step, so its loss and gradients are rounding noise (~1e-7), and Adam's
# first update is about lr * sign(gradient) per element: params may then differ by up to
# 2 * lr per update. Everything sampled (tokens -> rewards, lengths) must be identical.
LR, UPDATES = 3e-4, 2


def assert_same_run(workdir, reference) -> None:
  ours_m, theirs_m = ours, theirs = comparable_metrics(workdir), comparable_metrics(reference)
  assert [r['step'] for r in ours] == [r['step'] for r in theirs]
  for a, b in zip(ours, theirs):
    assert a.keys() == b.keys()
    for key in a:
      if '/reward/' in key or '/length/' in key or key in ('cycle', 'phase_is_opd'):
        assert a[key] == b[key], key
      else:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)
  mine, ref = final_params(workdir), final_params(reference)
  for k in ref:
    for path, value in ref[k].items():
      np.testing.assert_allclose(mine[k][path], value, rtol=0, atol=2 * LR * UPDATES,
                                 err_msg=f'branch {k} {path}')
  ours, theirs = (json.loads((w / 'eval.json').read_text())['results']
                  for w in (workdir, reference))
  assert ours.keys() == theirs.keys() and ours['base'] == theirs['base']
  # The evaluation during training at step 0, when every branch still equals the base (its
  # GRPO batch has no reward spread here, so no update), equals the one-process one exactly.
  first = [{k: v for k, v in r.items() if k.startswith('eval/')} for r in (ours_m[0], theirs_m[0])]
  assert first[0] and first[0] == first[1]


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_process')
  return workdir, run_processes(workdir, 1)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two_processes')
  return workdir, run_processes(workdir, 2)


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_all_devices(one_process, two_processes):
  (ref, _), (workdir, (out0, out1)) = one_process, two_processes
  # Process 0 alone logs, writes metrics (one line per step, one TensorBoard writer) and the
  # evaluation; process 1 stays silent.
  assert '| merged:mean |' in out0 and 'merged model (mean) written' in out0
  assert '| merged:mean |' not in out1 and 'warm start' not in out1
  assert [r['step'] for r in read_metrics(workdir)] == [0, 1]
  assert len(os.listdir(workdir / 'tensorboard')) == 1
  assert (workdir / 'merged_hf' / 'config.json').exists()
  assert_same_run(workdir, ref)
  # Each process decoded and scored only the rows of its own devices (here one branch each):
  # in training, together exactly the rows that one process scored. (The final evaluation of
  # the branches and the merge samples from parameters that differ by rounding noise, so its
  # completions, and which of them have an answer to score, may differ.)
  (alone,), mine = scored_rows(ref), scored_rows(workdir)
  evals = eval_ids()
  training = lambda rows: collections.Counter({r: n for r, n in rows.items() if r[1] not in evals})
  assert len(mine) == 2 and all(training(m) for m in mine)
  assert training(mine[0]) + training(mine[1]) == training(alone)
  # Evaluations included, each process scored about half of the rows, not all of them.
  assert all(sum(m.values()) < 0.6 * sum(alone.values()) for m in mine)


@pytest.mark.slow
def test_two_processes_sampling_in_a_tensor_parallel_layout(two_processes, tmp_path):
  # config.mesh_sampling (branch=2, fsdp=1, tensor=4): heads and mlp split over 4 devices while
  # sampling, instead of whole weights on every device of the (branch=2, fsdp=4) training mesh.
  reference, _ = two_processes
  workdir = tmp_path / 'sampling_layout'
  run_processes(workdir, 2, SAMPLING_TENSOR)
  assert_same_run(workdir, reference)


# (branch=1, fsdp=8): both branches on every device. GRPO's 2 x 4 rows split over 'fsdp', but
# OPD's 2 x 2 = 4 distillation rows do not (they are replicated), so the two processes hold the
# same distillation rows and must split them (distributed.process_shares); the top-k probe's
# output is replicated too, and its metrics are summed per process (copd_jax/probe_metrics.py).
ROWS_NOT_SPLIT_BY_FSDP = ['--config.mesh.branch=1', '--config.mesh.fsdp=8']


@pytest.mark.slow
def test_two_processes_split_rows_that_fsdp_does_not_divide(tmp_path):
  reference, workdir = tmp_path / 'one_process', tmp_path / 'two_processes'
  run_processes(reference, 1, ROWS_NOT_SPLIT_BY_FSDP)
  run_processes(workdir, 2, ROWS_NOT_SPLIT_BY_FSDP)
  assert_same_run(workdir, reference)   # the probe's metrics included, rtol 1e-5
  opd_step = read_metrics(workdir)[1]
  assert opd_step['phase_is_opd'] == 1.0
  assert any(k.startswith('behaviour/overlap_top') for k in opd_step)
  # Every training row (the distillation rows included) scored by exactly one process: together
  # exactly the one process's rows, each process about half.
  (alone,), mine = scored_rows(reference), scored_rows(workdir)
  evals = eval_ids()
  training = lambda rows: collections.Counter({r: n for r, n in rows.items() if r[1] not in evals})
  assert len(mine) == 2 and training(mine[0]) + training(mine[1]) == training(alone)
  total = sum(training(alone).values())
  assert all(0.4 * total <= sum(training(m).values()) <= 0.6 * total for m in mine)


# ----------------------------------------------------------------------------- sampling layout

@pytest.fixture(scope='module')
def training_layout_samples():
  """Two distinct branches in the training layout (branch=2, fsdp=4; embed split over fsdp), the
  sampler's inputs, and what it samples on that mesh: the reference every layout must match."""
  cfg = Qwen3Config(vocab_size=char_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, intermediate_size=64, rope_theta=10_000.0,
                    tie_word_embeddings=True, max_position_embeddings=128)
  graphdef, base = nnx.split(Qwen3(cfg, rngs=nnx.Rngs(0), init_std=0.3))
  train_mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  state = init_branch_state(graphdef, base, 2, optax.sgd(0.1), train_mesh, seed=0)
  scale = lambda x: x * (1.0 + 0.1 * jnp.arange(2).reshape((2,) + (1,) * (x.ndim - 1)))
  params = jax.device_put(jax.tree.map(scale, state.params),
                          branch_state_shardings(state, train_mesh).params)
  examples = [synthetic_domain(name, 0, 8, 0)[0] for name in ('count', 'sort')]
  encoder = PromptEncoder(char_tokenizer(), {'count': False, 'sort': False})
  args = (graphdef, params, examples, encoder, SamplingParams(max_new_tokens=8, temperature=1.0),
          jax.random.key(5), {'count': 'exact', 'sort': 'exact'})
  ref = sample_and_score(*args, mesh=train_mesh)
  assert ref.output.completion_mask.sum() > 16   # something was sampled
  return args, list(train_mesh.devices.flat), ref


@pytest.mark.parametrize('layout', [{'branch': 2, 'fsdp': 1, 'tensor': 4},
                                    {'branch': 1, 'fsdp': 8, 'tensor': 1}])
def test_sampling_mesh_samples_the_same_tokens_as_the_training_layout(layout,
                                                                      training_layout_samples):
  args, devices, ref = training_layout_samples
  other = mesh_lib.make_mesh(layout, devices=devices, num_branches=2)
  out = sample_and_score(*args, mesh=other)
  np.testing.assert_array_equal(out.output.tokens, ref.output.tokens)
  np.testing.assert_array_equal(out.output.completion_mask, ref.output.completion_mask)
  np.testing.assert_allclose(out.output.logprobs, ref.output.logprobs, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.rewards, ref.rewards)
