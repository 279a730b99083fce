"""Bad data files: broken JSON Lines / Parquet train files of a `file` domain, and rows the model
cannot take (a prompt longer than its positions). Each must fail with exit status 2 and one line
naming the file and line (Parquet: row) before the warm start, leaving the workdir empty.
Data the run takes but decides something about (characters the tokenizer does not know, a
domain smaller than a batch or than the evaluation, prompts that crowd out the completion) must
be said in one logged line each before the warm start (`LOGGED_DATA`)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from typing import Callable

from scripts.faults import report
from scripts.faults.cli import (BASE_OVERRIDES, TOY_CONFIG, CliResult, InputOutcome,
                                fresh_workdir, run_cli, tripwire, try_in_temp_folders)


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


def _with_image(name: str, content: bytes | None) -> Callable[[str], None]:
  """A JSON Lines file whose second row names image `name` next to it (content None: the image
  does not exist); the first row's image is a fine 8 x 8 PNG."""
  def write(path: str) -> None:
    from PIL import Image
    folder = os.path.dirname(path)
    Image.new('RGB', (8, 8), (200, 30, 30)).save(os.path.join(folder, 'fine.png'))
    if content is not None:
      with open(os.path.join(folder, name), 'wb') as f:
        f.write(content)
    with open(path, 'wb') as f:
      f.write(_jsonl({**_OK, 'images': ['fine.png']}, {**_OK, 'images': ['fine.png', name]}))
  return write


def _png(width: int, height: int, pixels: bool = True) -> bytes:
  """A PNG of width x height; pixels=False: only its header and the start of its data."""
  import io
  import struct
  import zlib
  from PIL import Image
  if pixels:
    out = io.BytesIO()
    Image.new('RGB', (width, height), (10, 200, 10)).save(out, format='PNG')
    return out.getvalue()
  body = b'IHDR' + struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + struct.pack('>I', 13) + body
          + struct.pack('>I', zlib.crc32(body)) + struct.pack('>I', 1000) + b'IDAT' + bytes(12))

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
    DataCase('image: missing file', 'missing_image.jsonl', _with_image('gone.png', None),
             ':2: image '),
    DataCase('image: empty file', 'empty_image.jsonl', _with_image('empty.png', b''),
             ':2: image '),
    DataCase('image: not an image', 'text_image.jsonl',
             _with_image('notes.png', b'just text\n'), ':2: image '),
    DataCase('image: truncated PNG', 'truncated_image.jsonl',
             _with_image('cut.png', _png(64, 64)[:-40]), ':2: image '),
    DataCase('image: decompression bomb (a 20,000 x 10,000 PNG header)', 'bomb_image.jsonl',
             _with_image('bomb.png', _png(20_000, 10_000, pixels=False)), ':2: image '),
)


@dataclasses.dataclass(frozen=True)
class LoggedCase:
  """Train and eval files the run takes, with the line it must log (`expect`) before compute."""
  label: str
  train: bytes
  eval: bytes
  expect: str
  overrides: tuple[str, ...] = ()


LOGGED_DATA: tuple[LoggedCase, ...] = (
    LoggedCase('non-ASCII prompts on the character model', _jsonl(_OK, {'prompt': 'café+1',
                                                                        'answer': '1'}),
               _jsonl(_OK), "prompts hold characters the tokenizer does not know, encoded as "
               "'<unk>' (1 tokens; first: "),
    LoggedCase('a 1-row train file (a batch needs 8 prompts)', _jsonl(_OK), _jsonl(_OK, _OK),
               'note: domain sort has 1 training prompt(s)'),
    LoggedCase('an eval file smaller than eval.num_examples', _jsonl(*[_OK] * 20), _jsonl(_OK),
               'note: domain sort is evaluated on 1 example(s)'),
    LoggedCase('a prompt that leaves fewer positions than sampling.max_new_tokens',
               _jsonl(_OK, {'prompt': '1+' * 250, 'answer': '2'}), _jsonl(_OK),
               'exceed max_position_embeddings=512 of config.model.toy (first: ',
               ('--config.sampling.max_new_tokens=16',)),
)


def try_logged_data(case: LoggedCase, folder: str) -> InputOutcome:
  """The case's files as config.domains.sort's; the warm start is a tripwire. Holds when the
  run got to it (nothing refused) and said `expect` in one line (stdout or stderr)."""
  paths = {}
  for split, content in (('train', case.train), ('eval', case.eval)):
    paths[split] = os.path.join(folder, f'{split}.jsonl')
    with open(paths[split], 'wb') as f:
      f.write(content)
  workdir = fresh_workdir(folder)
  argv = ['train', '--config', TOY_CONFIG, '--workdir', workdir, '--no-progress', *BASE_OVERRIDES,
          '--config.domains.sort.source=file', f'--config.domains.sort.train_path={paths["train"]}',
          f'--config.domains.sort.eval_path={paths["eval"]}', '--config.domains.sort.reward=exact',
          *case.overrides]
  out = io.StringIO()
  with tripwire('copd_jax.run_setup.base_model_path'), contextlib.redirect_stdout(out):
    result = run_cli(argv)
  said = [l for l in out.getvalue().splitlines() + result.lines if case.expect in l]
  shown = CliResult(result.code, '\n'.join(said[:1]) or result.stderr)
  return InputOutcome(case.label, shown, os.path.exists(workdir), [],
                      result.code == 'compute started' and len(said) == 1)


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
  lines += ['', '### Data a run takes, with a logged decision', '',
            '| # | data (train / eval file of a `file` domain) | reached the warm start | the '
            'line it logged | held |', '|---|---|---|---|---|']
  logged = 0
  for i, case, outcome, message in try_in_temp_folders(LOGGED_DATA, try_logged_data, folder):
    logged += outcome.ok
    lines.append(f'| {i} | {case.label} | {"yes" if outcome.result.code == "compute started" else outcome.result.code} | '
                 f'`{report.cell(message)}` | {"yes" if outcome.ok else "no"}'
                 f'{report.check_failed(outcome.ok)} |')
  rows = [('bad data file (JSON Lines / Parquet)', len(BAD_DATA), held,
           'exit 2, one line naming the file and line (Parquet: row) while loading data, before '
           'the warm start', 'nothing started; the workdir stays empty'),
          ('data the run takes with a decision (unknown characters, a domain smaller than a '
           'batch or the evaluation, prompts crowding out the completion)', len(LOGGED_DATA),
           logged, 'one logged line each before the warm start', 'nothing')]
  return ('\n'.join(lines), held == len(BAD_DATA) and logged == len(LOGGED_DATA), rows)
