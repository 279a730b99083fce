"""The prompt length a plan takes (commands/plan.py): by default the bucket `train` pads the
run's prompts to (its domains loaded and encoded by run_setup.load_domains / prompt_encoder, the
calls of train's set-up, data.max_prompt_tokens applied), else the bucket of
data.max_prompt_tokens or 256 tokens, said in one `prompts:` line with the reason."""
import json
import os

import pytest

from copd_jax.__main__ import main
from copd_jax.data.synthetic import synthetic_domain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, 'configs', 'toy_copd.py')
PLAN = ['plan', '--config', TOY, '--devices', '8', '--no-leaves']


def _prompts_line(out: str) -> str:
  lines = [line for line in out.splitlines() if line.startswith('prompts: ')]
  assert len(lines) == 1, out
  return lines[0]


@pytest.fixture()
def sort_files(tmp_path):
  """The sort domain from files where every fourth prompt is long: with the toy's character
  tokenizer the others (and the synthetic reverse domain's) fit bucket 16, the long ones 64."""
  overrides = ['--config.domains.sort.source=file']
  for split, examples in zip(('train', 'eval'), synthetic_domain('sort', 3, 16, 8)):
    path = str(tmp_path / f'sort_{split}.jsonl')
    with open(path, 'w') as f:
      for i, e in enumerate(examples):
        prompt = 'Sort the digits carefully now: ' + e.prompt if i % 4 == 3 else e.prompt
        f.write(json.dumps({'prompt': prompt, 'answer': e.answer}) + '\n')
    overrides.append(f'--config.domains.sort.{split}_path={path}')
  return overrides


def test_the_plan_takes_the_bucket_train_pads_the_runs_prompts_to(capsys, sort_files):
  assert main([*PLAN, *sort_files]) == 0
  out = capsys.readouterr().out
  assert _prompts_line(out) == ("prompts: 64 tokens, the bucket of the run's longest prompt as "
                                'train pads it (--prompt-tokens sets another)')
  assert 'T = 64 prompt + 12 new tokens' in out
  # data.max_prompt_tokens=40 drops the long prompts (data.long_prompts='drop'): the longest
  # kept is in bucket 16, below the bucket of the limit itself (64), which a plan without the
  # data takes.
  assert main([*PLAN, *sort_files, '--config.data.max_prompt_tokens=40']) == 0
  out = capsys.readouterr().out
  assert _prompts_line(out).startswith("prompts: 16 tokens, the bucket of the run's longest")
  assert 'T = 16 prompt' in out
  assert main([*PLAN, *sort_files, '--prompt-tokens', '128']) == 0
  out = capsys.readouterr().out
  assert _prompts_line(out) == 'prompts: 128 tokens (--prompt-tokens)'
  assert 'T = 128 prompt' in out


def test_without_readable_data_the_plan_says_why_and_what_it_takes(capsys, sort_files,
                                                                    tmp_path):
  missing = str(tmp_path / 'absent.jsonl')
  no_data = [*sort_files, f'--config.domains.sort.train_path={missing}']
  assert main([*PLAN, *no_data]) == 0
  line = _prompts_line(capsys.readouterr().out)
  assert line.startswith("prompts: 256 tokens, a default: the run's prompts are unknown here (")
  assert missing in line and line.endswith('); --prompt-tokens sets another')
  assert main([*PLAN, *no_data, '--config.data.max_prompt_tokens=40']) == 0
  assert _prompts_line(capsys.readouterr().out).startswith(
      'prompts: 64 tokens, the bucket of data.max_prompt_tokens=40: ')
