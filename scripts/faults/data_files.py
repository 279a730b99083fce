"""Bad data files: broken JSON Lines / Parquet train files of a `file` domain, and rows the model
cannot take (a prompt longer than its positions). Each must fail with exit status 2 and one line
naming the file and line (Parquet: row) before the warm start, leaving the workdir empty."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

from scripts.faults import report
from scripts.faults.cli import (BASE_OVERRIDES, TOY_CONFIG, InputOutcome, fresh_workdir,
                                run_cli, tripwire, try_in_temp_folders)


@dataclasses.dataclass(frozen=True)
class DataCase:
  """A bad data file used as the train file of a 'file' domain. content: bytes, a function
  writing the file at a path, or None (the file does not exist). `expect`: the location the
  message must name after the file path (e.g. ':3:' for line 3, ': row 1:')."""
  label: str
  name: str
  content: bytes | Callable[[str], None] | None
  expect: str


def _jsonl(*records) -> bytes:
  return b''.join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b'\n' for r in records)


def _parquet(columns: dict) -> Callable[[str], None]:
  def write(path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
  return write


_OK = {'prompt': '12+7', 'answer': '19'}

BAD_DATA: tuple[DataCase, ...] = (
    DataCase('missing answer field', 'no_answer.jsonl',
             _jsonl(_OK, _OK, {'prompt': '3+4'}), ':3: no answer field'),
    DataCase('missing prompt field', 'no_prompt.jsonl',
             _jsonl(_OK, {'text': '3+4', 'answer': '7'}), ':2: no prompt field'),
    DataCase('malformed JSON line', 'malformed.jsonl',
             _jsonl(_OK, b'{"prompt": "3+4", "answer": 7', _OK), ':2: malformed JSON'),
    DataCase('torn last line (interrupted write)', 'torn.jsonl',
             _jsonl(_OK, _OK)[:-1] + b'\n{"prompt": "1+1", "ans', ':3: malformed JSON'),
    DataCase('empty file', 'empty.jsonl', b'', ': no examples (empty file)'),
    DataCase('only blank lines', 'blank.jsonl', b'\n   \n\t\n', ': no examples (empty file)'),
    DataCase('answer is a list', 'list_answer.jsonl',
             _jsonl(_OK, {'prompt': '3+4', 'answer': [7]}),
             ":2: field 'answer' must be a string or a number"),
    DataCase('answer is null', 'null_answer.jsonl',
             _jsonl({'prompt': '3+4', 'answer': None}), ":1: field 'answer' is null"),
    DataCase('answer is NaN', 'nan_answer.jsonl',
             _jsonl(_OK, _OK, _OK, b'{"prompt": "0/0", "answer": NaN}'),
             ":4: field 'answer' is nan, not a usable answer"),
    DataCase('empty prompt', 'empty_prompt.jsonl',
             _jsonl(_OK, {'prompt': '   ', 'answer': '7'}), ":2: field 'prompt' is empty"),
    DataCase('a JSON array instead of an object', 'array.jsonl',
             _jsonl(_OK, ['3+4', '7']), ':2: expected a JSON object'),
    DataCase('invalid UTF-8', 'latin1.jsonl',
             _jsonl(_OK, _OK, _OK) + b'{"prompt": "caf\xe9", "answer": "1"}\n',
             ':4: not valid UTF-8'),
    DataCase('UTF-8 byte order mark', 'bom.jsonl', b'\xef\xbb\xbf' + _jsonl(_OK),
             ':1: malformed JSON'),
    DataCase('a 200,000-character prompt (toy model: 512 positions)', 'long_prompt.jsonl',
             _jsonl(_OK, {'prompt': '1+' * 100_000, 'answer': '2'}),
             ':2: the prompt is 200,002 tokens; the model holds 512 positions'),
    DataCase('JSON nested 100,000 deep', 'deep.jsonl',
             _jsonl(_OK, b'{"prompt": ' + b'[' * 100_000 + b']' * 100_000 + b', "answer": "1"}'),
             ':2: JSON nested too deeply'),
    DataCase('a lone surrogate (\\ud800) in a prompt', 'surrogate.jsonl',
             _jsonl(_OK, b'{"prompt": "3+\\ud800", "answer": "1"}'),
             ":2: field 'prompt' holds a lone surrogate"),
    DataCase('a key given twice in one object', 'duplicate_key.jsonl',
             _jsonl(_OK, b'{"prompt": "3+4", "answer": "7", "answer": "8"}'),
             ":2: duplicate key 'answer'"),
    DataCase('a pretty-printed JSON array', 'pretty.jsonl',
             json.dumps([_OK, _OK], indent=2).encode(),
             ':1: expected one JSON object per line'),
    DataCase('unsupported file type', 'data.csv', b'prompt,answer\n1+1,2\n',
             'unsupported data file type'),
    DataCase('Parquet: not a Parquet file', 'garbage.parquet', b'PAR1' + bytes(range(256)) * 8,
             'not a readable Parquet file'),
    DataCase('Parquet: no answer column', 'no_answer.parquet',
             _parquet({'prompt': ['1+1', '2+2'], 'label': ['2', '4']}), 'no answer column'),
    DataCase('Parquet: null answer', 'null.parquet',
             _parquet({'prompt': ['1+1', '2+2'], 'answer': ['2', None]}),
             ": row 1: field 'answer' is null"),
    DataCase('Parquet: list answers', 'list.parquet',
             _parquet({'prompt': ['1+1', '2+2'], 'answer': [[2], [4]]}),
             ": row 0: field 'answer' must be a string or a number"),
)


def write_data_case(case: DataCase, folder: str) -> str:
  path = os.path.join(folder, case.name)
  if callable(case.content):
    case.content(path)
  elif case.content is not None:
    with open(path, 'wb') as f:
      f.write(case.content)
  return path


def try_bad_data(case: DataCase, folder: str) -> InputOutcome:
  """The bad file as config.domains.sort's train file (the eval file is fine); the warm start
  (the first compute of a toy run) is a tripwire."""
  good = os.path.join(folder, 'good.jsonl')
  with open(good, 'wb') as f:
    f.write(_jsonl(_OK, {'prompt': '3+4', 'answer': '7'}))
  path = write_data_case(case, folder)
  workdir = fresh_workdir(folder)
  argv = ['train', '--config', TOY_CONFIG, '--workdir', workdir, '--no-progress', *BASE_OVERRIDES,
          '--config.domains.sort.source=file', f'--config.domains.sort.train_path={path}',
          f'--config.domains.sort.eval_path={good}', '--config.domains.sort.reward=exact']
  with tripwire('copd_jax.run_setup.base_model_path'):
    result = run_cli(argv)
  entries = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  # ':3: ...' / ': row 1: ...' must follow the path; other messages name the path anywhere.
  where = path + case.expect if case.expect.startswith(':') else path
  ok = result.one_error_line and where in result.message and case.expect in result.message
  return InputOutcome(case.label, result, os.path.exists(workdir), entries, ok and not entries)


def markdown(folder: str) -> report.Section:
  """Every case of BAD_DATA, as a table."""
  lines = ['### Bad data files', '',
           '| # | bad data file (train file of a `file` domain) | exit | message | '
           'compute started | workdir contents |', '|---|---|---|---|---|---|']
  held = 0
  for i, case, outcome, message in try_in_temp_folders(BAD_DATA, try_bad_data, folder):
    held += outcome.ok
    lines.append(f'| {i} | {case.label} | {outcome.result.code} | `{report.cell(message)}` | '
                 f'{"yes" if outcome.result.code == "compute started" else "no"} | '
                 f'{", ".join(outcome.workdir_entries) or "empty"}'
                 f'{report.check_failed(outcome.ok)} |')
  rows = [('bad data file (JSON Lines / Parquet)', len(BAD_DATA), held,
           'exit 2, one line naming the file and line (Parquet: row) while loading data, before '
           'the warm start', 'nothing started; the workdir stays empty')]
  return '\n'.join(lines), held == len(BAD_DATA), rows
