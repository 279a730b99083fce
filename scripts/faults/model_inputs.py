"""Bad model folders and absurd sizes (issue 21, points 6 and 10): a Hugging Face folder with a
NaN, infinite or integer weight, or without a usable tokenizer, through `export-hf` and `train`;
`plan --devices 100000000`. Each must exit 2 with one line naming the tensor, field or flag
before any compute, and leave no workdir behind."""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

from scripts.faults import report
from scripts.faults.cli import BASE_OVERRIDES, TOY_CONFIG, CliResult, run_cli, tripwire

TENSOR = 'model.layers.1.mlp.down_proj.weight'


def hf_folder(folder: str) -> str:
  """A tiny Qwen3 HF folder (char tokenizer) in `folder`/hf."""
  import jax
  import numpy as np
  from flax import nnx
  from copd_jax.models import hf_io
  from copd_jax.models.tokenizer import char_tokenizer
  from tests.test_checkpoint import TINY, make_state
  out = os.path.join(folder, 'hf')
  params = jax.tree.map(lambda x: np.asarray(x)[0], nnx.to_pure_dict(make_state(1).params))
  hf_io.save_hf_folder(params, TINY, out, tokenizer=char_tokenizer())
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


CASES = (
    ModelCase('one NaN in an HF weight', lambda f: _rewrite(f, _one_nan),
              f'tensor {TENSOR} has 1'),
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
)


def try_case(case: ModelCase, command: str, folder: str) -> tuple[CliResult, bool]:
  """(result, ok) of `command` on a fresh damaged folder in `folder`. `train` runs with the
  step builders as a tripwire: a bad folder that got past loading shows as 'compute started'."""
  model = hf_folder(folder)
  case.damage(model)
  workdir = os.path.join(folder, 'workdir')
  if command == 'export-hf':
    result = run_cli(['export-hf', '--checkpoint', model, '--out', os.path.join(folder, 'out')])
    left = os.path.exists(os.path.join(folder, 'out'))
  else:
    with tripwire('copd_jax.run_setup.make_grpo_step'):
      result = run_cli(['train', '--config', TOY_CONFIG, '--workdir', workdir, '--no-progress',
                        *BASE_OVERRIDES, '--config.model.source=hf',
                        f'--config.model.hf_path={model}'])
    left = os.path.exists(workdir)
  return result, result.one_error_line and case.expect in result.message and not left


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
  result, ok = plan_case()
  tried, held = tried + 1, held + ok
  lines.append(f'| {tried} | `plan --devices 100000000` | `plan` | {result.code} | '
               f'`{report.cell(result.message)}` | yes (no device started)'
               f'{report.check_failed(ok)} |')
  rows = [('bad HF model folder (NaN / inf / integer weight, no tokenizer), absurd plan size',
           tried, held, 'exit 2, one line naming the tensor and file, the field or the flag, '
           'before any compute', 'nothing started; no workdir')]
  return '\n'.join(lines), held == tried, rows
