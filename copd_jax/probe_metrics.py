"""The top-k probe's logged metrics, each process working on its own rows.

The probe (copd_jax/edge_topk.py) leaves per-token arrays [R, K, M, T, ...] on the training mesh
(K on 'branch', every row of a branch on each of its devices), and the distillation batch
(`driver.Distillation.stacked`) has the same layout. Every logged metric of an edge is a mean
over masked positions, so a process copies only its share of the rows to the host
(`distributed.local_share`, `local_block`: every row by exactly one process), sums each
metric's terms there (`metrics.*_terms`), and only those sums and counts are gathered
(`distributed.sum_over_processes`, [R, K, metrics, 2] numbers), never the per-token arrays or
the completion masks. On one process every value equals the whole-array mean of
copd_jax.metrics bit for bit (the same sum over the same positions, divided by the same count);
on several, the per-process sums are added in process order, so a value may differ from the
one-process run in its last bits.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from copd_jax import distributed
from copd_jax import metrics as metrics_lib

# The per-edge terms, in the order of the gathered array's metric axis.
SIGNAL_KEYS = ('delta_abs', 'teacher_mass', 'student_mass', 'overlap_advantage', 'overlap_share')
TERM_KEYS = ('overlap', 'symmetric_kl', 'reverse_kl') + SIGNAL_KEYS


def edge_terms(tokens, student_ids, teacher_ids, student_lp, teacher_lp, mask, beta: float,
               delta_clamp: float) -> np.ndarray:
  """[len(TERM_KEYS), 2] (sum, count) of every probe metric of one edge over the given rows
  (tokens, log-probs, mask [M, T]; ids [M, T, k])."""
  terms = {'overlap': metrics_lib.topk_overlap_terms(student_ids, teacher_ids, mask),
           'symmetric_kl': metrics_lib.symmetric_kl_terms(student_lp, teacher_lp, mask),
           'reverse_kl': metrics_lib.reverse_kl_terms(student_lp, teacher_lp, mask)}
  terms.update(metrics_lib.opd_edge_terms(tokens, student_ids, teacher_ids, student_lp,
                                          teacher_lp, mask, beta, delta_clamp))
  return np.asarray([terms[key] for key in TERM_KEYS], np.float64)


def local_terms(edge, tokens, completion_mask, rounds: Sequence[Sequence[int]],
                rows: tuple[slice, slice], beta: float, delta_clamp: float) -> np.ndarray:
  """[R, K, len(TERM_KEYS), 2] terms of every edge over this process's `rows` (branch rows,
  distillation rows) of the probe's output `edge` (EdgeTopK [R, K, M, T, ...]) and the
  distillation batch's tokens / completion mask [R, K, M, T]; zeros where the edge is
  another process's or there is no edge (teacher < 0)."""
  R, K = tokens.shape[:2]
  block = lambda x: distributed.local_block(x, (slice(0, R),) + tuple(rows))
  student_ids, teacher_ids = block(edge.student_ids), block(edge.teacher_ids)
  student_lp, teacher_lp = block(edge.student_token_logprob), block(edge.teacher_token_logprob)
  tokens, mask = block(tokens), block(completion_mask)
  out = np.zeros((R, K, len(TERM_KEYS), 2), np.float64)
  for r, teacher_of in enumerate(rounds):
    for i, s in enumerate(range(*rows[0].indices(K))):
      if teacher_of[s] >= 0:
        out[r, s] = edge_terms(tokens[r, i], student_ids[r, i], teacher_ids[r, i],
                               student_lp[r, i], teacher_lp[r, i], mask[r, i], beta, delta_clamp)
  return out


def named_metrics(terms: np.ndarray, rounds: Sequence[Sequence[int]], names: Sequence[str],
                  k: int) -> dict[str, float]:
  """Every edge's metrics from the summed terms [R, K, len(TERM_KEYS), 2]:
  behaviour/{overlap_top<k>, symmetric_kl, reverse_kl}/<student><-<teacher>,
  opd/<signal metric>/<student><-<teacher>, and behaviour/min_overlap (their smallest overlap,
  which drives the overlap schedule; nan without edges)."""
  out = {}
  for r, teacher_of in enumerate(rounds):
    for s, t in enumerate(teacher_of):
      if t < 0:
        continue
      name = f'{names[s]}<-{names[t]}'
      value = {key: metrics_lib.ratio(terms[r, s, i]) for i, key in enumerate(TERM_KEYS)}
      out[f'behaviour/overlap_top{k}/{name}'] = value['overlap']
      out[f'behaviour/symmetric_kl/{name}'] = value['symmetric_kl']
      out[f'behaviour/reverse_kl/{name}'] = value['reverse_kl']
      out.update({f'opd/{key}/{name}': value[key] for key in SIGNAL_KEYS})
  overlaps = [v for key, v in out.items() if key.startswith('behaviour/overlap_top')]
  out['behaviour/min_overlap'] = min(overlaps) if overlaps else float('nan')
  return out


def probe_metrics(edge, distill, rounds: Sequence[Sequence[int]], names: Sequence[str],
                  mesh, beta: float, delta_clamp: float) -> dict[str, float]:
  """The probe's metrics (`named_metrics`) from its output `edge` and the distillation batch
  `distill` (RolloutBatch [R, K, M, T]) on `mesh` (None: host arrays, all rows this process's):
  terms on this process's rows, summed over processes."""
  K, M = distill.tokens.shape[1:3]
  rows = distributed.all_rows(K, M) if mesh is None else distributed.local_share(mesh, K, M)
  terms = local_terms(edge, distill.tokens, distill.completion_mask, rounds, rows, beta,
                      delta_clamp)
  return named_metrics(distributed.sum_over_processes(terms), rounds, names,
                       edge.student_ids.shape[-1])
