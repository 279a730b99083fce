"""copd_jax.steps: micro-batching, vmapped branches, OPD routing, shardings, retracing, and the
compiled OPD step's cross-branch traffic; plus copd_jax.optim."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from copd_jax import mesh as mesh_lib, optim
from copd_jax.errors import UserInputError
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.scoring import apply_model, sequence_logprobs
from copd_jax.edge_topk import make_edge_topk, next_token_topk
from copd_jax.steps import (TRACE_COUNTS, BranchState, RolloutBatch, StepConfig,
                            branch_state_shardings, init_branch_state, make_grpo_step,
                            make_opd_step, prompt_mismatch, shared_prompt_logprobs,
                            teacher_logprobs)

CONFIG = Qwen3Config(vocab_size=48, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=64)
PROMPT, T = 4, 12


@pytest.fixture(scope='module')
def model():
  """(graphdef, params): random weights drawn with numpy (an eager or jitted init would spend
  seconds compiling), norm scales 1, as Qwen3's own initialiser does."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(CONFIG, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  def draw(v):
    if 'norm' in v.get_metadata()['logical_axes']:
      return v.replace(jnp.ones(v.shape, v.dtype))
    return v.replace(jnp.asarray(0.02 * rng.standard_normal(v.shape), v.dtype))
  params = jax.tree.map(draw, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return graphdef, params


@jax.jit(static_argnums=0)
def _score(graphdef, params, tokens, token_valid, temperature=1.0):
  """Reference teacher-forced log-probs (jitted: eager op-by-op dispatch is slow)."""
  return sequence_logprobs(graphdef, params, tokens, token_valid, temperature).logprobs


def _one_device_mesh():
  return mesh_lib.make_mesh({'branch': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def _batch(seed: int, lead: tuple[int, ...], tokens_len: int = T) -> RolloutBatch:
  """Random rollouts in the sampler's layout: a prompt in columns [0, PROMPT), left-padded by 0 or
  1 token and shared by each pair of adjacent rows (a GRPO group of 2), then completions of
  varying length (right padded)."""
  rng = np.random.default_rng(seed)
  shape = lead + (tokens_len,)
  pairs = lead[:-1] + (lead[-1] // 2,)
  tokens = rng.integers(0, CONFIG.vocab_size, shape).astype(np.int32)
  tokens[..., :PROMPT] = np.repeat(rng.integers(0, CONFIG.vocab_size, pairs + (PROMPT,)), 2, -2)
  left_pad = np.repeat(rng.integers(0, 2, pairs), 2, -1)
  lengths = rng.integers(1, tokens_len - PROMPT + 1, lead)
  pos = np.arange(tokens_len)
  token_valid = (pos < (PROMPT + lengths)[..., None]) & (pos >= left_pad[..., None])
  completion = token_valid & (pos >= PROMPT)
  sampler = np.where(completion, -np.log(CONFIG.vocab_size) + 0.3 * rng.standard_normal(shape), 0)
  adv = np.where(completion, rng.standard_normal(lead)[..., None], 0)
  return RolloutBatch(tokens, token_valid, completion, sampler.astype(np.float32),
                      adv.astype(np.float32))


def _perturbed_stack(params, K: int, seed: int = 1):
  """K different branches: branch k = params + k * small noise (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  def perturb(x):
    x = np.asarray(x)
    scale = np.arange(K, dtype=np.float32).reshape((K,) + (1,) * x.ndim)
    return jnp.asarray(x[None] + 0.05 * scale * rng.standard_normal((K,) + x.shape)
                       .astype(np.float32))
  return jax.tree.map(perturb, params)


def _state(params_stacked, optimizer, mesh):
  """A BranchState from given stacked params, placed in its declared shardings."""
  K = jax.tree.leaves(params_stacked)[0].shape[0]
  state = BranchState(params_stacked, jax.vmap(optimizer.init)(params_stacked),
                      jnp.zeros((K,), jnp.int32),
                      jax.random.key_data(jax.random.split(jax.random.key(0), K)))
  shardings = branch_state_shardings(state, mesh)
  state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)  # the step donates it
  return jax.device_put(state, shardings), shardings


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- numerics
# One-device tests share compiled steps: K = 2 branches of N = 8 rows (an OPD step's combined
# batch of 4 native + 4 distillation rows has the same shape). Gradients are clipped per branch
# (so a norm mixing branches would show) and applied by SGD, so parameters compare gradients.
CFG = dict(temperature=0.8, opd_beta=0.7, opd_clamp=0.05, entropy_coef=0.01)
OPTIMIZER = optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(1.0))


@pytest.fixture(scope='module')
def one_device(model):
  graphdef, params = model
  mesh = _one_device_mesh()
  stacked = _perturbed_stack(params, 2)
  _, sh = _state(stacked, OPTIMIZER, mesh)  # on one device the shardings fit any K
  make = lambda **kw: make_grpo_step(graphdef, OPTIMIZER, mesh, StepConfig(**kw, **CFG), sh)
  return dict(graphdef=graphdef, mesh=mesh, stacked=stacked, sh=sh, grpo=make(),
              grpo_micro=make(num_micro_batches=4, group_size=2, prompt_length=PROMPT))


def test_micro_batched_shared_prompt_step_equals_full_batch_step(one_device):
  """4 micro-batches of whole groups, each group's prompt scored once, against one plain batch."""
  stacked = one_device['stacked']
  batch = _batch(0, (2, 8))
  full, m_full = one_device['grpo'](_state(stacked, OPTIMIZER, one_device['mesh'])[0], batch)
  micro, m_micro = one_device['grpo_micro'](_state(stacked, OPTIMIZER, one_device['mesh'])[0],
                                            batch)
  _assert_trees_close(full.params, micro.params)
  for key in ('loss', 'grad_norm', 'clip_frac_low', 'approx_kl', 'entropy'):
    np.testing.assert_allclose(m_micro[key], m_full[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(m_micro['prompt_mismatch'], 0.0)
  moved = max(np.abs(a - b).max() for a, b in zip(_leaves(full.params), _leaves(stacked)))
  assert moved > 1e-4  # the update is not trivially zero


def test_vmapped_branches_equal_separate_single_branch_steps(one_device):
  stacked, mesh = one_device['stacked'], one_device['mesh']
  batch = _batch(1, (2, 8))
  joint, m_joint = one_device['grpo'](_state(stacked, OPTIMIZER, mesh)[0], batch)
  for k in range(2):
    one = jax.tree.map(lambda x: x[k:k + 1], stacked)
    single, m_single = one_device['grpo'](_state(one, OPTIMIZER, mesh)[0],
                                          jax.tree.map(lambda x: x[k:k + 1], batch))
    _assert_trees_close(single.params, jax.tree.map(lambda x: x[k:k + 1], joint.params))
    for key, value in m_single.items():
      np.testing.assert_allclose(value[0], m_joint[key][k], rtol=1e-5, atol=1e-7, err_msg=key)
  assert np.all(np.asarray(joint.step) == 1)
  assert not np.allclose(m_joint['loss'][0], m_joint['loss'][1])  # the branches really differ
  assert np.all(np.asarray(m_joint['grad_norm']) > 0.05)  # the per-branch clip was active


def test_data_parallel_step_equals_one_device_step(one_device):
  """config.shard_params_over_fsdp = False: rows split over 'fsdp', parameters and optimizer
  state replicated there (and kept so by the step), same update as on one device."""
  stacked = one_device['stacked']
  batch = _batch(2, (2, 8))
  want, _ = one_device['grpo'](_state(stacked, OPTIMIZER, one_device['mesh'])[0], batch)
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  rules = mesh_lib.param_rules(shard_params_over_fsdp=False)
  state = BranchState(stacked, jax.vmap(OPTIMIZER.init)(stacked), jnp.zeros((2,), jnp.int32),
                      jax.random.key_data(jax.random.split(jax.random.key(0), 2)))
  sh = branch_state_shardings(state, mesh, rules)
  state = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), state), sh)
  step = make_grpo_step(one_device['graphdef'], OPTIMIZER, mesh, StepConfig(**CFG), sh)
  got, _ = step(state, batch)
  _assert_trees_close(got.params, want.params)
  assert not _placement_errors(got, sh)
  specs = {leaf.sharding.spec for leaf in jax.tree.leaves(got.params)}
  assert all('fsdp' not in spec for spec in specs), specs   # replicated over 'fsdp'
  assert mesh_lib.param_rules(True) is mesh_lib.DEFAULT_RULES


def test_opd_step_equals_grpo_step_on_combined_batch_with_hand_made_advantages(one_device):
  """Algorithm 1: one update from the native batch plus the distillation rows, whose advantage
  is beta * clamp(log pi_teacher - log pi_student); teacher = the other branch."""
  graphdef, stacked, mesh = one_device['graphdef'], one_device['stacked'], one_device['mesh']
  beta, clamp, temperature = CFG['opd_beta'], CFG['opd_clamp'], CFG['temperature']
  native, distill = _batch(2, (2, 4)), _batch(3, (1, 2, 4))

  # by hand: every student's rows scored by the other branch's parameters
  branch = lambda k: jax.tree.map(lambda x: x[k], stacked)
  deltas = []
  for k in range(2):
    tok, valid = distill.tokens[0, k], distill.token_valid[0, k]
    t_lp = _score(graphdef, branch(1 - k), tok, valid, temperature)
    s_lp = _score(graphdef, branch(k), tok, valid, temperature)
    deltas.append(np.asarray(t_lp - s_lp) * distill.completion_mask[0, k])
  deltas = np.stack(deltas)
  combined = RolloutBatch(*(np.concatenate([n, d[0]], axis=1)
                            for n, d in zip(native[:5], distill[:5])))
  combined = combined._replace(advantages=np.concatenate(
      [native.advantages, beta * np.clip(deltas, -clamp, clamp)], axis=1).astype(np.float32))
  assert np.abs(deltas).max() > clamp  # the clamp matters here

  expect, m_expect = one_device['grpo'](_state(stacked, OPTIMIZER, mesh)[0], combined)
  opd = make_opd_step(graphdef, OPTIMIZER, mesh, StepConfig(num_micro_batches=2, **CFG),
                      one_device['sh'], ((1, 0),))
  got, m_got = opd(_state(stacked, OPTIMIZER, mesh)[0], native, distill)
  _assert_trees_close(got.params, expect.params, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m_got['loss'], m_expect['loss'], rtol=1e-5)
  count = distill.completion_mask[0].sum(axis=(1, 2))
  np.testing.assert_allclose(m_got['opd_delta_mean'], deltas.sum(axis=(1, 2)) / count,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m_got['opd_delta_abs_mean'],
                             np.abs(deltas).sum(axis=(1, 2)) / count, rtol=1e-4)


def test_teacher_logprobs_route_rows_and_mask_idle_students(model):
  graphdef, params = model
  mesh = _one_device_mesh()
  stacked = _perturbed_stack(params, 3)
  distill = _batch(4, (2, 3, 2))
  rounds = np.array([[2, -1, 1], [-1, 0, -1]])  # 0<-2, 2<-1 ; 1<-0
  got = jax.jit(lambda p, d: teacher_logprobs(graphdef, p, d, rounds, mesh, 1.0))(stacked, distill)
  for r in range(2):
    for k in range(3):
      t = rounds[r, k]
      if t < 0:
        np.testing.assert_array_equal(got[r, k], 0.0)
        continue
      want = _score(graphdef, jax.tree.map(lambda x: x[t], stacked), distill.tokens[r, k],
                    distill.token_valid[r, k])
      np.testing.assert_allclose(got[r, k], want, rtol=1e-5, atol=1e-6)


def test_shared_prompt_scores_equal_plain_scores(model):
  """(Their gradients are compared through a whole step in the micro-batch test.)"""
  graphdef, params = model
  batch = _batch(6, (6,))

  @jax.jit
  def both(p):
    return (sequence_logprobs(graphdef, p, batch.tokens, batch.token_valid, 0.9),
            shared_prompt_logprobs(graphdef, p, batch.tokens, batch.token_valid, 0.9, 2, PROMPT))

  plain, shared = both(params)
  completion = batch.completion_mask
  for a, b in ((plain.logprobs, shared.logprobs), (plain.entropy, shared.entropy)):
    np.testing.assert_allclose(np.asarray(b)[completion], np.asarray(a)[completion], rtol=1e-5,
                               atol=1e-6)
  assert np.abs(np.asarray(plain.logprobs)[completion]).min() > 0  # real scores, not zeros


def test_prompt_mismatch_counts_rows_that_break_the_group_layout():
  batch = _batch(7, (2, 4))
  np.testing.assert_array_equal(prompt_mismatch(batch.tokens, batch.token_valid, 2, PROMPT), 0.0)
  tokens = batch.tokens.copy()
  tokens[1, 3, PROMPT - 1] += 1  # row 3 (group 1) of branch 1 now has its own prompt
  np.testing.assert_allclose(prompt_mismatch(tokens, batch.token_valid, 2, PROMPT), [0.0, 0.25])
  np.testing.assert_allclose(prompt_mismatch(batch.tokens, batch.token_valid, 4, PROMPT)[0] > 0,
                             True)


@jax.jit(static_argnums=0)
def _next_logprobs(graphdef, params, tokens, token_valid, temperature):
  logits, _ = apply_model(graphdef, params, tokens, token_valid=token_valid)
  return jax.nn.log_softmax(logits / temperature, axis=-1)


def test_edge_topk_returns_teacher_and_student_topk_on_student_rollouts(one_device):
  graphdef, stacked, mesh = one_device['graphdef'], one_device['stacked'], one_device['mesh']
  distill = _batch(5, (1, 2, 4))
  out = make_edge_topk(graphdef, mesh, one_device['sh'], ((1, 0),), k=5, temperature=0.9)(
      stacked, distill)
  assert out.teacher_ids.shape == (1, 2, 4, T, 5)
  student = 0
  tokens = distill.tokens[0, student]
  for who, ids, lps, tok_lp in ((1, out.teacher_ids, out.teacher_logprobs,
                                 out.teacher_token_logprob),
                                (0, out.student_ids, out.student_logprobs,
                                 out.student_token_logprob)):
    p = jax.tree.map(lambda x: x[who], stacked)
    logp = _next_logprobs(graphdef, p, tokens, distill.token_valid[0, student], 0.9)
    mask = distill.completion_mask[0, student]
    for row, t in zip(*np.nonzero(mask)):
      want = np.argsort(-np.asarray(logp[row, t - 1]))[:5]
      np.testing.assert_array_equal(ids[0, student, row, t], want)
      np.testing.assert_allclose(lps[0, student, row, t], logp[row, t - 1, want], rtol=1e-5)
    want_tok = _score(graphdef, p, tokens, distill.token_valid[0, student], 0.9)
    np.testing.assert_allclose(tok_lp[0, student], want_tok * mask, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(ids[0, student])[~mask] == -1)
  assert not np.array_equal(out.teacher_logprobs, out.student_logprobs)


# ----------------------------------------------------------------------------- mesh

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
                'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_COLLECTIVE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+(all-gather|all-reduce|'
                         r'all-to-all|collective-permute|reduce-scatter|collective-broadcast|'
                         r'ragged-all-to-all)(?:-start)?\(')
_GROUPS = re.compile(r'replica_groups=(\{\{[\d,{}\s]*\}\}|\{\}|\[[\d,]+\]<=\[[\d,]+\]'
                     r'(?:T\([\d,]+\))?|mesh\[[^\]]*\](?:,\s*device_ids=\(\[[\d,]+\]'
                     r'(?:T\([\d,]+\))?\))?\s*\{[^}]*\})')


def _iota(dims: str, perm: str | None) -> np.ndarray:
  ids = np.arange(math.prod(int(d) for d in dims.split(','))).reshape(
      [int(d) for d in dims.split(',')])
  return ids.transpose([int(p) for p in perm.split(',')]) if perm else ids


def _device_groups(line: str, num_devices: int) -> list[list[int]]:
  """Device (partition) groups of one collective, from any of XLA's replica-group spellings."""
  pairs = re.search(r'source_target_pairs=\{([\d,{}\s]*)\}', line)
  if pairs:
    return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)\}', pairs.group(1))]
  m = _GROUPS.search(line)
  if m is None:
    raise AssertionError(f'cannot read the device groups of: {line[:300]}')
  spec = m.group(1)
  if spec == '{}':
    return [list(range(num_devices))]
  if spec.startswith('{{'):
    return [[int(x) for x in g.split(',') if x] for g in re.findall(r'\{([\d,]*)\}', spec[1:-1])]
  if spec.startswith('['):
    g = re.fullmatch(r'\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', spec)
    return _iota(g.group(2), g.group(3)).reshape(
        [int(d) for d in g.group(1).split(',')]).tolist()
  g = re.fullmatch(r"mesh\[(.*?)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                   r"\s*\{(.*?)\}", spec)
  axes = re.findall(r"'(\w+)'=(\d+)", g.group(1))
  names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
  ids = (_iota(g.group(2), g.group(3)) if g.group(2) else np.arange(math.prod(sizes)))
  ids = ids.reshape(sizes)
  over = [names.index(a) for a in re.findall(r"'(\w+)'", g.group(4))]
  rest = [i for i in range(len(names)) if i not in over]
  return ids.transpose(rest + over).reshape(-1, math.prod(sizes[i] for i in over)).tolist()


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
  """Every collective of compiled HLO text: op, result bytes per device, device groups."""
  out = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.match(line)
    if m is None:
      continue
    nbytes = sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(',') if d)
                 for dt, dims in re.findall(r'\b(pred|[suf]\d+|bf16)\[([\d,]*)\]', m.group(1)))
    out.append(dict(op=m.group(2), bytes=nbytes, groups=_device_groups(line, num_devices),
                    line=line.strip()[:200]))
  return out


def cross_branch_collectives(hlo_text: str, mesh) -> list[dict]:
  """Collectives whose device groups contain devices of different 'branch' coordinates."""
  ids = [d.id for d in mesh.devices.flat]  # partition i runs on mesh.devices.flat[i]
  branch_of = {i: int(np.unravel_index(i, mesh.devices.shape)[0]) for i in range(len(ids))}
  return [c for c in collectives(hlo_text, len(ids))
          if any(len({branch_of[d] for d in g}) > 1 for g in c['groups'])]


def test_group_parser_reads_every_spelling():
  assert _device_groups('replica_groups={{0,2},{1,3}}, x', 4) == [[0, 2], [1, 3]]
  assert _device_groups('replica_groups=[2,2]<=[4], x', 4) == [[0, 1], [2, 3]]
  assert _device_groups('replica_groups=[2,2]<=[2,2]T(1,0), x', 4) == [[0, 2], [1, 3]]
  assert _device_groups("replica_groups=mesh['a'=2,'b'=2] {'a'}, x", 4) == [[0, 2], [1, 3]]
  assert _device_groups("replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]T(1,0)) {'b'}, x",
                        4) == [[0, 2], [1, 3]]
  assert _device_groups('source_target_pairs={{0,1},{1,0}}, x', 2) == [[0, 1], [1, 0]]


@pytest.fixture(scope='module')
def mesh_run(model):  # about 30-40 s of compiling on a 2-core machine: the tests using it are slow
  """Three GRPO and three OPD steps on a branch=2, fsdp=2, tensor=2 mesh of 8 CPU devices."""
  graphdef, params = model
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 2, 'tensor': 2}, num_branches=2)
  adamw = optim.make_optimizer({'learning_rate': 1e-3})
  state = init_branch_state(graphdef, params, 2, adamw, mesh, seed=0)
  shardings = branch_state_shardings(state, mesh)
  cfg = StepConfig(num_micro_batches=2)
  rounds = ((1, 0),)
  grpo = make_grpo_step(graphdef, adamw, mesh, cfg, shardings)
  opd = make_opd_step(graphdef, adamw, mesh, cfg, shardings, rounds)
  before = dict(TRACE_COUNTS)
  placements = [_placement_errors(state, shardings)]
  for i in range(3):
    state, grpo_metrics = grpo(state, _batch(10 + i, (2, 4)))
    placements.append(_placement_errors(state, shardings))
  for i in range(3):
    state, opd_metrics = opd(state, _batch(20 + i, (2, 4)), _batch(30 + i, (1, 2, 4)))
    placements.append(_placement_errors(state, shardings))
  traces = {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ('grpo_step', 'opd_step')}
  hlo = opd.lower(state, _batch(0, (2, 4)), _batch(1, (1, 2, 4))).compile().as_text()
  return dict(mesh=mesh, state=state, shardings=shardings, placements=placements,
              traces=traces, hlo=hlo, grpo_metrics=grpo_metrics, opd_metrics=opd_metrics,
              graphdef=graphdef)


def _placement_errors(state, shardings) -> list[str]:
  errors = []
  flat_state = jax.tree_util.tree_flatten_with_path(state)[0]
  flat_sh = jax.tree.leaves(jax.tree.map(
      lambda s, x: s, shardings, state, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
  for (path, leaf), sh in zip(flat_state, flat_sh, strict=True):
    if not leaf.sharding.is_equivalent_to(sh, leaf.ndim):
      errors.append(f'{jax.tree_util.keystr(path)}: {leaf.sharding} != {sh}')
  return errors


@pytest.mark.slow
def test_state_stays_sharded_as_declared_after_every_step(mesh_run):
  assert all(not errors for errors in mesh_run['placements']), mesh_run['placements']
  embed = mesh_run['state'].params['embed']
  assert embed.sharding.spec == jax.sharding.PartitionSpec('branch', 'tensor', 'fsdp')
  mu = [x for path, x in jax.tree_util.tree_flatten_with_path(mesh_run['state'].opt_state)[0]
        if '.mu' in jax.tree_util.keystr(path) and 'gate_proj' in jax.tree_util.keystr(path)]
  assert len(mu) == 1  # Adam's first moment of gate_proj
  mu = mu[0]
  assert mu.sharding.spec == mesh_run['state'].params['layers']['gate_proj'].sharding.spec
  assert mu.sharding.spec[0] == 'branch'
  assert mesh_run['state'].step.tolist() == [6, 6]
  for metrics in (mesh_run['grpo_metrics'], mesh_run['opd_metrics']):
    assert all(np.all(np.isfinite(v)) and v.shape == (2,) for v in metrics.values())
  assert 'opd_delta_abs_mean' in mesh_run['opd_metrics']


@pytest.mark.slow
def test_each_step_is_traced_once_across_steps(mesh_run):
  assert mesh_run['traces'] == {'grpo_step': 1, 'opd_step': 1}


@pytest.mark.slow
def test_opd_step_moves_only_token_sized_data_across_branches(mesh_run):
  """Every collective whose devices span branches moves at most one round's [K, M, T]
  log-probs (the largest routed array); and the routing itself is present."""
  K, M = 2, 4
  bound = K * M * T * 4
  shard_bytes = {path: x[...].addressable_shards[0].data.nbytes
                 for path, x in nnx.to_flat_state(mesh_run['state'].params)}
  assert min(b for path, b in shard_bytes.items() if 'norm' not in path[-1]) > bound, shard_bytes
  cross = cross_branch_collectives(mesh_run['hlo'], mesh_run['mesh'])
  assert cross, 'expected the tokens/log-probs permutation across branches'
  too_big = [c for c in cross if c['bytes'] > bound]
  assert not too_big, too_big


@pytest.mark.slow
def test_cross_branch_check_catches_a_step_that_moves_teacher_parameters(mesh_run):
  """A deliberately wrong OPD scoring: each student fetches its teacher's parameters."""
  mesh, graphdef, state = mesh_run['mesh'], mesh_run['graphdef'], mesh_run['state']
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('branch'))

  def wrong_teacher_logprobs(params, tokens, valid):
    teacher_params = jax.tree.map(lambda x: x[np.array([1, 0])], params)
    return jax.vmap(lambda p, t, v: sequence_logprobs(graphdef, p, t, v).logprobs)(
        teacher_params, tokens, valid)

  batch = _batch(0, (2, 4))
  fn = jax.jit(wrong_teacher_logprobs, in_shardings=(mesh_run['shardings'].params, rows, rows),
               out_shardings=rows)
  hlo = fn.lower(state.params, batch.tokens, batch.token_valid).compile().as_text()
  big = [c for c in cross_branch_collectives(hlo, mesh) if c['bytes'] > 2 * 4 * T * 4]
  assert big, 'the check failed to see parameters crossing branches'


def _largest_cross_branch_bytes(program: str, K: int = 2, **kw) -> int:
  """The largest of `_cross_branch_bytes`."""
  return max(_cross_branch_bytes(program, K, **kw), default=0)


def _cross_branch_bytes(program: str, K: int = 2, *, vocab: int = 48, hidden: int = 32,
                        tokens_len: int = T, k: int = 5) -> list[int]:
  """Bytes per device of every cross-branch collective of the compiled OPD step ('opd',
  'opd_topk' / 'opd_full': opd.signal 'topk_forward_kl' with k / 'full_reverse_kl') or edge
  top-k probe ('topk') on a branch=K, fsdp=2, tensor=8/(2K) mesh of 8 CPU devices (abstract
  inputs: compile only), for a model of `vocab` and `hidden` and rollouts of `tokens_len`."""
  import dataclasses
  cfg = dataclasses.replace(CONFIG, vocab_size=vocab, hidden_size=hidden)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
  mesh = mesh_lib.make_mesh({'branch': K, 'fsdp': 2, 'tensor': 4 // K}, num_branches=K)
  adamw = optim.make_optimizer({'learning_rate': 1e-3})
  state = jax.eval_shape(lambda p: init_branch_state(graphdef, p, K, adamw, mesh, seed=0), params)
  shardings = branch_state_shardings(state, mesh)
  rounds = (tuple((i + 1) % K for i in range(K)),)   # a ring: every branch teaches
  batch = lambda lead: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    _batch(0, lead, tokens_len))
  if program.startswith('opd'):
    signal = {'opd': {}, 'opd_topk': dict(opd_signal='topk_forward_kl', opd_topk=k),
              'opd_full': dict(opd_signal='full_reverse_kl')}[program]
    fn = make_opd_step(graphdef, adamw, mesh, StepConfig(**signal), shardings, rounds)
    lowered = fn.lower(state, batch((K, 4)), batch((1, K, 4)))
  else:
    fn = make_edge_topk(graphdef, mesh, shardings, rounds, k=k)
    lowered = fn.lower(state.params, batch((1, K, 4)))
  return [c['bytes'] for c in cross_branch_collectives(lowered.compile().as_text(), mesh)]


@pytest.mark.slow   # about 10 compiles of a tiny model
@pytest.mark.parametrize('K', [2, 4])
def test_cross_branch_traffic_scales_with_tokens_and_k_not_vocab_or_params(K):
  """Issue 20.6: routing is a permute (a device receives only its partner's rows) and the probe
  moves top-k ids and log-probs, never full-vocabulary log-probs or parameters: doubling the
  vocabulary or the hidden size leaves the largest cross-branch collective unchanged; doubling
  the tokens doubles it, and so does doubling k for the probe."""
  for program in ('opd', 'topk'):
    base = _largest_cross_branch_bytes(program, K)
    assert base > 0, program
    assert _largest_cross_branch_bytes(program, K, vocab=96) == base, program
    assert _largest_cross_branch_bytes(program, K, hidden=64) == base, program
    assert _largest_cross_branch_bytes(program, K, tokens_len=2 * T) == 2 * base, program
  # OPD: one branch's rows on a device (4 rows / fsdp 2) x T fp32 log-probs, whatever K (the
  # partitioned gather moved K times that, an all-gather, at K=4).
  assert _largest_cross_branch_bytes('opd', K) == 2 * T * 4
  # Probe: [M, T, k] ids / log-probs of one round: 4 rows x 12 positions x k x 4 bytes.
  assert _largest_cross_branch_bytes('topk', K) == 4 * T * 5 * 4
  assert _largest_cross_branch_bytes('topk', K, k=10) == 2 * 4 * T * 5 * 4


@pytest.mark.slow   # about 10 compiles of a tiny model
@pytest.mark.parametrize('K', [2, 4])
def test_topk_forward_kl_step_moves_tokens_times_k_across_branches_never_vocab(K):
  """opd.signal='topk_forward_kl': the teacher's top-k ids and log-probs are the largest thing
  that crosses branches: one branch's rows on a device (4 rows / fsdp 2) x T x k x 4 bytes,
  unchanged by the vocabulary or the hidden size, doubled by the tokens or k."""
  base = _largest_cross_branch_bytes('opd_topk', K)
  assert base == 2 * T * 5 * 4
  assert _largest_cross_branch_bytes('opd_topk', K, vocab=96) == base
  assert _largest_cross_branch_bytes('opd_topk', K, hidden=64) == base
  assert _largest_cross_branch_bytes('opd_topk', K, tokens_len=2 * T) == 2 * base
  assert _largest_cross_branch_bytes('opd_topk', K, k=10) == 2 * base


@pytest.mark.slow   # 3 compiles of a tiny model
def test_full_reverse_kl_step_moves_hidden_states_and_heads_never_tokens_times_vocab():
  """opd.signal='full_reverse_kl' moves what its field reference says: per edge the teacher's
  hidden states, one branch's rows on a device (4 rows / fsdp 2) x T x D x 4 bytes, and once per
  round its output head split over 'fsdp' ([V, D], an untied head transposed: V / 2 x D x 4
  bytes); the tokens
  scale only the first, the vocabulary only the second, and nothing is tokens x vocabulary
  (the teacher's log-probs, 2 x T x V x 4 bytes, which this signal once moved)."""
  hidden = lambda tokens_len, d=32: 2 * tokens_len * d * 4
  head = lambda vocab, d=32: vocab // 2 * d * 4
  base = _cross_branch_bytes('opd_full', 2)
  assert hidden(T) in base and head(48) in base and max(base) == hidden(T) == head(48)
  longer = _cross_branch_bytes('opd_full', 2, vocab=80, tokens_len=2 * T)
  assert hidden(2 * T) in longer and head(80) in longer
  assert max(longer) == hidden(2 * T) < 2 * (2 * T) * 80 * 4
  wider = _cross_branch_bytes('opd_full', 2, hidden=64)
  assert hidden(T, 64) in wider and head(48, 64) in wider and max(wider) == 2 * max(base)


def test_mesh_checks_branch_divisibility(model):
  graphdef, params = model
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4})
  with pytest.raises(UserInputError, match='num_branches=3'):
    init_branch_state(graphdef, params, 3, optax.sgd(1.0), mesh, seed=0)


# ----------------------------------------------------------------------------- config

def test_step_config_validation_names_the_field():
  with pytest.raises(UserInputError, match=r'^StepConfig.aggregation:'):
    StepConfig(aggregation='mean')
  with pytest.raises(UserInputError, match=r'^StepConfig.num_micro_batches:'):
    StepConfig(num_micro_batches=0)
  with pytest.raises(UserInputError, match=r'^StepConfig.opd_clamp:'):
    StepConfig(opd_clamp=-1.0)
  with pytest.raises(UserInputError, match=r'^StepConfig.prompt_length:'):
    StepConfig(prompt_length=-1)
  assert StepConfig(group_size=8, prompt_length=16).shares_prompts
  assert not StepConfig(group_size=8).shares_prompts
  with pytest.raises(UserInputError, match=r'^StepConfig.epsilon_lo:'):
    StepConfig.from_dict({'epsilon_lo': 0.1})
  assert StepConfig.from_dict({'epsilon_high': 0.3}).epsilon_high == 0.3


def test_optimizer_schedules_and_validation():
  cosine = optim.make_schedule({'learning_rate': 1.0, 'schedule': 'cosine', 'warmup_steps': 2,
                                'decay_steps': 10, 'end_lr_ratio': 0.1})
  np.testing.assert_allclose([cosine(i) for i in (0, 1, 2, 6, 10)],
                             [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-5, atol=1e-6)
  linear = optim.make_schedule({'learning_rate': 2.0, 'schedule': 'linear', 'decay_steps': 4})
  np.testing.assert_allclose([linear(i) for i in (0, 2, 4, 9)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
  constant = optim.make_schedule({'learning_rate': 3.0, 'warmup_steps': 3})
  np.testing.assert_allclose([constant(i) for i in (0, 3, 100)], [0.0, 3.0, 3.0], atol=1e-6)
  for bad, field in (({}, 'learning_rate'), ({'learning_rate': 1.0, 'schedule': 'step'},
                                             'schedule'),
                     ({'learning_rate': 1.0, 'schedule': 'cosine'}, 'decay_steps'),
                     ({'learning_rate': -1.0}, 'learning_rate'),
                     ({'learning_rate': 1.0, 'momentum': 0.9}, 'momentum'),
                     ({'learning_rate': 1.0, 'b2': 1.0}, 'b2')):
    with pytest.raises(UserInputError, match=rf'^config.optimizer.{field}:'):
      optim.make_optimizer(bad)


def test_optimizer_clips_global_norm_and_skips_decay_on_norms(model):
  _, params = model
  def first_update(opt, grads):  # jitted: eager optax would compile op by op
    return jax.jit(lambda g, p: opt.update(g, opt.init(p), p)[0])(grads, params)

  decay = optim.make_optimizer({'learning_rate': 1.0, 'weight_decay': 0.5})
  updates = first_update(decay, jax.tree.map(jnp.zeros_like, params))
  flat = dict(nnx.to_flat_state(updates))
  np.testing.assert_array_equal(flat[('final_norm',)][...], 0.0)  # norms: no decay
  np.testing.assert_array_equal(flat[('layers', 'input_norm')][...], 0.0)
  np.testing.assert_allclose(flat[('embed',)][...], -0.5 * params['embed'][...], rtol=1e-6)
  # With b1 = b2 = 0 and eps = 1 an Adam step is -g / (|g| + 1), about -g for a small g: a huge
  # gradient clipped to global norm 1e-3 gives an update of norm about 1e-3.
  huge = jax.tree.map(lambda x: 1e6 * jnp.ones_like(x), params)
  adam = {'learning_rate': 1.0, 'b1': 0.0, 'b2': 0.0, 'eps': 1.0}
  for max_norm, want in ((1e-3, 1e-3), (None, math.sqrt(sum(x.size for x in
                                                                jax.tree.leaves(params))))):
    updates = first_update(optim.make_optimizer({**adam, 'max_grad_norm': max_norm}), huge)
    np.testing.assert_allclose(optax.global_norm(updates), want, rtol=1e-2)


# ----------------------------------------------------------------------------- chunked logits

def test_chunked_logits_steps_equal_unchunked_steps(one_device):
  """logits_chunk=5 (does not divide the 11 scored positions) in the GRPO update, the OPD
  teacher pass and the top-k probe gives what the whole-sequence logits give."""
  graphdef, stacked, mesh, sh = (one_device[k] for k in ('graphdef', 'stacked', 'mesh', 'sh'))
  batch = _batch(0, (2, 8))
  chunked = make_grpo_step(graphdef, OPTIMIZER, mesh, StepConfig(logits_chunk=5, **CFG), sh)
  full, m_full = one_device['grpo'](_state(stacked, OPTIMIZER, mesh)[0], batch)
  got, m_got = chunked(_state(stacked, OPTIMIZER, mesh)[0], batch)
  _assert_trees_close(got.params, full.params)
  for key in ('loss', 'grad_norm', 'clip_frac_low', 'approx_kl', 'entropy'):
    np.testing.assert_allclose(m_got[key], m_full[key], rtol=1e-5, err_msg=key)

  distill = _batch(4, (1, 2, 4))
  rounds = np.array([[1, 0]])
  teacher = jax.jit(lambda p, d, c: teacher_logprobs(graphdef, p, d, rounds, mesh, 0.9, 1, c),
                    static_argnums=2)
  np.testing.assert_allclose(teacher(stacked, distill, 5), teacher(stacked, distill, None),
                             rtol=0, atol=1e-6)
  probe = jax.jit(lambda p, t, v, c: next_token_topk(graphdef, p, t, v, 0.9, 5, c),
                  static_argnums=3)
  p0, tokens, valid = jax.tree.map(lambda x: x[0], stacked), distill.tokens[0, 0], \
      distill.token_valid[0, 0]
  for a, b in zip(probe(p0, tokens, valid, 5), probe(p0, tokens, valid, None), strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_logits_chunk_config_field_reaches_the_step_config():
  from configs.base import base_config
  from copd_jax.config import ConfigError, validate
  config = base_config()
  config.mesh.branch, config.mesh.fsdp = 1, -1   # any K divides the 8 test devices
  assert StepConfig.from_config(config, 8).logits_chunk is None   # 0 = off
  config.grpo.logits_chunk = 64
  validate(config, check_files=False)
  assert StepConfig.from_config(config, 8).logits_chunk == 64
  config.grpo.logits_chunk = -1
  with pytest.raises(ConfigError, match='grpo.logits_chunk'):
    validate(config, check_files=False)
  with pytest.raises(UserInputError, match=r'^StepConfig.logits_chunk:'):
    StepConfig(logits_chunk=0)


def _largest_cross_branch_bytes_vl(*, hidden: int = 32, patches: int = 64, K: int = 2) -> int:
  """The largest of `_cross_branch_bytes_vl` of the OPD step."""
  return max(_cross_branch_bytes_vl('opd', hidden=hidden, patches=patches, K=K), default=0)


def _cross_branch_bytes_vl(program: str, *, hidden: int = 32, patches: int = 64, K: int = 2,
                           k: int = 5) -> list[int]:
  """Bytes per device of every cross-branch collective of the compiled OPD step ('opd') or
  top-k probe ('topk', k) of a tiny Qwen3-VL model on rows with pictures (a pack of `patches`
  patches per branch and round), on a branch=K, fsdp=2 mesh of CPU devices (abstract inputs:
  compile only)."""
  from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
  from copd_jax.models.qwen3_vl_vision import VisionConfig
  from copd_jax.vision_batch import PatchPack, VisionBatch
  text = Qwen3Config(vocab_size=48, hidden_size=hidden, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, intermediate_size=64)
  vision = VisionConfig(depth=2, hidden_size=hidden // 2, intermediate_size=24, num_heads=2,
                        out_hidden_size=hidden, num_position_embeddings=16,
                        deepstack_visual_indexes=(0,), patch_size=4)
  cfg = Qwen3VLConfig(text, vision, mrope_section=(2, 1, 1), image_token_id=40,
                      video_token_id=41, vision_start_token_id=42, vision_end_token_id=43)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, rngs=nnx.Rngs(0))))
  mesh = mesh_lib.make_mesh({'branch': K, 'fsdp': 2, 'tensor': 4 // K}, num_branches=K)
  adamw = optim.make_optimizer({'learning_rate': 1e-3})
  state = jax.eval_shape(lambda p: init_branch_state(graphdef, p, K, adamw, mesh, seed=0), params)
  shardings = branch_state_shardings(state, mesh)
  rounds = (tuple((i + 1) % K for i in range(K)),)
  spec = jax.ShapeDtypeStruct

  def batch(lead):
    rows = jax.tree.map(lambda x: spec(x.shape, x.dtype), _batch(0, lead))
    pack = lead[:-1]
    pictures = VisionBatch(
        PatchPack(spec(pack + (patches, vision.patch_dim), jnp.float32),
                  spec(pack + (patches, 4), jnp.int32), spec(pack + (patches, 4), jnp.float32),
                  spec(pack + (patches, 2), jnp.int32), spec(pack + (patches,), jnp.int32),
                  spec(pack + (patches // 16, 16), jnp.int32)),
        spec(lead + (T,), jnp.int32), spec(lead + (3, T), jnp.int32))
    return rows._replace(vision=pictures)

  if program == 'opd':
    fn = make_opd_step(graphdef, adamw, mesh, StepConfig(), shardings, rounds)
    lowered = fn.lower(state, batch((K, 4)), batch((1, K, 4)))
  else:
    lowered = make_edge_topk(graphdef, mesh, shardings, rounds, k=k).lower(
        state.params, batch((1, K, 4)))
  return [c['bytes'] for c in cross_branch_collectives(lowered.compile().as_text(), mesh)]


@pytest.mark.slow   # three compiles of a tiny Qwen3-VL OPD step
def test_vl_opd_step_moves_pixels_and_tokens_across_branches_never_parameters():
  """Issue 19: in a Qwen3-VL OPD step the student's tokens and pixels go to the teacher's shard,
  parameters never: the largest cross-branch collective is one device's share of a branch's
  pack of patches (64 patches x 96 values x 4 bytes / fsdp 2), unchanged when the model's
  hidden sizes double, doubled with the pack."""
  base = _largest_cross_branch_bytes_vl()
  assert base == 64 * 96 * 4 // 2
  assert _largest_cross_branch_bytes_vl(hidden=64) == base
  assert _largest_cross_branch_bytes_vl(patches=128) == 2 * base


@pytest.mark.slow   # four compiles of a tiny Qwen3-VL top-k probe
def test_vl_probe_moves_tokens_pixels_and_topk_across_branches_never_parameters():
  """Issue 19: the top-k probe on Qwen3-VL rows sends the student's tokens and pictures to the
  teacher's shard and brings the teacher's top-k back, nothing else: the cross-branch
  collectives are the same when the model's hidden sizes double; the largest is a branch's
  pack of pixels (64 patches x 96 values x 4 bytes, whole on each device: the probe is manual
  over 'branch' only), doubled with the pack; the teacher's top-k ids and log-probs (4 rows x
  T x k x 4 bytes) scale with k."""
  base = _cross_branch_bytes_vl('topk')
  assert sorted(_cross_branch_bytes_vl('topk', hidden=64)) == sorted(base)
  assert max(base) == 64 * 96 * 4
  assert max(_cross_branch_bytes_vl('topk', patches=128)) == 2 * max(base)
  assert base.count(4 * T * 5 * 4) == 2
  assert _cross_branch_bytes_vl('topk', k=10).count(4 * T * 10 * 4) == 2
