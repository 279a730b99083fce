"""Prompts padded per batch to their own bucket (copd_jax/prompt_buckets.py): the encoder picks
the smallest bucket of each batch, padding a batch further changes no update, and the GRPO step
compiles once per prompt length it meets."""
import numpy as np
import pytest

from copd_jax.data.domain import Example, PromptFormat
from copd_jax.models.tokenizer import char_tokenizer
from copd_jax.prompt_buckets import StepPerPromptLength, pad_batch
from copd_jax.rollouts import PromptEncoder
from copd_jax.steps import TRACE_COUNTS, StepConfig, make_grpo_step
from tests.test_steps import (CFG, OPTIMIZER, PROMPT, T, _assert_trees_close, _batch, _leaves,
                              _one_device_mesh, _perturbed_stack, _state, model)  # noqa: F401


def _example(prompt: str, i: int) -> Example:
  return Example(prompt=prompt, answer='1', domain='d', id=str(i))


def test_each_batch_is_padded_to_the_bucket_of_its_own_longest_prompt():
  encoder = PromptEncoder(char_tokenizer(), {'d': PromptFormat(use_chat_template=False)})
  short = [[_example('1+1', 0), _example('2+2', 1)]]
  long = [[_example('1+1', 0), _example('9' * 20, 2)]]
  encoder.fix_length(20)   # the run's longest prompt: 20 tokens, bucket 32
  assert encoder.length == 32
  tokens, valid = encoder.encode(short)
  assert tokens.shape == (1, 2, 16) and valid.sum() == 6
  tokens, valid = encoder.encode(long)
  assert tokens.shape == (1, 2, 32) and valid.sum() == 23
  np.testing.assert_array_equal(encoder.encode(short, length=32)[0][..., 16:],
                                encoder.encode(short)[0])   # left padding: the end is the same


def test_pad_batch_adds_columns_that_are_neither_valid_scored_nor_advantaged():
  batch = _batch(0, (2, 4))
  padded = pad_batch(batch, T + 5, pad_id=7)
  assert padded.tokens.shape == (2, 4, T + 5)
  assert (padded.tokens[..., :5] == 7).all() and not padded.token_valid[..., :5].any()
  assert not padded.completion_mask[..., :5].any() and not padded.advantages[..., :5].any()
  assert padded.vision is None and batch.vision is None   # a text batch has no pictures
  for new, old in zip(padded[:5], batch[:5]):
    np.testing.assert_array_equal(np.asarray(new)[..., 5:], old)
  assert pad_batch(batch, T) is batch
  with pytest.raises(ValueError, match='cannot pad a batch of 12 tokens to 8'):
    pad_batch(batch, 8)


@pytest.mark.slow   # two compiled GRPO steps: about 30 s on an idle 2-core machine
def test_a_grpo_step_at_two_paddings_gives_the_same_update_and_one_compile_each(model):
  graphdef, params = model
  mesh = _one_device_mesh()
  stacked = _perturbed_stack(params, 2)
  _, shardings = _state(stacked, OPTIMIZER, mesh)
  config = StepConfig(max_completion_tokens=T - PROMPT, group_size=2, prompt_length=PROMPT,
                      **CFG)
  step = StepPerPromptLength(
      lambda cfg: make_grpo_step(graphdef, OPTIMIZER, mesh, cfg, shardings), config)
  batch = _batch(0, (2, 8))
  wider = pad_batch(batch, T + 16)   # the same prompts in a bucket 16 tokens longer
  before = TRACE_COUNTS['grpo_step']
  narrow_state, narrow = step(_state(stacked, OPTIMIZER, mesh)[0], batch)
  wide_state, wide = step(_state(stacked, OPTIMIZER, mesh)[0], wider)
  step(_state(stacked, OPTIMIZER, mesh)[0], batch)   # a length met before: no new compile
  assert TRACE_COUNTS['grpo_step'] - before == 2
  assert sorted(step.steps) == [PROMPT, PROMPT + 16]
  for key in ('loss', 'grad_norm', 'entropy', 'approx_kl'):
    np.testing.assert_allclose(wide[key], narrow[key], rtol=1e-5, atol=1e-7, err_msg=key)
  np.testing.assert_array_equal(wide['prompt_mismatch'], 0.0)   # the groups still share prompts
  _assert_trees_close(wide_state.params, narrow_state.params)
  moved = max(np.abs(a - b).max() for a, b in zip(_leaves(narrow_state.params), _leaves(stacked)))
  assert moved > 1e-4


@pytest.mark.slow   # a tiny in-process run: warm start, 4 steps, merge, evaluation
def test_a_run_with_a_few_long_prompts_compiles_one_step_per_bucket_it_uses(tmp_path):
  """The count domain from a file where every fourth prompt is long (bucket 64, the others fit
  16 or 32): batches take their own bucket, and the GRPO step compiles once per prompt length
  its batches have (the OPD step at most once per bucket)."""
  import json
  import os
  from copd_jax.config import load_config
  from copd_jax.data.synthetic import synthetic_domain
  from copd_jax.driver import train
  from copd_jax.hooks import Hook
  from tests.test_driver import ROOT, TINY
  paths = {}
  for split, examples in zip(('train', 'eval'), synthetic_domain('count', 200, 8, 8)):
    paths[split] = str(tmp_path / f'count_{split}.jsonl')
    with open(paths[split], 'w') as f:
      for i, e in enumerate(examples):
        prompt = ('Count the letters carefully: ' + e.prompt
                  if i % 4 == 3 else e.prompt)
        f.write(json.dumps({'prompt': prompt, 'answer': e.answer}) + '\n')
  config = load_config(os.path.join(ROOT, 'configs/toy_copd.py'), TINY + [
      '--config.mesh.fsdp=4', '--config.domains.count.source=file',
      f'--config.domains.count.train_path={paths["train"]}',
      f'--config.domains.count.eval_path={paths["eval"]}'])
  lengths = {}

  class Shapes(Hook):
    def before_update(self, step, batch):
      lengths[step] = batch.tokens.shape[-1] - config.sampling.max_new_tokens
      return batch

  before = dict(TRACE_COUNTS)
  train(config, str(tmp_path / 'run'), log=lambda _: None, progress=False, hooks=[Shapes()])
  traced = {k: TRACE_COUNTS[k] - before.get(k, 0) for k in ('grpo_step', 'opd_step')}
  buckets = {16, 32, 64}   # of the run's prompts: 10 to 18 tokens, the long ones 41 to 50
  assert set(lengths.values()) <= buckets, lengths
  rl = {lengths[0], lengths[1]}
  assert traced['grpo_step'] == len(rl), (traced, lengths)   # once per prompt length met
  assert 1 <= traced['opd_step'] <= len(buckets), (traced, lengths)
