"""Content digests of a run's data files, recorded in every checkpoint's meta, so a resume on a
data file that changed (even keeping its row count) is noticed instead of silently breaking the
exact-resume promise.

The digest is SHA-256 of the file's bytes (read in 1 MiB pieces, local or remote). The run
records {config field: {'path', 'sha256'}} of the train and eval files of every `file` domain a
branch uses (meta key META_KEY); a resume compares them with the files as they are now and
refuses the first changed one by name unless the user accepts the change, which is then logged.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Mapping

from copd_jax import storage
from copd_jax.config_checks import branch_domains
from copd_jax.errors import UserInputError

META_KEY = 'data_files'


class DataChanged(UserInputError):
  """A data file differs from the one the checkpoint was trained on; names the file."""


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with storage.as_path(path).open('rb') as f:
    for piece in iter(lambda: f.read(2**20), b''):
      digest.update(piece)
  return digest.hexdigest()


def data_files(config) -> dict[str, str]:
  """{config field: path} of the train and eval files of every `file` domain in use."""
  used = sorted({d for names in branch_domains(config) for d in names})
  out = {}
  for name in used:
    spec = config.domains[name]
    if spec.source != 'file':
      continue
    for split in ('train_path', 'eval_path'):
      path = getattr(spec, split, '')
      if path:
        out[f'config.domains.{name}.{split}'] = storage.resolve(path)
  return out


def digests_of(config) -> dict[str, dict[str, str]]:
  """{config field: {'path', 'sha256'}} of the run's data files (missing files are left out:
  loading them reports them)."""
  return {field: {'path': path, 'sha256': file_sha256(path)}
          for field, path in data_files(config).items() if storage.is_file(path)}


def changed_files(saved: Mapping[str, Mapping[str, str]], current: Mapping[str, Mapping[str, str]]
                  ) -> list[tuple[str, str, str, str]]:
  """(field, path, saved sha256, current sha256 or 'missing') of every recorded file whose
  content differs now. Files recorded under another path are the config check's business."""
  out = []
  for field, record in sorted(saved.items()):
    now = current.get(field)
    if now is not None and now.get('path') != record.get('path'):
      continue
    sha = now['sha256'] if now else 'missing'
    if sha != record.get('sha256'):
      out.append((field, record.get('path', '?'), record.get('sha256', '?'), sha))
  return out


def check_resume(saved: Mapping[str, Mapping[str, str]] | None, config, step: int,
                 accept: bool, log: Callable[[str], None]) -> None:
  """Refuses (DataChanged) to resume from the checkpoint of `step`, whose meta recorded `saved`,
  when a data file's content changed since; with `accept`, logs each change and goes on.
  Checkpoints written before digests were recorded (saved None) are not checked."""
  if not saved:
    return
  changed = changed_files(saved, digests_of(config))
  for field, path, old, new in changed:
    what = (f'{field}: {path} changed since the checkpoint of step {step} (sha256 {old[:12]} '
            f'then, {new[:12]} now)')
    if not accept:
      more = f' (and {len(changed) - 1} more file(s))' if len(changed) > 1 else ''
      raise DataChanged(f'{what}{more}; resuming on other data would not reproduce the run: '
                        'restore the file, use a new --workdir, or pass --accept-changed-data')
    log(f'warning: {what}; continuing on the new data (--accept-changed-data)')
