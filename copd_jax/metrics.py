"""Behavioural metrics between branches (paper Sec. 2, Fig. 4) and the run's metric log.

Full next-token distributions never cross branches (they would be vocab-sized per token), so
the teacher-student comparisons are estimated from what does cross: the student's on-policy
tokens go to the teacher, and per position the teacher returns its top-k token ids and its
log-prob of the student's sampled token.

- Top-k overlap O_k = mean over completion positions of |Top_k(student) ∩ Top_k(teacher)| / k,
  exact given both top-k id sets (the paper's definition along on-policy student prefixes).
- Symmetric KL, KL(s||t) + KL(t||s), estimated on the student's samples y ~ s with the ratio
  r = t(y) / s(y): E_s[(r - 1) log r]. Since E_s[r log r] = KL(t||s) and E_s[-log r] = KL(s||t),
  the estimator is unbiased, and every sample's term is >= 0 (low variance near r = 1).
  log r is clipped to +-`max_log_ratio` so one rare token cannot dominate a logged value.
- Per edge, the OPD signal on the student's tokens (`opd_edge_metrics`): mean |delta|, the
  teacher's and the student's probability of the sampled token, and the token advantage on
  positions where the sampled token is in both top-k sets.
"""
from __future__ import annotations

import json
import time
import warnings
from typing import Any, Callable, Mapping

import numpy as np
from tensorboardX.proto.plugin_text_pb2 import TextPluginData
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.proto.tensor_pb2 import TensorProto
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

from copd_jax import storage
from copd_jax.log_files import EventErrors, append_whole


def masked_sum(x, mask) -> tuple[float, int]:
  """(sum of x over the masked positions, their number): the terms of `masked_mean`, which
  processes compute on their own rows and add (copd_jax/probe_metrics.py)."""
  x, mask = np.asarray(x, np.float64), np.asarray(mask, bool)
  return float(x[mask].sum()), int(mask.sum())


def ratio(terms: tuple[float, float]) -> float:
  """sum / count of `masked_sum` terms (nan without positions): their masked mean."""
  total, count = terms
  return float(total / count) if count else float('nan')


def masked_mean(x, mask) -> float:
  return ratio(masked_sum(x, mask))


def topk_overlap(student_ids, teacher_ids, mask) -> float:
  """student_ids, teacher_ids [..., T, k]; mask [..., T] -> O_k averaged over masked positions."""
  return ratio(topk_overlap_terms(student_ids, teacher_ids, mask))


def topk_overlap_terms(student_ids, teacher_ids, mask) -> tuple[float, int]:
  """`masked_sum` terms of `topk_overlap`."""
  s, t = np.asarray(student_ids), np.asarray(teacher_ids)
  k = s.shape[-1]
  # |A ∩ B| for sets of distinct ids: count matches of each student id among the teacher ids.
  shared = (s[..., :, None] == t[..., None, :]).any(-1).sum(-1) / k
  return masked_sum(shared, mask)


def symmetric_kl_estimate(student_logp, teacher_logp, mask, max_log_ratio: float = 20.0) -> float:
  """KL(s||t) + KL(t||s) from log-probs of student-sampled tokens (see module docstring)."""
  return ratio(symmetric_kl_terms(student_logp, teacher_logp, mask, max_log_ratio))


def symmetric_kl_terms(student_logp, teacher_logp, mask, max_log_ratio: float = 20.0
                       ) -> tuple[float, int]:
  """`masked_sum` terms of `symmetric_kl_estimate`."""
  log_r = np.clip(np.asarray(teacher_logp, np.float64) - np.asarray(student_logp, np.float64),
                  -max_log_ratio, max_log_ratio)
  return masked_sum((np.exp(log_r) - 1.0) * log_r, mask)


def reverse_kl_estimate(student_logp, teacher_logp, mask) -> float:
  """KL(s||t) = E_s[log s(y) - log t(y)] on student samples (the quantity OPD minimises)."""
  return ratio(reverse_kl_terms(student_logp, teacher_logp, mask))


def reverse_kl_terms(student_logp, teacher_logp, mask) -> tuple[float, int]:
  """`masked_sum` terms of `reverse_kl_estimate`."""
  return masked_sum(np.asarray(student_logp) - np.asarray(teacher_logp), mask)


def opd_edge_metrics(tokens, student_ids, teacher_ids, student_token_logp, teacher_token_logp,
                     mask, beta: float, delta_clamp: float = 0.0) -> dict[str, float]:
  """Per-edge OPD signal metrics on the student's rollout (the probe's arrays: tokens [M, T],
  top-k ids [M, T, k], log-probs of the sampled token [M, T], completion mask [M, T]), each a
  mean over masked positions:

  - delta_abs: |delta|, delta = log p_teacher(y_t) - log p_student(y_t);
  - teacher_mass, student_mass: p_teacher(y_t), p_student(y_t) of the sampled token y_t;
  - overlap_advantage: the sampled-token advantage beta * clip(delta, +-delta_clamp) (paper
    Eq. 8; logged whichever opd.signal trains) over the overlap positions only, those where
    the sampled token is in BOTH models' top-k sets (both consider it plausible; "the sets
    intersect" holds almost everywhere, since the two argmaxes usually agree, and would say
    little); nan when there is no such position;
  - overlap_share: the share of positions that are overlap positions.
  delta_clamp 0 is off, as in the config."""
  return {key: ratio(terms) for key, terms in opd_edge_terms(
      tokens, student_ids, teacher_ids, student_token_logp, teacher_token_logp, mask, beta,
      delta_clamp).items()}


def opd_edge_terms(tokens, student_ids, teacher_ids, student_token_logp, teacher_token_logp,
                   mask, beta: float, delta_clamp: float = 0.0) -> dict[str, tuple[float, int]]:
  """`masked_sum` terms of each of `opd_edge_metrics`' values."""
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  student_lp = np.asarray(student_token_logp, np.float64)
  teacher_lp = np.asarray(teacher_token_logp, np.float64)
  delta = teacher_lp - student_lp
  advantage = beta * (np.clip(delta, -delta_clamp, delta_clamp) if delta_clamp else delta)
  in_top = lambda ids: (np.asarray(ids) == tokens[..., None]).any(-1)
  overlap = mask & in_top(student_ids) & in_top(teacher_ids)
  return {'delta_abs': masked_sum(np.abs(delta), mask),
          'teacher_mass': masked_sum(np.exp(teacher_lp), mask),
          'student_mass': masked_sum(np.exp(student_lp), mask),
          'overlap_advantage': masked_sum(advantage, overlap),
          'overlap_share': masked_sum(overlap, mask)}


def length_stats(tokens, completion_mask, max_new_tokens: int, eos_ids) -> dict[str, np.ndarray]:
  """Per row group [..., B, T] -> {'length': mean, 'max_length': max, 'truncated': share} over
  the last row axis B. A completion is truncated when it used all `max_new_tokens` tokens and
  its last token is no EOS (one that ends with EOS on its last allowed token finished)."""
  return summarize_lengths(*row_lengths(tokens, completion_mask, max_new_tokens, eos_ids))


def row_lengths(tokens, completion_mask, max_new_tokens: int, eos_ids
                ) -> tuple[np.ndarray, np.ndarray]:
  """Per row [..., T] -> (completion length [...], truncated [...] bool): the per-row part of
  `length_stats`, which processes compute on their own rows and gather as small arrays."""
  tokens, mask = np.asarray(tokens), np.asarray(completion_mask, bool)
  lengths = mask.sum(-1)
  # The last completion token of each row (rows without completion: index 0, masked below).
  last = np.take_along_axis(tokens, np.maximum(_last_index(mask), 0)[..., None], -1)[..., 0]
  cut = (lengths >= max_new_tokens) & ~np.isin(last, np.asarray(list(eos_ids)))
  return lengths, cut


def summarize_lengths(lengths, truncated) -> dict[str, np.ndarray]:
  """`length_stats` from per-row lengths and truncation flags [..., B]."""
  lengths, truncated = np.asarray(lengths), np.asarray(truncated, bool)
  return {'length': lengths.mean(-1), 'max_length': lengths.max(-1),
          'truncated': truncated.mean(-1)}


def _last_index(mask: np.ndarray) -> np.ndarray:
  """Index of the last True along the last axis (-1 where none)."""
  T = mask.shape[-1]
  return np.where(mask.any(-1), T - 1 - np.argmax(mask[..., ::-1], -1), -1)


class MetricsLog:
  """Appends scalar metrics to <workdir>/metrics.jsonl (`filename`) and TensorBoard event files.

  On resume, lines at or after the resumed step are dropped first, so the file always equals
  that of an uninterrupted run; every readable record before it is kept, and damaged lines
  (a torn line from a kill, bytes garbled on disk) are skipped with a warning and kept aside in
  metrics.jsonl.damaged. The workdir may be remote (gs://...): object stores cannot append,
  so there the log is kept in memory and uploaded whole (one atomic object write) at most every
  `flush_secs`, on `flush()` and on `close()`; call `flush()` before saving a checkpoint so a
  resume never misses lines before its step. TensorBoard writes remote URLs itself
  (tensorboardX: gs:// needs google-cloud-storage); tensorboard=False turns it off.
  """

  def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool = True,
               tensorboard: bool = True, flush_secs: float = 60.0,
               tag: Callable[[str], str] = lambda key: key, filename: str = 'metrics.jsonl'):
    self.enabled, self.tag = enabled, tag
    self.path = storage.join(storage.resolve(workdir), filename)
    self.remote = storage.is_remote(self.path)
    self.flush_secs = flush_secs
    self._lines: list[str] = []   # remote: the whole file
    self._dirty = False
    self._last_flush = time.monotonic()
    self._writer = None
    self._events: EventErrors | None = None
    if not enabled:
      return
    storage.makedirs(storage.parent(self.path))
    exists = storage.exists(self.path)
    if resume_step is not None and exists:
      self._truncate_from(resume_step)
    elif resume_step is None and exists:
      storage.rmtree(self.path)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(storage.join(storage.parent(self.path), 'tensorboard'),
                                   flush_secs=10)
      self._events = EventErrors.install(self._writer)

  def _truncate_from(self, step: int) -> None:
    """Keeps every readable record before `step`; damaged lines are skipped, reported (one
    warning naming the file and their line numbers) and kept in `<path>.damaged`."""
    kept, damaged = records_before(storage.read_text(self.path), step)
    if damaged:
      keep_damaged_lines(self.path, damaged)
    # Local: temporary file + os.replace, so a kill mid-rewrite keeps the old file; remote: one
    # object upload, which replaces the old object whole or not at all.
    storage.write_text(self.path, ''.join(kept))
    if self.remote:
      self._lines = kept

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One step's scalars: a metrics.jsonl line under their keys, TensorBoard under
    `tag(key)` (tags are written as given: '<-', '@' and ':' stay readable)."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items() if v is not None}
    self.append({'step': step, **clean})
    if self._writer is not None:
      for key, value in clean.items():
        if np.isfinite(value):
          self._add(Summary.Value(tag=self.tag(key), simple_value=value), step)

  def text(self, key: str, text: str, step: int) -> None:
    """A markdown text to TensorBoard's Text tab under `tag(key)`."""
    if self.enabled and self._writer is not None:
      # tensorboardX's add_text would replace the characters TensorFlow forbids in op names.
      meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
          plugin_name='text', content=TextPluginData(version=0).SerializeToString()))
      tensor = TensorProto(dtype='DT_STRING', string_val=[text.encode('utf-8')],
                           tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
      self._add(Summary.Value(tag=self.tag(key), metadata=meta, tensor=tensor), step)

  def _add(self, value, step: int) -> None:
    self._events.raise_kept()   # a write the events thread could not do (a full disk)
    self._writer._get_file_writer().add_summary(Summary(value=[value]), step)

  def append(self, record: Mapping[str, Any]) -> None:
    """One JSON line (a record with an integer 'step')."""
    if not self.enabled:
      return
    line = json.dumps(record, sort_keys=True) + '\n'
    if self.remote:
      self._lines.append(line)
      self._dirty = True
      if time.monotonic() - self._last_flush >= self.flush_secs:
        self.flush()
    else:
      append_whole(self.path, line.encode())

  def flush(self) -> None:
    """Makes every written line durable (remote: uploads the file; local lines already are)."""
    if self.remote and self._dirty:
      storage.write_text(self.path, ''.join(self._lines))
      self._dirty = False
    self._last_flush = time.monotonic()
    if self._writer is not None:
      self._writer.flush()
      self._events.raise_kept()

  def close(self) -> None:
    try:
      if self.enabled:
        self.flush()
    except BaseException:
      self._close_writer(raise_kept=False)   # the flush's error is the one to report
      raise
    self._close_writer(raise_kept=True)

  def _close_writer(self, raise_kept: bool) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None   # closed once, even when flushing failed
      writer.close()
      if raise_kept:
        self._events.raise_kept()


def records_before(text: str, step: int) -> tuple[list[str], list[tuple[int, str]]]:
  """(lines of metrics.jsonl `text` holding a record of a step before `step`, each ending in a
  newline; (1-based line number, line) of every damaged line: not a JSON object with an integer
  'step'). A damaged line never hides the good records after it."""
  kept, damaged = [], []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      record = None
    recorded = record.get('step') if isinstance(record, dict) else None
    if not isinstance(recorded, int) or isinstance(recorded, bool):
      damaged.append((number, line))
    elif recorded < step:
      kept.append(line + '\n')
  return kept, damaged


def keep_damaged_lines(path: str, damaged: list[tuple[int, str]]) -> None:
  """Appends the damaged lines of `path` to `<path>.damaged` (so nothing is lost) and warns
  once, naming the file and the line numbers."""
  aside = path + '.damaged'
  old = storage.read_text(aside) if storage.exists(aside) else ''
  storage.write_text(aside, old + ''.join(f'{line}\n' for _, line in damaged))
  numbers = ', '.join(str(n) for n, _ in damaged[:10]) + (' ...' if len(damaged) > 10 else '')
  warnings.warn(f'{path}: skipped {len(damaged)} unreadable line(s) on resume (line {numbers}); '
                f'kept them in {aside}', stacklevel=3)


def read_metrics(workdir: str) -> list[dict[str, float]]:
  text = storage.read_text(storage.join(storage.resolve(workdir), 'metrics.jsonl'))
  return [json.loads(line) for line in text.splitlines() if line.strip()]
