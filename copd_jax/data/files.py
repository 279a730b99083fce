"""Examples from local data files: JSON Lines (.jsonl / .json, one object per line) or Parquet.

A row's prompt is a string field, or a chat: a `messages` list of {'role', 'content'} turns
(roles system / user / assistant, ending with a user turn) rendered with the chat template. Its
answer is a string or a number (3 -> '3', 2.5 -> '2.5', 4.0 -> '4'). Its images (field
`image_field`, default 'images': a path or a list of paths, or images held in the row:
data/image_bytes.py) and video (field `video_field`,
default 'video': a folder of frames, a .npy array of frames or a list of frame paths) are
paths relative to the data file's folder; a row with a video may give its frame rate as 'fps'
(a number > 0; else the domain's video_fps, default 24), which sets the '<t seconds>' tokens
between its frames.

Everything is validated while loading, before any training: a missing or empty file, a
malformed JSON line, a missing field or a value of the wrong type raises `DataFileError` whose
one-line message names the file and the line (JSON Lines, 1-based) or row (Parquet, 0-based);
every image and video frame is opened and checked then (copd_jax/vision_inputs.py: missing,
empty, corrupt, truncated, not an image, over `max_image_pixels`), its error naming the row and
the image.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator, Sequence

from copd_jax import vision_inputs
from copd_jax.data.domain import REWARD_KINDS, Example, is_reward_name
from copd_jax.errors import UserInputError

PROMPT_FIELDS = ('prompt', 'question', 'problem', 'messages')
CHAT_ROLES = ('system', 'user', 'assistant')
ANSWER_FIELDS = ('answer', 'solution')
JSONL_EXTENSIONS = ('.jsonl', '.json')
PARQUET_EXTENSIONS = ('.parquet', '.pq')
# A JSON Lines file whose first bad line might be a pretty-printed document is parsed whole to
# say so, up to this size.
PRETTY_PRINTED_PROBE_BYTES = 64 << 20


class DataFileError(UserInputError):
  """A data file that cannot be used; the message names the file and line / row."""


def _candidates(field: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
  return (field,) if field else defaults


def _field(record: dict[str, Any], names: tuple[str, ...], kind: str, where: str
           ) -> tuple[str, Any]:
  """(name, value) of the first of `names` present in `record`, the value not null."""
  for name in names:
    if name in record:
      if record[name] is None:
        raise DataFileError(f'{where}: field {name!r} is null')
      return name, record[name]
  tried = ', '.join(repr(n) for n in names)
  present = ', '.join(repr(k) for k in list(record)[:10]) or 'none'
  raise DataFileError(f'{where}: no {kind} field (tried {tried}; fields present: {present})')


def _text(name: str, value: Any, where: str) -> str:
  if not isinstance(value, str):
    raise DataFileError(f'{where}: field {name!r} must be a string, got '
                        f'{type(value).__name__} ({_short(value)})')
  if not value.strip():
    raise DataFileError(f'{where}: field {name!r} is empty')
  try:
    value.encode('utf-8')
  except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to lone surrogates
    raise DataFileError(f'{where}: field {name!r} holds a lone surrogate ({value[e.start]!r} at '
                        f'character {e.start}), which is not text; fix the \\u escape') from None
  return value


def _answer_text(name: str, value: Any, where: str) -> str:
  """A string answer as is; an integer or finite float as text (4.0 -> '4')."""
  if isinstance(value, str):
    return _text(name, value, where)
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataFileError(f'{where}: field {name!r} must be a string or a number, got '
                        f'{type(value).__name__} ({_short(value)})')
  if isinstance(value, float) and not math.isfinite(value):
    raise DataFileError(f'{where}: field {name!r} is {value}, not a usable answer')
  if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
    return str(int(value))
  return str(value)


def _chat(name: str, value: Any, where: str) -> tuple[tuple[str, str], ...]:
  """A `messages` list as (role, content) pairs, checked: roles known, contents non-empty
  strings, the last turn the user's (the model writes the next one)."""
  if not isinstance(value, (list, tuple)) or not value:
    raise DataFileError(f'{where}: field {name!r} must be a non-empty list of '
                        f"{{'role', 'content'}} messages, got {_short(value)}")
  turns = []
  for k, message in enumerate(value):
    at = f'{where}: {name}[{k}]'
    if not isinstance(message, dict) or 'role' not in message or 'content' not in message:
      raise DataFileError(f"{at}: expected {{'role': ..., 'content': ...}}, got {_short(message)}")
    if message['role'] not in CHAT_ROLES:
      raise DataFileError(f'{at}: role {message["role"]!r} is not one of {", ".join(CHAT_ROLES)}')
    turns.append((message['role'], _text('content', message['content'], at)))
  if turns[-1][0] != 'user':
    raise DataFileError(f'{where}: field {name!r} must end with a user message (the model '
                        f'answers it), ends with {turns[-1][0]!r}')
  return tuple(turns)


def _short(value: Any, limit: int = 40) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + '...'


class DuplicateKeyError(ValueError):
  """A JSON object that names one key twice (raised by `_unique_keys`, caught with its line)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  """json object_pairs_hook: the object as a dict, refusing a key given twice."""
  out: dict[str, Any] = {}
  for key, value in pairs:
    if key in out:
      raise DuplicateKeyError(key)
    out[key] = value
  return out


def _decode_problem(path: str, error: json.JSONDecodeError) -> str:
  """What a JSON Lines line that does not parse means: a whole file holding one pretty-printed
  JSON document is named as such (JSON Lines wants one object per line); else JSON's reason."""
  if os.path.getsize(path) <= PRETTY_PRINTED_PROBE_BYTES:
    try:
      with open(path, encoding='utf-8') as f:
        document = json.load(f)
    except (ValueError, RecursionError):
      document = None
    if isinstance(document, (dict, list)):
      return (f'expected one JSON object per line (JSON Lines); the file holds one '
              f'{"array" if isinstance(document, list) else "object"} spread over several '
              'lines (pretty-printed?)')
  return f'malformed JSON ({error.msg.removesuffix(" at")} at column {error.colno})'


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
        record = json.loads(line, object_pairs_hook=_unique_keys)
      except json.JSONDecodeError as e:
        raise DataFileError(f'{where}: {_decode_problem(path, e)}') from None
      except RecursionError:
        raise DataFileError(f'{where}: JSON nested too deeply to read') from None
      except DuplicateKeyError as e:
        raise DataFileError(f'{where}: duplicate key {e.args[0]!r} in one object (JSON would '
                            'keep the last silently); write each field once') from None
      if not isinstance(record, dict):
        raise DataFileError(f'{where}: expected a JSON object per line, got '
                            f'{type(record).__name__}')
      yield where, line_no, record


def _visual_paths(record: dict[str, Any], where: str, base_dir: str, image_field: str,
                  video_field: str, max_image_pixels: int
                  ) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(image paths, video frame paths) of a row, every file checked (vision_inputs.check_image);
  an absent or null field means none."""
  images: list[str] = []
  frames: list[str] = []
  if image_field and record.get(image_field) is not None:
    images = vision_inputs.image_paths(record[image_field], base_dir, where, image_field)
    for image in images:
      vision_inputs.check_image(image, where, max_image_pixels)
  if video_field and record.get(video_field) is not None:
    frames = vision_inputs.video_frame_paths(record[video_field], base_dir, where, video_field)
    vision_inputs.check_video_frames(frames, where, max_image_pixels)
  return tuple(images), tuple(frames)


def _parquet_records(path: str, prompt_names: tuple[str, ...], answer_names: tuple[str, ...],
                     optional: tuple[str, ...] = ()
                     ) -> Iterator[tuple[str, int, dict[str, Any]]]:
  """(where, row index, {column: value}) per row, reading only the candidate columns (and the
  `optional` ones, e.g. images, where present)."""
  import pyarrow.parquet as pq  # imported here: JSONL-only users never pay for pyarrow
  try:
    parquet = pq.ParquetFile(path)
    columns = set(parquet.schema_arrow.names)
    wanted = [c for c in (*prompt_names, *answer_names, *optional) if c in columns]
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
                  answer_field: str | None = None, reward: str = 'math', *,
                  image_field: str = 'images', video_field: str = 'video',
                  max_image_pixels: int = vision_inputs.DEFAULT_MAX_PIXELS,
                  video_fps: float = vision_inputs.DEFAULT_VIDEO_FPS) -> list[Example]:
  """All examples of a JSON Lines or Parquet file, validated.

  The prompt is the first field present among `prompt_field` (if given, only that one) or
  'prompt', 'question', 'problem', 'messages': a non-empty string, or a list of chat messages
  (see the module docstring). The answer likewise among `answer_field` or 'answer',
  'solution': a non-empty string or a number. Images / video: `image_field` / `video_field`
  ('' = never read), each file checked now; a video's frame rate is the row's 'fps' field
  (vision_inputs.FPS_FIELD), else `video_fps`. Ids are '<domain>:<file name>:<line or row>'.
  """
  if not is_reward_name(reward):
    raise UserInputError(f'{path}: unknown reward kind {reward!r}; choose from '
                         f"{', '.join(REWARD_KINDS)} or 'package.module:function'")
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
    visual_names = tuple(n for n in (image_field, video_field) if n)
    visual_names += (vision_inputs.FPS_FIELD,) if video_field else ()
    records, label = _parquet_records(path, prompt_names, answer_names, visual_names), 'row'
  else:
    raise DataFileError(f'{path}: unsupported data file type; use one of '
                        f'{", ".join(JSONL_EXTENSIONS + PARQUET_EXTENSIONS)}')
  name = os.path.basename(path)
  base_dir = os.path.dirname(os.path.abspath(path))
  examples = []
  for where, index, record in records:
    field, value = _field(record, prompt_names, 'prompt', where)
    messages = _chat(field, value, where) if isinstance(value, (list, tuple)) else ()
    prompt = messages[-1][1] if messages else _text(field, value, where)
    answer = _answer_text(*_field(record, answer_names, 'answer', where), where)
    images, video = _visual_paths(record, where, base_dir, image_field, video_field,
                                  max_image_pixels)
    fps = None
    if video:   # the row's own frame rate wins over the domain's
      fps = (vision_inputs.video_fps(record[vision_inputs.FPS_FIELD], where)
             if record.get(vision_inputs.FPS_FIELD) is not None else video_fps)
    examples.append(Example(prompt=prompt, answer=answer, domain=domain,
                            id=f'{domain}:{name}:{label}{index}', reward=reward,
                            messages=messages, source=where, images=images, video=video,
                            video_fps=fps))
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
