"""data.max_prompt_tokens / data.long_prompts: long prompts dropped or truncated at set-up,
counted per domain and split, logged once; the run's prompt bucket follows the cap."""
import os

import pytest

from copd_jax.config import ConfigError, load_config
from copd_jax.data import Example
from copd_jax.data.prompt_limit import limit_prompts, prompt_limit_lines
from copd_jax.models.tokenizer import char_tokenizer
from copd_jax.rollouts import PromptEncoder
from copd_jax.run_setup import apply_prompt_limit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'configs', 'toy_copd.py')
MESH = ('--config.mesh.branch=1', '--config.mesh.fsdp=-1')


def _examples(domain, lengths, split='train'):
  return [Example('x' * n, '1', domain, f'{domain}-{split}{i}') for i, n in enumerate(lengths)]


def _domains():
  """'a': train 5 prompts (two over 10 chars), eval 2 (one over); 'b': nothing over."""
  return {'a': (_examples('a', [3, 12, 10, 30, 4]), _examples('a', [11, 2], 'eval')),
          'b': (_examples('b', [5, 6]), _examples('b', [7], 'eval'))}


def _encoder():
  return PromptEncoder(char_tokenizer(), {'a': False, 'b': False})   # one token per character


def test_drop_removes_long_prompts_and_counts_them():
  encoder = _encoder()
  kept, counts = limit_prompts(_domains(), encoder, 10, 'drop')
  assert [len(e.prompt) for e in kept['a'][0]] == [3, 10, 4]
  assert [len(e.prompt) for e in kept['a'][1]] == [2]
  assert [(c.domain, c.split, c.total, c.over, c.longest) for c in counts] == [
      ('a', 'train', 5, 2, 30), ('a', 'eval', 2, 1, 11), ('b', 'train', 2, 0, 6),
      ('b', 'eval', 1, 0, 7)]
  assert encoder.max_tokens == 0


def test_truncate_keeps_every_prompt_and_cuts_to_its_end():
  encoder = _encoder()
  domains = _domains()
  kept, counts = limit_prompts(domains, encoder, 10, 'truncate')
  assert kept == domains
  assert [c.over for c in counts] == [2, 1, 0, 0]
  long = domains['a'][0][3]
  assert len(encoder.full_ids(long)) == 30 and encoder.ids(long) == encoder.full_ids(long)[-10:]
  tokens, valid = encoder.encode([[long, domains['a'][0][0]]])
  assert tokens.shape[-1] <= 16 and valid.sum() == 13   # bucket of 10 tokens, 10 + 3 valid


def test_no_limit_changes_nothing():
  domains = _domains()
  assert limit_prompts(domains, _encoder(), 0, 'drop') == (domains, [])


def test_dropping_every_prompt_of_a_split_names_the_field():
  with pytest.raises(ConfigError, match=r"config\.data\.max_prompt_tokens: all 1 eval prompts of "
                                        r"domain 'b' are longer than 4 tokens"):
    limit_prompts({'b': (_examples('b', [3]), _examples('b', [9], 'eval'))}, _encoder(), 4, 'drop')


def test_the_set_up_logs_one_line_per_domain():
  config = load_config(TOY, MESH + ('--config.data.max_prompt_tokens=10',), check_files=False)
  logs = []
  kept = apply_prompt_limit(config, _domains(), _encoder(), logs.append)
  assert logs == [
      "data.max_prompt_tokens=10: domain 'a': dropped 2 of 5 train and 1 of 2 eval prompts "
      '(longest 30 tokens)',
      "data.max_prompt_tokens=10: domain 'b': dropped 0 of 2 train and 0 of 1 eval prompts "
      '(longest 7 tokens)']
  assert len(kept['a'][0]) == 3
  counts = limit_prompts(_domains(), _encoder(), 10, 'truncate')[1]
  assert prompt_limit_lines(counts, 10, 'truncate')[0].startswith(
      "data.max_prompt_tokens=10: domain 'a': truncated 2 of 5 train and 1 of 2 eval")
  logs = []
  apply_prompt_limit(load_config(TOY, MESH, check_files=False), _domains(), _encoder(),
                     logs.append)
  assert logs == []   # the default: no limit, nothing logged


@pytest.mark.parametrize('override, field', [
    ('--config.data.max_prompt_tokens=-1', 'data.max_prompt_tokens'),
    ('--config.data.long_prompts=keep', 'data.long_prompts'),
])
def test_bad_values_name_the_field(override, field):
  with pytest.raises(ConfigError) as error:
    load_config(TOY, MESH + (override,), check_files=False)
  assert str(error.value).startswith(f'config.{field}')
