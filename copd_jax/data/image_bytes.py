"""Images stored inside a data row, as files the rest of the pipeline reads like any other.

A row's image field may hold, besides paths:
  * bytes (a Parquet binary column),
  * a struct {'bytes': ..., 'path': ...} (how Hugging Face `datasets` writes its Image feature
    to Parquet: the bytes when present, else the path),
  * a data URI 'data:image/<type>;base64,<data>' (the usual way to put an image in JSON).
Each embedded image is written once to a content-named file in a per-user cache (same bytes,
same file, so runs and rows share it) and from then on is a path: the checks before compute
(vision_inputs.check_image), the processors and the data digests treat it as a file. Malformed
values are one line naming the row and the field.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from typing import Any

from copd_jax.errors import UserInputError

_DATA_URI = 'data:'


def user_cache_dir(name: str) -> str:
  """$XDG_CACHE_HOME (else ~/.cache)/copd_jax/<name>: the per-user folder of content-named
  picture files (embedded row images here, synthetic_vision's rendered PNGs)."""
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'copd_jax', name)


def is_embedded(item: Any) -> bool:
  """Whether an image-field item carries its image rather than naming a file."""
  return (isinstance(item, (bytes, bytearray, memoryview)) or isinstance(item, dict)
          or (isinstance(item, str) and item.startswith(_DATA_URI)))


def image_bytes(item: Any, where: str, field: str) -> bytes | str:
  """The bytes an embedded item carries, or (a `datasets` struct without bytes) its path."""
  if isinstance(item, (bytes, bytearray, memoryview)):
    data = bytes(item)
  elif isinstance(item, dict):
    if item.get('bytes') is not None:
      return image_bytes(item['bytes'], where, field)
    if isinstance(item.get('path'), str) and item['path'].strip():
      return item['path']
    raise UserInputError(f"{where}: field {field!r}: an image struct needs 'bytes' or 'path', "
                         f'got keys {sorted(item)}')
  else:
    header, comma, payload = item.partition(',')
    if not comma or not header.endswith(';base64'):
      raise UserInputError(f"{where}: field {field!r}: a data URI must read "
                           f"'data:image/<type>;base64,<data>', got {item[:40]!r}")
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
      raise UserInputError(f'{where}: field {field!r}: not valid base64 ({e})') from None
  if not data:
    raise UserInputError(f'{where}: field {field!r}: an embedded image with no bytes')
  return data


def stored_image(data: bytes, folder: str | None = None) -> str:
  """The path of a file holding `data`, written (atomically) the first time it is seen."""
  folder = folder or user_cache_dir('row_images')
  path = os.path.join(folder, hashlib.sha256(data).hexdigest()[:32] + '.img')
  if not os.path.isfile(path):
    os.makedirs(folder, exist_ok=True)
    partial = f'{path}.{os.getpid()}.partial'
    with open(partial, 'wb') as f:
      f.write(data)
    os.replace(partial, path)
  return path
