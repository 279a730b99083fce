"""The behavioural probe of each distillation edge: top-k next-token ids and log-probs of student
and teacher on the student's rollouts (top-k overlap O_k and the symmetric-KL metrics).

Cross-branch traffic is only what the result needs. The probe runs under `jax.shard_map`, manual
over the 'branch' mesh axis ('fsdp' / 'tensor' stay automatic inside a branch), so the compiler
cannot move anything between branches on its own: each branch scores on its own shard with its
own parameters, the students' tokens reach their teachers by `lax.ppermute` (one partial
permutation per round, `steps.branch_permutation`), top-k is taken on the teacher's shard, and
only [M, T, k] ids and log-probs travel back. Before, a plain jit of the same code all-gathered
every branch's full-vocabulary log-probs [M, T, V] over 'branch' (XLA's partitioning of the
vmapped top-k); tests/test_steps.py checks the compiled program's largest cross-branch
collective scales with tokens x k, not vocabulary or parameters.

Qwen3-VL: the rows' pictures (`RolloutBatch.vision`) are scored as the OPD teacher pass scores
them (`steps.chunked_rows`): the student on its own pack, the teacher on the student's pack,
which goes to the teacher's shard with the tokens (pixels cross branches, parameters never).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax.scoring import check_chunk_size, next_token_topk
from copd_jax.steps import (BranchState, RolloutBatch, chunked_rows, encoded_once,
                            permute_branches, round_table, routing)
from copd_jax.tracing import TRACE_COUNTS


class EdgeTopK(NamedTuple):
  """Per round r and student k (teacher rounds[r][k]), at each position t of the student's
  distillation rollout: the next-token distribution predicting token t (position 0 and
  positions outside the completion mask hold ids -1 and log-probs 0; so do idle students)."""
  student_ids: jax.Array             # [R, K, M, T, k] int32, descending probability
  student_logprobs: jax.Array        # [R, K, M, T, k]
  teacher_ids: jax.Array             # [R, K, M, T, k]
  teacher_logprobs: jax.Array        # [R, K, M, T, k]
  student_token_logprob: jax.Array   # [R, K, M, T] log-prob of the sampled token
  teacher_token_logprob: jax.Array   # [R, K, M, T]


def make_edge_topk(graphdef, mesh: Mesh, state_sharding: BranchState,
                   rounds: Sequence[Sequence[int]], k: int, temperature: float = 1.0,
                   num_micro_batches: int = 1, logits_chunk: int | None = None) -> Callable:
  """Jitted `edge_topk(params [K, ...], distill [R, K, M, T]) -> EdgeTopK`. Parameters stay where
  they are; tokens (and a Qwen3-VL batch's pictures) go to the teacher's shard and only top-k
  results come back. logits_chunk as in StepConfig."""
  check_chunk_size(logits_chunk)
  rounds_sh = NamedSharding(mesh, P(None, 'branch'))

  def edge_topk(params: nnx.State, distill: RolloutBatch) -> EdgeTopK:
    TRACE_COUNTS['edge_topk'] += 1
    R, K = distill.tokens.shape[:2]
    table = round_table(rounds, K, R)
    score = lambda p, tok, valid, vision: chunked_rows(
        lambda t, v, pictures: next_token_topk(graphdef, p, t, v, temperature, k, logits_chunk,
                                               pictures),
        num_micro_batches, tok, valid, encoded_once(graphdef, p, vision))

    def local(params, tokens, valid, completion, vision):
      """One branch block's share: [K / branch, ...] of every input (vision None for text)."""
      here = jax.lax.axis_index('branch') * tokens.shape[1] + jnp.arange(tokens.shape[1])
      out = []
      for r, teacher_of in enumerate(table):
        to_teacher, to_student, active = routing(teacher_of)
        move = lambda x, index: permute_branches(x, index, K)
        pictures = jax.tree.map(lambda x: x[r], vision)
        s_ids, s_lp, s_tok = jax.vmap(score)(params, tokens[r], valid[r], pictures)
        # Qwen3-VL: the student's pictures go with its tokens to the teacher.
        t_ids, t_lp, t_tok = jax.vmap(score)(
            params, move(tokens[r], to_teacher), move(valid[r], to_teacher),
            jax.tree.map(lambda x: move(x, to_teacher), pictures))
        t_ids, t_lp, t_tok = (move(x, to_student) for x in (t_ids, t_lp, t_tok))
        keep = completion[r].astype(bool) & jnp.asarray(active)[here][:, None, None]
        ids = lambda x: jnp.where(keep[..., None], x, -1)
        vals = lambda x: jnp.where(keep[..., None] if x.ndim == 4 else keep, x, 0.0)
        out.append(EdgeTopK(ids(s_ids), vals(s_lp), ids(t_ids), vals(t_lp), vals(s_tok),
                            vals(t_tok)))
      return jax.tree.map(lambda *xs: jnp.stack(xs), *out)

    rows = P(None, 'branch')
    return jax.shard_map(local, mesh=mesh, in_specs=(P('branch'), rows, rows, rows, rows),
                         out_specs=rows, axis_names={'branch'}, check_vma=False)(
        params, distill.tokens, distill.token_valid, distill.completion_mask, distill.vision)

  return jax.jit(edge_topk, in_shardings=(state_sharding.params, rounds_sh),
                 out_shardings=rounds_sh)
