"""The rollout sampler: log-prob parity with teacher forcing, greedy parity with transformers,
masks, branch-vmapped sampling on a mesh, determinism, compile caching, group-shared prefill,
and the generate CLI."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from copd_jax import mesh as mesh_lib
from copd_jax import prompt_groups
from copd_jax import rollouts
from copd_jax import sampling
from copd_jax.sampling import decode
from copd_jax.__main__ import main as cli_main
from copd_jax.data import synthetic_domain
from copd_jax.evaluation import ModelGroup, evaluate_groups, evaluate_models
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.tokenizer import char_tokenizer, char_vocab_size
from copd_jax.scoring import sequence_logprobs, split_model
from copd_jax.tracing import TRACE_COUNTS
from tests.hf_fixtures import save_hf_model

CONFIG = Qwen3Config(vocab_size=96, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=16, intermediate_size=80, rope_theta=10_000.0)
NEVER = (CONFIG.vocab_size + 7,)   # an EOS id the model cannot emit


def tiny_model(seed: int = 0, **kwargs):
  # A larger init spread than the default makes distributions peaked enough to test EOS stops.
  return split_model(Qwen3(CONFIG, rngs=nnx.Rngs(seed), init_std=0.2, **kwargs))


@pytest.fixture(scope='module')
def model():
  return tiny_model()


def prompts(batch_lengths=(5, 9, 1, 7), length=10, seed=0):
  rng = np.random.RandomState(seed)
  lists = [rng.randint(3, CONFIG.vocab_size, n).tolist() for n in batch_lengths]
  return lists, *rollouts.pad_prompts(lists, length, pad_id=0)


def check_layout(out: sampling.SampleOutput, valid: np.ndarray, eos, n: int, pad_id: int = 0):
  """Invariants of every SampleOutput row."""
  tokens, token_valid, completion, logprobs = (np.asarray(x) for x in out)
  P = valid.shape[1]
  assert tokens.shape == (valid.shape[0], P + n)
  assert not completion[:, :P].any()
  np.testing.assert_array_equal(token_valid, np.pad(valid, ((0, 0), (0, n))) | completion)
  for row in range(tokens.shape[0]):
    gen = completion[row, P:]
    length = int(gen.sum())
    assert gen[:length].all() and not gen[length:].any()   # a prefix of the completion slots
    assert (tokens[row, P + length:] == pad_id).all()
    generated = tokens[row, P:P + length]
    stopped = [i for i, t in enumerate(generated) if t in eos]
    if length == 0:
      assert not valid[row].any()   # only a row without prompt generates nothing
    elif length < n:   # an early stop ends exactly at the first EOS (included in the mask)
      assert stopped == [length - 1], (row, generated)
    else:
      assert stopped in ([], [length - 1])
  assert (logprobs[~completion] == 0).all()
  assert (logprobs[completion] <= 0).all() and np.isfinite(logprobs).all()


@pytest.mark.parametrize('temperature', [1.0, 0.6])
def test_sampler_logprobs_equal_teacher_forced(model, temperature):
  graphdef, params = model
  _, tokens, valid = prompts()
  spec = sampling.SamplingParams(max_new_tokens=12, temperature=temperature)
  out = sampling.generate(graphdef, params, tokens, valid, jax.random.key(1), spec, NEVER)
  check_layout(out, valid, NEVER, 12)
  scores = sequence_logprobs(graphdef, params, out.tokens, out.token_valid, temperature)
  mask = np.asarray(out.completion_mask)
  assert mask.sum() == 4 * 12
  np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(scores.logprobs)[mask],
                             atol=1e-5)


@pytest.mark.slow
def test_decode_modes_and_scan_layers_agree(model):
  graphdef, params = model
  _, tokens, valid = prompts()
  spec = sampling.SamplingParams(max_new_tokens=8)
  runs = []
  for mode, scan in (('layerwise', True), ('model', True), ('model', False)):
    graphdef, params = tiny_model(scan_layers=scan)
    runs.append(sampling.generate(graphdef, params, tokens, valid, jax.random.key(3), spec, NEVER,
                                  decode_mode=mode))
  for other in runs[1:]:
    np.testing.assert_array_equal(runs[0].tokens, other.tokens)
    np.testing.assert_allclose(runs[0].logprobs, other.logprobs, atol=1e-5)


def test_greedy_matches_transformers_generate(tmp_path):
  hf_model = save_hf_model('untied_gqa2', tmp_path)
  graphdef, params = split_model(hf_io.load_model(str(tmp_path)))
  lists, tokens, valid = prompts((6, 3, 8, 1), length=8, seed=2)
  n = 32
  out = sampling.generate(graphdef, params, tokens, valid, jax.random.key(0),
                          sampling.SamplingParams(max_new_tokens=n, greedy=True), NEVER)
  with torch.no_grad():
    ref = hf_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(valid, dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, 8:], ref.numpy()[:, 8:])
  # Greedy log-probs are the model's (temperature 1) log-probs of the chosen tokens.
  scores = sequence_logprobs(graphdef, params, out.tokens, out.token_valid)
  mask = np.asarray(out.completion_mask)
  np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(scores.logprobs)[mask],
                             atol=1e-5)


def test_early_eos_and_padded_rows_have_exact_masks(model):
  graphdef, params = model
  # Many EOS ids so rows stop at different steps; row 4 has no prompt at all.
  eos = tuple(range(3, CONFIG.vocab_size, 6))
  lists, tokens, valid = prompts((5, 9, 1, 7, 0, 3), length=10, seed=4)
  n = 16
  out = sampling.generate(graphdef, params, tokens, valid, jax.random.key(7),
                          sampling.SamplingParams(max_new_tokens=n), eos)
  check_layout(out, valid, eos, n)
  lengths = np.asarray(out.completion_mask).sum(1)
  assert lengths[4] == 0 and (np.asarray(out.tokens)[4] == 0).all()
  assert (lengths[[0, 1, 2, 3, 5]] < n).sum() >= 3, lengths   # early stops happened
  assert len(set(lengths.tolist())) >= 3                      # ... at different steps
  # Prompt tokens come back left-padded, unchanged.
  np.testing.assert_array_equal(np.asarray(out.tokens)[:, :10], tokens)
  # Log-probs still match teacher forcing on rows that stopped early.
  scores = sequence_logprobs(graphdef, params, out.tokens, out.token_valid)
  mask = np.asarray(out.completion_mask)
  np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(scores.logprobs)[mask],
                             atol=1e-5)


# The tests below reuse the program of the first test (shapes, SamplingParams, EOS ids), so
# they add no compile.
FULL = sampling.SamplingParams(max_new_tokens=12)


def test_right_padded_prompts_give_the_left_padded_result(model):
  graphdef, params = model
  lists, left, left_valid = prompts()
  right = np.zeros_like(left)
  right_valid = np.zeros_like(left_valid)
  for row, ids in enumerate(lists):
    right[row, :len(ids)] = ids
    right_valid[row, :len(ids)] = True
  a = sampling.generate(graphdef, params, left, left_valid, jax.random.key(5), FULL, NEVER)
  b = sampling.generate(graphdef, params, right, right_valid, jax.random.key(5), FULL, NEVER)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_determinism_top_k_one_is_greedy_and_one_compile(model):
  graphdef, params = model
  _, tokens, valid = prompts()
  a = sampling.generate(graphdef, params, tokens, valid, jax.random.key(11), FULL, NEVER)
  traced = TRACE_COUNTS['generate']
  b = sampling.generate(graphdef, params, tokens, valid, jax.random.key(11), FULL, NEVER)
  c = sampling.generate(graphdef, params, tokens, valid, jax.random.key(12), FULL, NEVER)
  assert TRACE_COUNTS['generate'] == traced   # same shapes and settings: no retrace
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
  # A new sequence length is a new program, traced once.
  short = sampling.SamplingParams(max_new_tokens=5, temperature=0.9)
  sampling.generate(graphdef, params, tokens[:, 3:], valid[:, 3:], jax.random.key(0), short, NEVER)
  assert TRACE_COUNTS['generate'] == traced + 1

  greedy = sampling.generate(graphdef, params, tokens, valid, jax.random.key(0),
                             sampling.SamplingParams(max_new_tokens=12, greedy=True), NEVER)
  top1 = sampling.generate(graphdef, params, tokens, valid, jax.random.key(4),
                           sampling.SamplingParams(max_new_tokens=12, top_k=1), NEVER)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  # A one-token distribution: every sampled token has log-prob 0.
  np.testing.assert_allclose(np.asarray(top1.logprobs), 0.0, atol=1e-6)


def test_filters_keep_the_right_tokens_and_renormalise():
  probs = np.array([[0.5, 0.25, 0.15, 0.1], [0.1, 0.2, 0.3, 0.4]])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  kept = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(
      logits, sampling.SamplingParams(max_new_tokens=1, **kw))))
  np.testing.assert_array_equal(kept(top_k=2), [[1, 1, 0, 0], [0, 0, 1, 1]])
  # Nucleus: the smallest prefix (by probability) whose mass reaches top_p.
  np.testing.assert_array_equal(kept(top_p=0.5), [[1, 0, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(kept(top_p=0.7), [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(kept(top_p=0.8), [[1, 1, 1, 0], [0, 1, 1, 1]])
  # top-p applies to the top-k distribution: 0.5/0.75 >= 0.6 keeps one token.
  np.testing.assert_array_equal(kept(top_k=2, top_p=0.6), [[1, 0, 0, 0], [0, 0, 1, 1]])

  spec = sampling.SamplingParams(max_new_tokens=1, top_k=2)
  uniforms = jax.random.uniform(jax.random.key(0), (400, 2))   # 400 draws of both rows
  tokens, logps = jax.vmap(lambda u: sampling.select_tokens(logits, u, spec))(uniforms)
  tokens, logps = np.asarray(tokens), np.asarray(logps)
  assert set(tokens[:, 0]) == {0, 1} and set(tokens[:, 1]) == {2, 3}
  renorm = {0: 0.5 / 0.75, 1: 0.25 / 0.75, 2: 0.3 / 0.7, 3: 0.4 / 0.7}
  expected = np.vectorize(renorm.get)(tokens)
  np.testing.assert_allclose(logps, np.log(expected), rtol=1e-5)
  assert abs((tokens[:, 0] == 0).mean() - 2 / 3) < 0.1   # the sampled frequencies follow


@pytest.mark.parametrize('block', [1024, 2, 3])   # one level; two levels, with padding
def test_inverse_cdf_quantiles_and_never_a_zero_probability_token(block):
  pick = lambda probs, u: np.asarray(sampling.inverse_cdf(
      jnp.asarray(probs, jnp.float32), jnp.asarray(u, jnp.float32), block=block))
  probs = [[0.5, 0.25, 0.25]] * 5
  np.testing.assert_array_equal(pick(probs, [0.0, 0.49, 0.51, 0.74, 0.76]), [0, 0, 1, 1, 2])
  # Excluded (zero) entries at both ends and inside; the extreme uniforms land on the first and
  # last allowed token, never beside them.
  probs = [[0.0, 0.3, 0.0, 0.1, 2.0, 0.0, 0.0]] * 4
  u = [0.0, 1e-30, 0.5, float(np.nextafter(np.float32(1), np.float32(0)))]
  tokens = pick(probs, u)
  assert set(tokens) <= {1, 3, 4} and tokens[0] == tokens[1] == 1 and tokens[3] == 4


def test_two_level_inverse_cdf_equals_one_level():
  probs = jnp.exp(3 * jax.random.normal(jax.random.key(0), (512, 1000)))
  probs = probs * (jax.random.uniform(jax.random.key(1), probs.shape) > 0.3)   # some excluded
  u = jax.random.uniform(jax.random.key(2), (512,))
  flat = np.asarray(sampling.inverse_cdf(probs, u, block=1000))
  np.testing.assert_array_equal(np.asarray(sampling.inverse_cdf(probs, u, block=64)), flat)
  assert len(set(flat)) > 100 and np.all(np.asarray(probs)[np.arange(512), flat] > 0)


@pytest.mark.parametrize('axes', [{'branch': 2, 'fsdp': 4, 'tensor': 1},
                                  {'branch': 2, 'fsdp': 2, 'tensor': 2}])
def test_branch_vmapped_sampler_equals_separate_calls_on_a_mesh(axes):
  models = [tiny_model(seed) for seed in (0, 1)]
  graphdef = models[0][0]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *[p for _, p in models])
  per_branch = [prompts(seed=s) for s in (0, 1)]
  tokens = np.stack([t for _, t, _ in per_branch])
  valid = np.stack([v for _, _, v in per_branch])
  keys = jax.random.split(jax.random.key(21), 2)
  spec = sampling.SamplingParams(max_new_tokens=10, top_p=0.9)
  eos = tuple(range(3, CONFIG.vocab_size, 9))
  # Rows split over 'fsdp' (each device loops over its own rows); heads split over 'tensor'.
  mesh = mesh_lib.make_mesh(axes)
  out = sampling.generate_branches(graphdef, stacked, tokens, valid, keys, spec, eos, mesh=mesh)
  assert out.tokens.shape == (2, 4, 20)
  assert out.tokens.sharding.spec[0] == 'branch'
  for k, (graphdef_k, params_k) in enumerate(models):
    ref = sampling.generate(graphdef_k, params_k, tokens[k], valid[k], keys[k], spec, eos)
    np.testing.assert_array_equal(np.asarray(out.tokens[k]), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.completion_mask[k]),
                                  np.asarray(ref.completion_mask))
    np.testing.assert_allclose(np.asarray(out.logprobs[k]), np.asarray(ref.logprobs), atol=1e-5)
  # Weights placed once (on CPU: one shared buffer per shard) and sampled from twice.
  placed = sampling.place_weights(stacked, mesh)
  for _ in range(2):
    again = sampling.generate_branches(graphdef, placed, tokens, valid, keys, spec, eos, mesh=mesh)
    for a, b in zip(again, out):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='another mesh'):
    sampling.generate_branches(graphdef, placed, tokens, valid, keys, spec, eos)
  with pytest.raises(mesh_lib.MeshConfigError, match='does not divide'):
    sampling.generate_branches(graphdef, stacked, tokens, valid, keys, spec, eos,
                               mesh=mesh_lib.make_mesh({'branch': 8}))


# ---------------------------------------------------------------------------- group sharing

G = 4


def grouped_prompts(lengths=(5, 10, 1), length=10, seed=8):
  """One prompt per length, each repeated G times in adjacent rows: [len(lengths) * G, length]."""
  _, tokens, valid = prompts(lengths, length, seed)
  return np.repeat(tokens, G, axis=0), np.repeat(valid, G, axis=0)


GROUP_SPEC = sampling.SamplingParams(max_new_tokens=8)


@pytest.mark.parametrize('mode', [pytest.param('layerwise', marks=pytest.mark.slow), 'model'])
def test_group_sharing_prefill_and_samples_equal_per_row_prefill(model, mode):
  graphdef, params = model
  tokens, valid = grouped_prompts()
  P = tokens.shape[1]
  # The prefill itself: one cache per group, repeated, equals the per-row cache; the slots of
  # the new tokens stay zero and invalid.
  def start(group_size):
    program = decode._Program(graphdef, GROUP_SPEC, NEVER, 0, group_size, mode)
    def run(p, t, v, key):
      state, *_, broken = program.start(program.forward.prepare(
          p, slots=t.shape[1] + GROUP_SPEC.max_new_tokens), t, v,
          program.draws(sampling.row_keys(key, t.shape[0])))
      return broken, state.cache
    return jax.jit(run)(params, tokens, valid, jax.random.key(0))
  (none, per_row), (broken, shared) = start(1), start(G)
  assert none is None and not np.asarray(broken).any()
  for a, b in zip(jax.tree.leaves(per_row), jax.tree.leaves(shared)):
    assert a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)
  new_slots = [x[..., P:] for x in jax.tree.leaves(shared.k)] + [
      x[..., P:, :] for x in jax.tree.leaves(shared.v)] + [shared.valid[:, P:]]
  assert not any(np.asarray(x).any() for x in new_slots)

  for spec in (GROUP_SPEC, sampling.SamplingParams(max_new_tokens=8, greedy=True)):
    ref = sampling.generate(graphdef, params, tokens, valid, jax.random.key(2), spec, NEVER,
                            decode_mode=mode)
    out = sampling.generate(graphdef, params, tokens, valid, jax.random.key(2), spec, NEVER,
                            group_size=G, decode_mode=mode)
    check_layout(out, valid, NEVER, 8)
    for name in ('tokens', 'completion_mask', 'token_valid'):
      np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)))
    # Different prefill batch shapes round differently in the last float32 bits (measured up to
    # ~3e-6 on log-probs of magnitude ~7), hence the file's parity tolerance.
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    completions = {tuple(row) for row in np.asarray(out.tokens)[:G, P:].tolist()}
    assert len(completions) == (1 if spec.greedy else G)   # sampled rows of a group diverge


def test_group_sharing_compiles_once_and_poisons_rows_that_break_the_promise(model):
  graphdef, params = model
  tokens, valid = grouped_prompts()
  sampling.generate(graphdef, params, tokens, valid, jax.random.key(0), GROUP_SPEC, NEVER,
                    group_size=G)
  traced = TRACE_COUNTS['generate']
  other_tokens, other_valid = grouped_prompts((3, 7, 9), seed=9)
  sampling.generate(graphdef, params, other_tokens, other_valid, jax.random.key(1), GROUP_SPEC,
                    NEVER, group_size=G)
  # Rows 1 and 6 get another prompt than their group's first row.
  mixed, mixed_valid = tokens.copy(), valid.copy()
  mixed[1], mixed_valid[1] = other_tokens[0], other_valid[0]
  mixed[6, -1] = (mixed[6, -1] + 1) % CONFIG.vocab_size
  out = sampling.generate(graphdef, params, mixed, mixed_valid, jax.random.key(1), GROUP_SPEC,
                          NEVER, group_size=G)
  assert TRACE_COUNTS['generate'] == traced   # same shapes and group_size: no retrace
  logprobs, completion = np.asarray(out.logprobs), np.asarray(out.completion_mask)
  broken = np.isnan(logprobs).any(axis=1)
  np.testing.assert_array_equal(np.flatnonzero(broken), [1, 6])
  assert np.isnan(logprobs[1][completion[1]]).all()
  assert np.isfinite(logprobs[~broken]).all()
  # A new group_size is a new program.
  sampling.generate(graphdef, params, tokens, valid, jax.random.key(0), GROUP_SPEC, NEVER,
                    group_size=2)
  assert TRACE_COUNTS['generate'] == traced + 1


def test_group_size_must_divide_the_batch(model):
  graphdef, params = model
  tokens, valid = grouped_prompts()   # B = 12
  with pytest.raises(ValueError, match=r'group_size=5 does not divide the batch B=12'):
    sampling.generate(graphdef, params, tokens, valid, jax.random.key(0), GROUP_SPEC, NEVER,
                      group_size=5)
  with pytest.raises(ValueError, match='group_size must be a positive integer'):
    sampling.generate(graphdef, params, tokens, valid, jax.random.key(0), GROUP_SPEC, NEVER,
                      group_size=0)
  stacked = jax.tree.map(lambda x: x[None], params)
  with pytest.raises(ValueError, match=r'group_size=8 does not divide the batch B=12'):
    sampling.generate_branches(graphdef, stacked, tokens[None], valid[None],
                               jax.random.split(jax.random.key(0), 1), GROUP_SPEC, NEVER,
                               group_size=8)


def test_group_sharing_on_the_branch_fsdp_mesh_equals_separate_calls():
  models = [tiny_model(seed) for seed in (0, 1)]
  graphdef = models[0][0]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *[p for _, p in models])
  per_branch = [prompts((6, 2), length=10, seed=s)[1:] for s in (3, 4)]
  tokens = np.stack([np.repeat(t, G, axis=0) for t, _ in per_branch])   # [2, 8, 10]
  valid = np.stack([np.repeat(v, G, axis=0) for _, v in per_branch])
  keys = jax.random.split(jax.random.key(23), 2)
  spec = sampling.SamplingParams(max_new_tokens=10, top_p=0.9)
  eos = tuple(range(3, CONFIG.vocab_size, 9))
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1})
  # 8 rows over fsdp=4: shards of 2 rows hold whole groups of 2; groups of 4 are cut to 2 (the
  # batch stays split over fsdp); 6 rows do not split over fsdp=4 and keep their groups.
  assert [sampling.mesh_group_size(mesh, b, g) for b, g in ((8, 2), (8, 4), (8, 8), (6, 3))] \
      == [2, 2, 2, 3]
  assert sampling.mesh_group_size(mesh_lib.make_mesh({'branch': 2, 'fsdp': 1, 'tensor': 4}), 8, 4) == 4
  out = sampling.generate_branches(graphdef, stacked, tokens, valid, keys, spec, eos, mesh=mesh,
                                   group_size=G)   # runs groups of 2, batch split over fsdp
  assert out.tokens.shape == (2, 8, 20) and out.tokens.sharding.spec[0] == 'branch'
  for k, (graphdef_k, params_k) in enumerate(models):
    ref = sampling.generate(graphdef_k, params_k, tokens[k], valid[k], keys[k], spec, eos)
    for name in ('tokens', 'completion_mask', 'token_valid'):
      np.testing.assert_array_equal(np.asarray(getattr(out, name)[k]),
                                    np.asarray(getattr(ref, name)))
    np.testing.assert_allclose(np.asarray(out.logprobs[k]), np.asarray(ref.logprobs), atol=1e-5)
  assert np.asarray(out.completion_mask).sum(-1).min() >= 1


def test_rollouts_check_groups_names_the_broken_group():
  tokens = np.repeat(np.arange(12, dtype=np.int32).reshape(1, 3, 4), 2, axis=1)   # [1, 6, 4]
  valid = np.ones_like(tokens, bool)
  prompt_groups.check_groups(tokens, valid, 2)
  with pytest.raises(ValueError, match='does not divide'):
    prompt_groups.check_groups(tokens, valid, 4)
  valid[0, 3, 0] = False
  with pytest.raises(ValueError, match=r'valid of branch 0 rows 2\.\.3'):
    prompt_groups.check_groups(tokens, valid, 2)
  with pytest.raises(ValueError, match=r'tokens of branch 0 rows 0\.\.2'):
    prompt_groups.check_groups(tokens, valid, 3)


def test_sample_and_score_with_groups_equals_ungrouped():
  config = Qwen3Config(vocab_size=char_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=64)
  graphdef, params = split_model(Qwen3(config, rngs=nnx.Rngs(1), init_std=0.2))
  stacked = jax.tree.map(lambda x: x[None], params)
  examples = synthetic_domain('count', 0, 3, 0)[0]
  rows = [[e for e in examples for _ in range(G)]]   # the driver's repeat_rows layout, K = 1
  encoder = rollouts.PromptEncoder(char_tokenizer(), {'count': False})
  spec = sampling.SamplingParams(max_new_tokens=6)
  run = lambda rows, group: rollouts.sample_and_score(
      graphdef, stacked, rows, encoder, spec, jax.random.key(3), {'count': 'exact'},
      group_size=group)
  ref, out = run(rows, 1), run(rows, G)
  np.testing.assert_array_equal(out.output.tokens, ref.output.tokens)
  np.testing.assert_array_equal(out.output.completion_mask, ref.output.completion_mask)
  np.testing.assert_allclose(out.output.logprobs, ref.output.logprobs, atol=1e-5)
  assert out.texts == ref.texts and (out.rewards == ref.rewards).all()
  with pytest.raises(ValueError, match=r'branch 0 rows 4\.\.7 are not all the same'):
    run([rows[0][:5] + rows[0][9:10] + rows[0][6:]], G)


@pytest.mark.slow   # eight sampler compiles and a reward worker pool
def test_evaluation_in_groups_on_a_mesh_equals_all_models_on_one_device():
  """Final-evaluation layout (copd_jax.finish.run_groups): two branches on a (branch=2, fsdp=4)
  mesh, base and 'merged' stacked as a second group on it, each model with its own key number;
  the table equals all four models sampled together on one device."""
  config = Qwen3Config(vocab_size=char_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=64)
  graphdef, params = split_model(Qwen3(config, rngs=nnx.Rngs(1), init_std=0.3))
  models = jax.tree.map(lambda x: np.stack([np.asarray(x) * s for s in (1.0, 1.1, 0.9, 1.05)]),
                        params)   # base, branch0, branch1, merged
  pick = lambda *i: jax.tree.map(lambda x: x[np.asarray(i)], models)
  names = ['base', 'b0', 'b1', 'merged']
  eval_sets = {'count': synthetic_domain('count', 0, 4, 0)[0]}
  encoder = rollouts.PromptEncoder(char_tokenizer(), {'count': False})
  args = (eval_sets, encoder, {'count': 'tests.reward_functions:length_mod_3'}, 6, 1.0, 2, 0)
  ref = evaluate_models(graphdef, models, names, *args)
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  groups = [ModelGroup(('b0', 'b1'), pick(1, 2), (1, 2), mesh),
            ModelGroup(('base', 'merged'), pick(0, 3), (0, 3), mesh)]
  out = evaluate_groups(graphdef, groups, *args)
  assert list(out) == names and out == ref
  assert len({v['count'][m] for v in ref.values() for m in v['count']}) > 2   # not all alike


def test_buckets_padding_and_settings_errors():
  assert rollouts.bucket_length(1) == 16 and rollouts.bucket_length(17) == 32
  assert rollouts.bucket_length(5, (4, 8)) == 8
  with pytest.raises(sampling.SamplingConfigError, match='largest bucket 8'):
    rollouts.bucket_length(9, (4, 8))
  tokens, valid = rollouts.pad_prompts([[7, 8], [9]], pad_id=1)
  assert tokens.shape == (2, 16) and tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens[:, -2:], [[7, 8], [1, 9]])
  assert valid.sum() == 3 and valid[1, -1] and not valid[1, -2]
  with pytest.raises(sampling.SamplingConfigError, match='longer than the padded length 1'):
    rollouts.pad_prompts([[1, 2]], 1)
  for bad, field in (({'max_new_tokens': 0}, 'max_new_tokens'),
                     ({'max_new_tokens': 1, 'temperature': 0.0}, 'temperature'),
                     ({'max_new_tokens': 1, 'top_p': 0.0}, 'top_p'),
                     ({'max_new_tokens': 1, 'top_k': -1}, 'top_k')):
    with pytest.raises(sampling.SamplingConfigError, match=field):
      sampling.SamplingParams(**bad)


def test_stop_strings_cut_text_and_masks():
  tok = char_tokenizer()
  ids = tok('ab;cd;', add_special_tokens=False)['input_ids']
  P, N = 2, len(ids) + 2
  tokens = np.zeros((1, P + N), np.int32)
  tokens[0, P:P + len(ids)] = ids
  completion = np.zeros((1, P + N), bool)
  completion[0, P:P + len(ids)] = True
  out = sampling.SampleOutput(tokens, completion.copy(), completion, np.where(completion, -1.0, 0))
  texts, cut = rollouts.apply_stop_strings(out, tok.decode, [';c', 'zz'])
  assert texts == ['ab']
  np.testing.assert_array_equal(cut.completion_mask[0, P:], [1, 1, 1, 1, 0, 0, 0, 0])
  assert (cut.tokens[0, P + 4:] == 0).all() and (cut.logprobs[0, P + 4:] == 0).all()
  texts, same = rollouts.apply_stop_strings(out, tok.decode, ['zz'])
  assert texts == ['ab;cd;'] and (same.completion_mask == completion).all()


@pytest.fixture(scope='module')
def char_model_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('char_model')
  config = Qwen3Config(vocab_size=char_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=64)
  model = Qwen3(config, rngs=nnx.Rngs(0), init_std=0.2)
  hf_io.save_hf_folder(hf_io.model_params_dict(model), config, str(folder / 'm'),
                       tokenizer=char_tokenizer())
  return str(folder / 'm')


def test_generate_cli_prints_completions(char_model_folder, capsys):
  code = cli_main(['generate', '--model', char_model_folder, '--prompt', '12+7', '--greedy',
                   '--max-new-tokens', '6'])
  assert code == 0
  greedy = capsys.readouterr().out
  assert greedy.endswith('\n') and greedy.strip()
  code = cli_main(['generate', '--model', char_model_folder, '--prompt', 'hi', '--chat',
                   '--num-samples', '3', '--seed', '4', '--max-new-tokens', '5'])
  out = capsys.readouterr().out
  assert code == 0 and out.count('--- sample ') == 3


def test_generate_cli_missing_folder_is_one_line_error(tmp_path, capsys):
  code = cli_main(['generate', '--model', str(tmp_path / 'nope'), '--prompt', 'x'])
  err = capsys.readouterr().err
  assert code == 2
  assert err.count('\n') == 1 and err.startswith('error: ') and 'nope' in err
