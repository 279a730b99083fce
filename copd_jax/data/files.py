"""Examples from local data files: JSON Lines (.jsonl / .json, one object per line) or Parquet.

Everything is validated while loading, before any training: a missing or empty file, a
malformed JSON line, a missing field or a non-string value raises `DataFileError` whose
one-line message names the file and the line (JSON Lines, 1-based) or row (Parquet, 0-based).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

from copd_jax.data.domain import REWARD_KINDS, Example
from copd_jax.errors import UserInputError

PROMPT_FIELDS = ('prompt', 'question', 'problem')
ANSWER_FIELDS = ('answer', 'solution')
JSONL_EXTENSIONS = ('.jsonl', '.json')
PARQUET_EXTENSIONS = ('.parquet', '.pq')


class DataFileError(UserInputError):
  """A data file that cannot be used; the message names the file and line / row."""


def _candidates(field: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
  return (field,) if field else defaults


def _pick(record: dict[str, Any], names: tuple[str, ...], kind: str, where: str) -> str:
  """The value of the first of `names` present in `record`, checked to be a non-empty string."""
  for name in names:
    if name in record:
      value = record[name]
      if value is None:
        raise DataFileError(f'{where}: field {name!r} is null')
      if not isinstance(value, str):
        raise DataFileError(f'{where}: field {name!r} must be a string, got '
                            f'{type(value).__name__} ({_short(value)})')
      if not value.strip():
        raise DataFileError(f'{where}: field {name!r} is empty')
      return value
  tried = ', '.join(repr(n) for n in names)
  present = ', '.join(repr(k) for k in list(record)[:10]) or 'none'
  raise DataFileError(f'{where}: no {kind} field (tried {tried}; fields present: {present})')


def _short(value: Any, limit: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


def _jsonl_records(path: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """(where, line number, object) per non-blank line."""
  with open(path, 'rb') as f:
    for line_no, raw in enumerate(f, start=1):
      where = f'{path}:{line_no}'
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataFileError(f'{where}: not valid UTF-8 ({e.reason} at byte {e.start})') from None
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataFileError(f'{where}: malformed JSON ({e.msg} at column {e.colno})') from None
      if not isinstance(record, dict):
        raise DataFileError(f'{where}: expected a JSON object per line, got '
                            f'{type(record).__name__}')
      yield where, line_no, record


def _parquet_records(path: str, prompt_names: tuple[str, ...],
                     answer_names: tuple[str, ...]) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """(where, row index, {column: value}) per row, reading only the candidate columns."""
  import pyarrow.parquet as pq  # imported here: JSONL-only users never pay for pyarrow
  try:
    parquet = pq.ParquetFile(path)
    columns = set(parquet.schema_arrow.names)
    wanted = [c for c in (*prompt_names, *answer_names) if c in columns]
    table = parquet.read(columns=wanted)
  except Exception as e:  # pyarrow raises several types for unreadable files
    raise DataFileError(f'{path}: not a readable Parquet file ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""})') from None
  for kind, names in (('prompt', prompt_names), ('answer', answer_names)):
    if not any(n in columns for n in names):
      tried = ', '.join(repr(n) for n in names)
      raise DataFileError(f'{path}: no {kind} column (tried {tried}; columns present: '
                          f'{", ".join(sorted(columns)) or "none"})')
  values = {name: table.column(name).to_pylist() for name in wanted}
  for row in range(table.num_rows):
    yield f'{path}: row {row}', row, {name: col[row] for name, col in values.items()}


def load_examples(path: str, domain: str, prompt_field: str | None = None,
                  answer_field: str | None = None, reward: str = 'math') -> list[Example]:
  """All examples of a JSON Lines or Parquet file, validated.

  The prompt is the first field present among `prompt_field` (if given, only that one) or
  'prompt', 'question', 'problem'; the answer likewise among `answer_field` or 'answer',
  'solution'. Both must be non-empty strings. Ids are '<domain>:<file name>:<line or row>'.
  """
  if reward not in REWARD_KINDS:
    raise UserInputError(f'{path}: unknown reward kind {reward!r}; choose from '
                         f'{", ".join(REWARD_KINDS)}')
  if not os.path.exists(path):
    raise DataFileError(f'{path}: data file does not exist')
  if not os.path.isfile(path):
    raise DataFileError(f'{path}: not a regular file')
  prompt_names = _candidates(prompt_field, PROMPT_FIELDS)
  answer_names = _candidates(answer_field, ANSWER_FIELDS)
  lower = path.lower()
  if lower.endswith(JSONL_EXTENSIONS):
    records, label = _jsonl_records(path), 'line'
  elif lower.endswith(PARQUET_EXTENSIONS):
    records, label = _parquet_records(path, prompt_names, answer_names), 'row'
  else:
    raise DataFileError(f'{path}: unsupported data file type; use one of '
                        f'{", ".join(JSONL_EXTENSIONS + PARQUET_EXTENSIONS)}')
  name = os.path.basename(path)
  examples = []
  for where, index, record in records:
    prompt = _pick(record, prompt_names, 'prompt', where)
    answer = _pick(record, answer_names, 'answer', where)
    examples.append(Example(prompt=prompt, answer=answer, domain=domain,
                            id=f'{domain}:{name}:{label}{index}', reward=reward))
  if not examples:
    raise DataFileError(f'{path}: no examples (empty file)')
  return examples


def load_many(paths: Sequence[str], domain: str, prompt_field: str | None = None,
              answer_field: str | None = None, reward: str = 'math') -> list[Example]:
  """Examples of several files of one domain, concatenated in the given order."""
  out: list[Example] = []
  for path in paths:
    out.extend(load_examples(path, domain, prompt_field, answer_field, reward))
  return out
