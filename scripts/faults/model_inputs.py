"""Bad model folders and absurd sizes (issue 21, points 6, 7, 10 and 11): a Hugging Face folder
with a NaN, infinite or integer weight, without a usable tokenizer, with a malformed chat
template, with fewer layers in config.json than in its weights, with a tokenizer larger than
the model, through `export-hf`, `train` and `generate --chat`; a 200,000-character prompt on
the HF model; `generate --prompt` with characters the tokenizer does not know (one warning line
naming them); `plan --devices 100000000`. Each must exit 2 with one line naming the tensor,
field, file:line or flag before any compute, and leave no workdir behind. A tensor the model
does not use is loaded past with one warning line naming it."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

from scripts.faults import report
from scripts.faults.cli import BASE_OVERRIDES, TOY_CONFIG, CliResult, run_cli, tripwire

TENSOR = 'model.layers.1.mlp.down_proj.weight'


def hf_folder(folder: str, vocab_size: int = 128) -> str:
  """A tiny Qwen3 HF folder (char tokenizer, 100 tokens) in `folder`/hf; its embedding has
  `vocab_size` rows (fewer than 100: a tokenizer larger than the model)."""
  import jax
  import numpy as np
  from flax import nnx
  from copd_jax.models import hf_io
  from copd_jax.models.qwen3 import Qwen3
  from copd_jax.models.tokenizer import char_tokenizer
  from tests.test_checkpoint import TINY
  config = dataclasses.replace(TINY, vocab_size=vocab_size)
  out = os.path.join(folder, 'hf')
  model = Qwen3(config, rngs=nnx.Rngs(0))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  hf_io.save_hf_folder(params, config, out, tokenizer=char_tokenizer())
  return out


def _rewrite(folder: str, change: Callable) -> None:
  from safetensors.numpy import load_file, save_file
  path = os.path.join(folder, 'model.safetensors')
  tensors = load_file(path)
  tensors[TENSOR] = change(tensors[TENSOR])
  save_file(tensors, path, metadata={'format': 'pt'})


def _one_nan(t):
  import numpy as np
  t = t.copy()
  t.flat[3] = np.nan
  return t


def _bad_chat_template(folder: str) -> None:
  """The chat template moved into tokenizer_config.json, with a `}` missing on its line 2."""
  import json
  jinja = os.path.join(folder, 'chat_template.jinja')
  if os.path.exists(jinja):
    os.remove(jinja)
  path = os.path.join(folder, 'tokenizer_config.json')
  with open(path) as f:
    config = json.load(f)
  config['chat_template'] = "{% for m in messages %}\n{{ m['content'] }\n{% endfor %}"
  with open(path, 'w') as f:
    json.dump(config, f)


def _config_field(name: str, value) -> Callable[[str], None]:
  def damage(folder: str) -> None:
    import json
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
      config = json.load(f)
    config[name] = value
    with open(path, 'w') as f:
      json.dump(config, f)
  return damage


def _extra_tensor(t_folder: str) -> None:
  from safetensors.numpy import load_file, save_file
  import numpy as np
  path = os.path.join(t_folder, 'model.safetensors')
  tensors = load_file(path)
  tensors['model.mtp_head.weight'] = np.zeros((4, 4), np.float32)
  save_file(tensors, path, metadata={'format': 'pt'})


def _remove(*names: str) -> Callable[[str], None]:
  def damage(folder: str) -> None:
    for name in names:
      path = os.path.join(folder, name)
      if os.path.exists(path):
        os.remove(path)
  return damage


@dataclasses.dataclass(frozen=True)
class ModelCase:
  label: str
  damage: Callable[[str], None]
  expect: str
  commands: tuple[str, ...] = ('export-hf', 'train')
  warns: bool = False   # exit 0 with one `warning:` line holding `expect`, not an error
  vocab_size: int = 128  # rows of the folder's embedding (the tokenizer has 100 tokens)


CASES = (
    ModelCase('one NaN in an HF weight', lambda f: _rewrite(f, _one_nan),
              f'tensor {TENSOR} has 1', ('export-hf', 'train', 'generate')),
    ModelCase('an HF weight all +inf',
              lambda f: _rewrite(f, lambda t: __import__('numpy').full_like(t, float('inf'))),
              'NaN or inf'),
    ModelCase('an integer HF weight (int32)', lambda f: _rewrite(f, lambda t: t.astype('int32')),
              'has dtype int32'),
    ModelCase('no tokenizer.json (tokenizer_config.json only)', _remove('tokenizer.json'),
              'tokenizer_config.json alone holds no vocabulary', ('train',)),
    ModelCase('no tokenizer at all', _remove('tokenizer.json', 'tokenizer_config.json',
                                             'special_tokens_map.json'),
              'no tokenizer in', ('train',)),
    ModelCase('a malformed chat template in tokenizer_config.json', _bad_chat_template,
              "tokenizer_config.json: chat_template line 2: unexpected '}'",
              ('generate', 'train')),
    ModelCase('config.json with fewer layers than the weights (1 of 2)',
              _config_field('num_hidden_layers', 1),
              "past config.json's num_hidden_layers=1 (model.layers.1.*"),
    ModelCase('a weight stored transposed', lambda f: _rewrite(f, lambda t: t.T.copy()),
              '(the tensor is stored transposed)'),
    ModelCase('a tensor the model does not use', _extra_tensor,
              'tensor(s) the model does not use, ignored: model.mtp_head.weight', ('export-hf',),
              warns=True),
    ModelCase('a tokenizer larger than the model (100 tokens, vocab_size 64)', lambda f: None,
              'but the model has 64 embeddings (vocab_size of', ('train',), vocab_size=64),
)


def try_case(case: ModelCase, command: str, folder: str) -> tuple[CliResult, bool]:
  """(result, ok) of `command` on a fresh damaged folder in `folder`. `train` runs with the
  step builders as a tripwire: a bad folder that got past loading shows as 'compute started'."""
  model = hf_folder(folder, case.vocab_size)
  case.damage(model)
  workdir = os.path.join(folder, 'workdir')
  if command == 'export-hf':
    result = run_cli(['export-hf', '--checkpoint', model, '--out', os.path.join(folder, 'out')])
    left = os.path.exists(os.path.join(folder, 'out')) != case.warns
  elif command == 'generate':
    with tripwire('copd_jax.commands.generate.generate'):
      result = run_cli(['generate', '--model', model, '--prompt', '12+7', '--chat'])
    left = False
  else:
    with tripwire('copd_jax.run_setup.make_grpo_step'):
      result = run_cli(['train', '--config', TOY_CONFIG, '--workdir', workdir, '--no-progress',
                        *BASE_OVERRIDES, '--config.model.source=hf',
                        f'--config.model.hf_path={model}'])
    left = os.path.exists(workdir)
  if case.warns:
    warned = [l for l in result.lines if l.startswith('warning: ')]
    return result, (result.code == 0 and len(warned) == 1 and case.expect in warned[0]
                    and not left)
  return result, result.one_error_line and case.expect in result.message and not left


def long_prompt_case(folder: str) -> tuple[CliResult, bool]:
  """A 200,000-character prompt on line 2 of a file domain, on the HF model: refused naming the
  file and line before the model is loaded."""
  import json
  model = hf_folder(folder)
  data = os.path.join(folder, 'long.jsonl')
  with open(data, 'w') as f:
    for row in ({'prompt': '12+7', 'answer': '19'}, {'prompt': '1+' * 100_000, 'answer': '2'}):
      f.write(json.dumps(row) + '\n')
  workdir = os.path.join(folder, 'workdir')
  with tripwire('copd_jax.models.hf_io.load_model'):
    result = run_cli(['train', '--config', TOY_CONFIG, '--workdir', workdir, '--no-progress',
                      *BASE_OVERRIDES, '--config.model.source=hf',
                      f'--config.model.hf_path={model}', '--config.domains.sort.source=file',
                      f'--config.domains.sort.train_path={data}',
                      f'--config.domains.sort.eval_path={data}',
                      '--config.domains.sort.reward=exact'])
  return result, (result.one_error_line and f'{data}:2: the prompt is 200,002 tokens' in
                  result.message and not os.path.exists(workdir))


def unknown_characters_case(folder: str) -> tuple[CliResult, bool]:
  """`generate` on the char-tokenizer HF model with characters it does not know: one warning
  line naming them (byte-level tokenizers such as Qwen3's have no unknown token)."""
  model = hf_folder(folder)
  result = run_cli(['generate', '--model', model, '--prompt', '12+7=é? 中', '--max-new-tokens',
                    '2'])
  warned = [l for l in result.lines if l.startswith('warning: ')]
  return result, (result.code == 0 and len(warned) == 1 and warned[0].startswith(
      "warning: --prompt: 2 character(s) the tokenizer does not know, encoded as '<unk>': "
      "'é' (U+00E9), '中' (U+4E2D)"))


# `generate`'s sampling flags: a bad value is named by the flag typed, not by the
# config.sampling field it becomes (issue 21, point 13).
BAD_GENERATE_FLAGS = (('--top-p', '1.5'), ('--temperature', '0'))


def generate_flag_case(folder: str, flag: str, value: str) -> tuple[CliResult, bool]:
  """`generate` with a bad sampling flag: one line naming the flag, before the model loads (the
  tripwire)."""
  model = hf_folder(folder)
  with tripwire('copd_jax.commands.generate.load_model_and_tokenizer'):
    result = run_cli(['generate', '--model', model, '--prompt', '12+7', flag, value])
  return result, result.one_error_line and result.message.startswith(f'error: {flag}: ')


def plan_case() -> tuple[CliResult, bool]:
  result = run_cli(['plan', '--config', TOY_CONFIG, '--devices', '100000000'])
  return result, result.one_error_line and '--devices must be an integer in' in result.message


def markdown(folder: str) -> report.Section:
  lines = ['### Bad model folders and absurd sizes', '',
           '| # | probe | command | exit | message | nothing left behind |',
           '|---|---|---|---|---|---|']
  held = tried = 0
  for case in CASES:
    for command in case.commands:
      with tempfile.TemporaryDirectory(dir=folder) as tmp:
        result, ok = try_case(case, command, tmp)
        message = report.without_folders(result.message, tmp)
      tried, held = tried + 1, held + ok
      lines.append(f'| {tried} | {case.label} | `{command}` | {result.code} | '
                   f'`{report.cell(message)}` | {"yes" if ok else "no"}'
                   f'{report.check_failed(ok)} |')
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    result, ok = long_prompt_case(tmp)
    message = report.without_folders(result.message, tmp)
  tried, held = tried + 1, held + ok
  lines.append(f'| {tried} | a 200,000-character prompt on line 2 of a data file | `train` | '
               f'{result.code} | `{report.cell(message)}` | {"yes" if ok else "no"}'
               f'{report.check_failed(ok)} |')
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    result, ok = unknown_characters_case(tmp)
  warned = next((l for l in result.lines if l.startswith('warning: ')), result.message)
  tried, held = tried + 1, held + ok
  lines.append(f'| {tried} | `generate --prompt` with characters the tokenizer does not know | '
               f'`generate` | {result.code} | `{report.cell(warned)}` | yes (a warning, then '
               f'the completion){report.check_failed(ok)} |')
  for flag, value in BAD_GENERATE_FLAGS:
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
      result, ok = generate_flag_case(tmp, flag, value)
    tried, held = tried + 1, held + ok
    lines.append(f'| {tried} | `generate {flag} {value}` (a bad sampling flag) | `generate` | '
                 f'{result.code} | `{report.cell(result.message)}` | yes (the model was not '
                 f'loaded){report.check_failed(ok)} |')
  result, ok = plan_case()
  tried, held = tried + 1, held + ok
  lines.append(f'| {tried} | `plan --devices 100000000` | `plan` | {result.code} | '
               f'`{report.cell(result.message)}` | yes (no device started)'
               f'{report.check_failed(ok)} |')
  rows = [('bad HF model folder (NaN / inf / integer weight, no tokenizer, malformed chat '
           'template, layers past config.json, unused tensors, tokenizer past vocab_size), a '
           'prompt too long for the model, unknown prompt characters, bad `generate` flags, '
           'absurd plan size', tried,
           held, 'exit 2, one line naming the tensor and file, the field, file:line or the flag, '
           'before any compute (unused tensors, unknown characters: exit 0, one warning line '
           'naming them)',
           'nothing started; no workdir')]
  return '\n'.join(lines), held == tried, rows
