"""The continuous-batching engine (copd_jax/sampling/engine.py) against the static decoder: the
same tokens, masks and log-probs per row whatever the slot count, admission order, admission
batch (prompts per prefill) and prefill chunk, with natural and forced EOS, group-shared
prefill, branches on a mesh; one compile per shape; the token budget's slot count, the
admission sizes, the chunk length and their errors."""
import jax
import numpy as np
import pytest

from copd_jax import mesh as mesh_lib
from copd_jax import sampling
from copd_jax.errors import UserInputError
from copd_jax.sampling import engine
from copd_jax.tracing import TRACE_COUNTS
from tests.test_sampling import NEVER, check_layout, prompts, tiny_model

EOS = tuple(range(3, 96, 9))   # ids the tiny model does emit: rows end at uneven lengths
SPEC = sampling.SamplingParams(max_new_tokens=12)
LENGTHS = (5, 9, 1, 7, 0, 3, 8, 2)   # one row without a prompt
FORCED = np.array([3, 12, 1, 6, 4, 9, 2, 12])


@pytest.fixture(scope='module')
def model():
  return tiny_model()


def assert_same_rows(out, ref):
  """Tokens and masks exactly; log-probs to the sampler tests' parity tolerance (a different
  prefill batch shape rounds the last float32 bits differently)."""
  for name in ('tokens', 'token_valid', 'completion_mask'):
    np.testing.assert_array_equal(np.asarray(getattr(out, name)), np.asarray(getattr(ref, name)))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


# The natural-EOS case is slow (minutes loaded): the forced case checks the same slots and
# orders; test_engine_group_sharing_* keep natural EOS in the default suite.
@pytest.mark.parametrize('eos_at', [pytest.param(None, marks=pytest.mark.slow), FORCED],
                         ids=['natural', 'forced'])
def test_engine_equals_static_decoder_for_any_slots_and_order(model, eos_at):
  graphdef, params = model
  _, tokens, valid = prompts(LENGTHS, 10, seed=3)
  cache_length = tokens.shape[1] + SPEC.max_new_tokens
  ref = sampling.generate(graphdef, params, tokens, valid, jax.random.key(1), SPEC, EOS,
                          eos_at=eos_at)
  check_layout(ref, valid, EOS, SPEC.max_new_tokens)
  lengths = np.asarray(ref.completion_mask).sum(axis=1)
  assert len(set(lengths.tolist())) > 3   # uneven: rows leave their slots at different steps
  if eos_at is not None:
    np.testing.assert_array_equal(lengths, np.where(LENGTHS, eos_at, 0))
  rng = np.random.RandomState(0)
  # With the default prefill_prompts (8): 3 slots admit up to 3 prompts per prefill, 8 slots
  # all 8 prompts in one prefill.
  for slots, order in ((1, None), (3, rng.permutation(8)), (8, rng.permutation(8))):
    out = engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(1), SPEC, EOS,
                                 settings=engine.EngineSettings(slots * cache_length),
                                 order=order, eos_at=eos_at)
    assert_same_rows(out, ref)


LONG = (5, 16, 1, 11, 0, 3, 14, 2)   # prompts of up to 16 tokens in a bucket of 16


@pytest.mark.slow  # chunked prefill also runs in test_engine_group_sharing_with_several_groups_*
def test_engine_equals_static_for_any_admission_batch_and_prefill_chunk(model):
  """Several prompts per prefill (a few at a time while others decode) and chunked prefill
  (chunks of 4 or 8 of the 16 prompt columns, leading padding chunks skipped, interleaved with
  decode steps): the static decoder's rows, with natural and forced EOS."""
  graphdef, params = model
  _, tokens, valid = prompts(LONG, 16, seed=11)
  cache_length = tokens.shape[1] + SPEC.max_new_tokens
  refs = {}
  for name, eos_at in (('natural', None), ('forced', FORCED)):
    refs[name] = sampling.generate(graphdef, params, tokens, valid, jax.random.key(4), SPEC, EOS,
                                   eos_at=eos_at)
    assert len(set(np.asarray(refs[name].completion_mask).sum(axis=1).tolist())) > 3
  order = np.random.RandomState(1).permutation(8)
  # (Every free slot's prompt in one prefill: the default prefill_prompts in the test above.)
  for slots, prefill_prompts, chunk, order_, eos in ((5, 3, 4, order, 'forced'),
                                                     (8, 2, 8, order[::-1], 'natural')):
    settings = engine.EngineSettings(slots * cache_length, prefill_prompts, chunk)
    out = engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(4), SPEC, EOS,
                                 settings=settings, order=order_,
                                 eos_at=FORCED if eos == 'forced' else None)
    assert_same_rows(out, refs[eos])


def test_engine_group_sharing_with_several_groups_per_chunked_prefill(model):
  graphdef, params = model
  G = 4
  _, tokens, valid = prompts((5, 16, 1, 9), 16, seed=12)
  tokens, valid = np.repeat(tokens, G, axis=0), np.repeat(valid, G, axis=0)
  ref = sampling.generate(graphdef, params, tokens, valid, jax.random.key(5), SPEC, EOS,
                          group_size=G)
  out = engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(5), SPEC, EOS,
                               group_size=G, order=[3, 1, 0, 2],
                               settings=engine.EngineSettings(3 * G * 28, 2, 8))
  assert_same_rows(out, ref)


def test_admission_sizes_and_chunk_length():
  # Powers of two up to the most one admission takes, and that most: a static set of prefills.
  assert engine.admission_sizes(8, slots=64, group_size=8) == (1, 2, 4, 8)
  assert engine.admission_sizes(8, slots=24, group_size=4) == (1, 2, 4, 6)
  assert engine.admission_sizes(1, slots=64, group_size=1) == (1,)
  assert engine.admission_sizes(16, slots=4, group_size=4) == (1,)
  assert engine.chunk_length(0, 32) == 32
  assert engine.chunk_length(64, 32) == 32
  assert engine.chunk_length(8, 32) == 8
  with pytest.raises(ValueError, match='prefill_chunk 4 must divide the prompt length 10'):
    engine.chunk_length(4, 10)


def test_engine_compiles_once_per_shape(model):
  graphdef, params = model
  _, tokens, valid = prompts(LENGTHS, 10, seed=4)
  settings = engine.EngineSettings(2 * (10 + SPEC.max_new_tokens))
  before = TRACE_COUNTS['engine_branches']
  for order, eos_at in ((None, None), ([7, 6, 5, 4, 3, 2, 1, 0], None), (None, FORCED),
                        ([1, 0, 3, 2, 5, 4, 7, 6], FORCED[::-1])):
    engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(2), SPEC, EOS,
                           settings=settings, order=order, eos_at=eos_at)
  # One trace without forced lengths and one with: admission order and the lengths are data.
  assert TRACE_COUNTS['engine_branches'] - before == 2


def test_engine_group_sharing_equals_static_and_poisons_broken_groups(model):
  graphdef, params = model
  G = 4
  _, tokens, valid = prompts((5, 10, 1), 10, seed=8)
  tokens, valid = np.repeat(tokens, G, axis=0), np.repeat(valid, G, axis=0)
  ref = sampling.generate(graphdef, params, tokens, valid, jax.random.key(2), SPEC, EOS,
                          group_size=G)
  out = engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(2), SPEC, EOS,
                               group_size=G, order=[2, 0, 1],
                               settings=engine.EngineSettings(G * 22))
  assert_same_rows(out, ref)
  completions = {tuple(row) for row in np.asarray(out.tokens)[:G, 10:].tolist()}
  assert len(completions) > 1   # a group's rows sample on their own keys
  tokens[1, -1] += 1   # row 1 breaks its group's promise: NaN log-probs, as the static decoder
  out = engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(2), SPEC, EOS,
                               group_size=G, settings=engine.EngineSettings(G * 22))
  broken = np.isnan(np.asarray(out.logprobs)).any(axis=1)
  assert broken.tolist() == [False, True] + [False] * 10


@pytest.mark.slow   # two models, a (2, 2, 2) mesh: about 25 s of CPU
def test_engine_branches_on_a_mesh_equal_static(model):
  models = [tiny_model(seed) for seed in (0, 1)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *(p for _, p in models))
  graphdef = models[0][0]
  _, tokens, valid = prompts(LENGTHS, 10, seed=5)
  tokens, valid = np.stack([tokens, tokens[::-1]]), np.stack([valid, valid[::-1]])
  keys = jax.random.split(jax.random.key(9), 2)
  eos_at = np.stack([FORCED, FORCED[::-1]])
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 2, 'tensor': 2})
  ref = sampling.generate_branches(graphdef, stacked, tokens, valid, keys, SPEC, EOS,
                                   eos_at=eos_at)
  for mesh_, budget in ((mesh, 2 * 22), (None, 3 * 22)):
    out = engine.engine_generate_branches(graphdef, stacked, tokens, valid, keys, SPEC, EOS,
                                          mesh=mesh_, settings=engine.EngineSettings(budget),
                                          eos_at=eos_at)
    assert_same_rows(out, ref)


def test_slot_count_from_the_token_budget():
  assert engine.slot_count(0, 100, rows=12, group_size=4) == 12
  assert engine.slot_count(1000, 100, rows=12, group_size=4) == 8
  assert engine.slot_count(10_000, 100, rows=12, group_size=1) == 12
  with pytest.raises(UserInputError, match='sampling.kv_token_budget=300 .* at least 400'):
    engine.slot_count(300, 100, rows=12, group_size=4)
  with pytest.raises(UserInputError, match='kv_token_budget'):
    engine.EngineSettings(kv_token_budget=-1)


def test_never_emitted_eos_runs_every_row_to_the_end(model):
  graphdef, params = model
  _, tokens, valid = prompts(LENGTHS, 10, seed=6)
  out = engine.engine_generate(graphdef, params, tokens, valid, jax.random.key(3), SPEC, NEVER,
                               settings=engine.EngineSettings(3 * 22))
  check_layout(out, valid, NEVER, SPEC.max_new_tokens)
  np.testing.assert_array_equal(np.asarray(out.completion_mask).sum(axis=1),
                                np.where(LENGTHS, SPEC.max_new_tokens, 0))


def test_config_fields_name_themselves():
  from copd_jax.configs.base import base_config
  config = base_config()
  config.sampling.decoder = 'engine'
  assert engine.EngineSettings.from_config(config) == engine.EngineSettings(0)
  config.sampling.decoder = 'static'
  assert engine.EngineSettings.from_config(config) is None
  config.sampling.decoder = 'paged'
  with pytest.raises(UserInputError, match="config.sampling.decoder must be one of"):
    engine.EngineSettings.from_config(config)
  config.sampling.decoder = 'engine'
  config.sampling.kv_token_budget = -5
  with pytest.raises(UserInputError, match='sampling.kv_token_budget'):
    engine.EngineSettings.from_config(config)
  config.sampling.kv_token_budget = 0
  config.sampling.prefill_chunk = 24
  with pytest.raises(UserInputError, match='sampling.prefill_chunk: must be 0 or a power of two'):
    engine.EngineSettings.from_config(config)
  config.sampling.prefill_chunk = 256
  config.sampling.prefill_prompts = 0
  with pytest.raises(UserInputError, match='sampling.prefill_prompts: must be a positive'):
    engine.EngineSettings.from_config(config)
  config.sampling.prefill_prompts = 4
  assert engine.EngineSettings.from_config(config) == engine.EngineSettings(0, 4, 256)


@pytest.mark.slow   # four sampler compiles: about 45 s of CPU
def test_evaluation_through_the_engine_samples_the_static_decoders_tokens(monkeypatch):
  """evaluate_models with the engine (greedy pass@1: one row per prompt, several prompts per
  prefill; avg@k: groups of k sharing a prefill; chunked prefill) samples, call by call, the
  tokens the static decoder samples, so the table is the same."""
  from copd_jax import evaluation
  from copd_jax.data import synthetic_domain
  from copd_jax.models.qwen3 import Qwen3, Qwen3Config
  from copd_jax.models.tokenizer import char_tokenizer, char_vocab_size
  from copd_jax.rollouts import PromptEncoder
  from copd_jax.scoring import split_model
  from flax import nnx
  config = Qwen3Config(vocab_size=char_vocab_size(), hidden_size=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, intermediate_size=64)
  graphdef, params = split_model(Qwen3(config, rngs=nnx.Rngs(1), init_std=0.3))
  stacked = jax.tree.map(lambda x: np.stack([np.asarray(x), np.asarray(x) * 1.1]), params)
  eval_sets = {'count': synthetic_domain('count', 0, 6, 0)[0]}
  encoder = PromptEncoder(char_tokenizer(), {'count': False})
  calls = []
  real = evaluation.sample_and_score

  def recording(*args, **kwargs):
    out = real(*args, **kwargs)
    calls.append((kwargs['engine'], out.output))
    return out

  monkeypatch.setattr(evaluation, 'sample_and_score', recording)
  run = lambda engine_settings: evaluation.evaluate_models(
      graphdef, stacked, ['a', 'b'], eval_sets, encoder, {'count': 'exact'}, 6, 1.0, 2, 0,
      rows_per_call=4, engine=engine_settings)
  static = run(None)
  settings = engine.EngineSettings(kv_token_budget=0, prefill_prompts=2, prefill_chunk=8)
  assert run(settings) == static
  half = len(calls) // 2
  assert half == 5   # greedy: 2 calls of 4 rows; avg@2: 3 calls of 2 groups of 2
  for (none, ref), (used, out) in zip(calls[:half], calls[half:]):
    assert none is None and used == settings
    assert_same_rows(out, ref)
