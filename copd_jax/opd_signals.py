"""The OPD teacher signal variants (`opd.signal`): what a teacher computes on its student's
rollout, what of it crosses branches, and the per-position loss the student takes from it.

- 'sampled_token' (default; paper Eq. 8): the teacher's log-prob of each sampled token crosses
  ([M, T] per edge); the student's token advantage is beta * clip(delta, +-delta_clamp) with
  delta = log pi_teacher(y_t) - log pi_student(y_t) (detached), fed into the clipped surrogate
  like a GRPO advantage (copd_jax.losses.opd_advantages).
- 'topk_forward_kl': the teacher's top-k next-token ids and log-probs cross ([M, T, k] per
  edge, never the vocabulary). Per position the teacher's top-k distribution is renormalised
  over its k ids, q_i = p_T(i) / sum_j p_T(j), and the student minimises the forward
  KL(q || pi_student) = sum_i q_i (log q_i - log pi_student(i)) on those k ids (gradient
  -sum_i q_i grad log pi_student(i)). With k < V this is not zero when teacher == student
  (q is the truncated, sharpened distribution); with k = V it is the exact forward KL.
- 'full_reverse_kl': per position the student minimises the exact KL(pi_student || pi_teacher)
  over the vocabulary (possible because every branch shares the tokenizer). Its gradient
  -sum_v pi_s(v) delta_v grad log pi_s(v), delta_v = log pi_t(v) - log pi_s(v), is the
  expectation over y ~ pi_s of the sampled-token signal's gradient, so delta_clamp applies
  the same way: per vocabulary entry, clip(delta_v) in that gradient (the logged value stays
  the unclamped KL). What crosses is what the teacher's logits are made of, never the logits:
  its final-normed hidden states ([M, T, D] per edge, compute dtype) and, once per round, its
  output head (`teacher_head`: [V, D], the embedding when tied). The student forms
  the teacher's log-probs one logits_chunk at a time inside its own chunked loss
  (`teacher_logprobs_from_hidden`), the same head_logits of the same inputs the teacher would
  compute, so the traffic scales as tokens x D + V x D, not tokens x V.

Both distribution variants REPLACE the token advantage of the distillation rows: those rows get
advantage 0 in the clipped surrogate (no gradient from it) and instead add
beta * (per-position divergence), aggregated with the same weights and the same normaliser as
the native GRPO rows of the combined batch (copd_jax.losses.aggregation_weights), so beta and
the native GRPO part combine as for the default. There is no importance ratio on the
divergence: the OPD step makes one update per batch, on the student's own rollouts.

Memory: the student's logits are scored `logits_chunk` positions at a time with the divergence
inside each chunk (recomputed in the backward pass), so the student's [T, V] logits never sit
whole; with 'full_reverse_kl' neither do the teacher's: a chunk holds both models' [rows, c, V]
logits, and what stays for the whole update is the teacher's [rows, T, D] hidden states and its
R heads (copd_jax/memory_estimate.py counts both).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from copd_jax.models.qwen3 import head_logits
from copd_jax.scoring import (TokenScores, head_model, logprobs_from_logits, map_head_chunks,
                              model_hidden, pad_first_position, scores_from_hidden,
                              sequence_logprobs)

SAMPLED_TOKEN, TOPK_FORWARD_KL, FULL_REVERSE_KL = ('sampled_token', 'topk_forward_kl',
                                                   'full_reverse_kl')
SIGNALS = (SAMPLED_TOKEN, TOPK_FORWARD_KL, FULL_REVERSE_KL)


class TeacherView(NamedTuple):
  """What a teacher sends back per row of its student's rollout [M, T] (position t: the
  prediction of token t; 0 at position 0 and invalid positions). Fields a signal does not use
  are None and never computed or moved."""
  token_logprobs: jax.Array                 # [M, T] log pi_teacher of the sampled token
  topk_ids: jax.Array | None = None         # [M, T, k] int32 ('topk_forward_kl')
  topk_logprobs: jax.Array | None = None    # [M, T, k]
  hidden: jax.Array | None = None           # [M, T, D] ('full_reverse_kl') the teacher's final-
                                            # normed hidden state whose logits predict token t


def teacher_view(graphdef, params, tokens: jax.Array, valid: jax.Array, signal: str,
                 temperature: float, topk: int, logits_chunk: int | None,
                 vision=None) -> TeacherView:
  """The teacher's side of `signal` on rows tokens [M, T] (scored with the teacher's params;
  vision: the rows' pictures for a Qwen3-VL model, `scoring.model_hidden`)."""
  if signal == SAMPLED_TOKEN:
    return TeacherView(sequence_logprobs(graphdef, params, tokens, valid, temperature,
                                         logits_chunk, vision).logprobs)
  if signal == TOPK_FORWARD_KL:
    model = nnx.merge(graphdef, params)
    hidden = model_hidden(model, tokens, valid, vision)

    def per_chunk(logits, targets):
      logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
      token_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
      return (token_lp,) + top_k_by_argmax(logp, topk)

    token_lp, ids, top_lp = (pad_first_position(x) for x in map_head_chunks(
        per_chunk, head_model(model), hidden[:, :-1], tokens[:, 1:], logits_chunk))
    return TeacherView(token_lp * valid, ids, top_lp * valid[..., None])
  if signal == FULL_REVERSE_KL:
    model = nnx.merge(graphdef, params)
    hidden = model_hidden(model, tokens, valid, vision)
    token_lp = scores_from_hidden(head_model(model), hidden[:, :-1], tokens[:, 1:], temperature,
                                  logits_chunk).logprobs
    return TeacherView(pad_first_position(token_lp) * valid,
                       hidden=pad_first_position(hidden[:, :-1]) * valid[..., None].astype(
                           hidden.dtype))
  raise ValueError(f'unknown OPD signal {signal!r}; choose one of {SIGNALS}')


def teacher_head(graphdef, params) -> jax.Array:
  """The teacher's output projection as 'full_reverse_kl' sends it, once per round: [V, D] (an
  untied [D, V] head transposed, so every head is split on its vocabulary axis alike) in the
  compute dtype, as the teacher's own chunked scoring casts it."""
  model = head_model(nnx.merge(graphdef, params))
  head = model.head_weight()
  return head if model.config.tie_word_embeddings else head.T


def teacher_logprobs_from_hidden(hidden: jax.Array, heads: jax.Array,
                                 temperature: float) -> jax.Array:
  """fp32 next-token log-probs [B, c, V] of teachers' hidden states [B, c, D] whose rows come in
  R equal consecutive groups, group r through heads[r] (heads [R, V, D], `teacher_head`): the
  logits each teacher computes for itself (`head_logits`), at `temperature`."""
  R = heads.shape[0]
  B, c, D = hidden.shape
  if B % R:
    raise ValueError(f'{B} teacher rows do not split into {R} rounds')
  logits = jax.vmap(lambda h, w: head_logits(h, w, tied=True))(hidden.reshape(R, B // R, c, D),
                                                               heads)
  return jax.nn.log_softmax(logits.reshape(B, c, -1) / temperature, axis=-1)


def top_k_by_argmax(logp: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(ids [..., k] int32, values [..., k]) of the k largest entries of logp [..., V], largest
  first, as lax.top_k, by k argmax / max passes. Inside the jitted OPD step XLA partitions these
  reductions along the branch-stacked batch axes, where a vmapped lax.top_k was partitioned by
  all-gathering every branch's [M, T, V] log-probs over 'branch' (edge_topk avoids that with a
  shard_map instead)."""
  vocab = jnp.arange(logp.shape[-1], dtype=jnp.int32)

  def one(rest, _):
    best = jnp.argmax(rest, axis=-1).astype(jnp.int32)
    value = jnp.max(rest, axis=-1)
    return jnp.where(vocab == best[..., None], -jnp.inf, rest), (best, value)

  _, (ids, values) = jax.lax.scan(one, logp, None, length=k)
  return jnp.moveaxis(ids, 0, -1), jnp.moveaxis(values, 0, -1)


def topk_forward_kl(student_logp: jax.Array, teacher_ids: jax.Array,
                    teacher_topk_logprobs: jax.Array) -> jax.Array:
  """Per position KL(q || pi_student) on the teacher's k ids: student_logp [..., V] the
  student's log-probs (differentiable), teacher_ids / teacher_topk_logprobs [..., k];
  q = softmax(teacher_topk_logprobs) (the top-k renormalised; detached). -> [...]."""
  q = jax.lax.stop_gradient(jax.nn.softmax(teacher_topk_logprobs, axis=-1))
  log_q = jax.lax.stop_gradient(jax.nn.log_softmax(teacher_topk_logprobs, axis=-1))
  ids = jnp.clip(teacher_ids, 0, student_logp.shape[-1] - 1)  # -1 marks unused positions
  student_at = jnp.take_along_axis(student_logp, ids, axis=-1)
  return jnp.sum(q * (log_q - student_at), axis=-1)


def reverse_kl(student_logp: jax.Array, teacher_logp: jax.Array,
               clamp: float | None = None) -> jax.Array:
  """Per position KL(pi_student || pi_teacher) over the vocabulary (student_logp, teacher_logp
  [..., V]; the teacher detached) -> [...]. The value is the exact KL; its gradient is
  -sum_v pi_s(v) clip(delta_v) grad log pi_s(v), delta_v = log pi_t(v) - log pi_s(v) detached,
  which equals grad KL when clamp is None (the sum_v pi_s grad log pi_s term is zero)."""
  teacher_logp = jax.lax.stop_gradient(teacher_logp)
  probs = jax.lax.stop_gradient(jnp.exp(student_logp))
  kl = jnp.sum(probs * (jax.lax.stop_gradient(student_logp) - teacher_logp), axis=-1)
  delta = jax.lax.stop_gradient(teacher_logp - student_logp)
  if clamp is not None:
    delta = jnp.clip(delta, -clamp, clamp)
  surrogate = -jnp.sum(probs * delta * student_logp, axis=-1)
  return kl + surrogate - jax.lax.stop_gradient(surrogate)


def student_scores(graphdef, params, tokens: jax.Array, valid: jax.Array, view: TeacherView,
                   signal: str, temperature: float, logits_chunk: int | None,
                   clamp: float | None = None, teacher_heads: jax.Array | None = None,
                   first_distill_row: int = 0, vision=None) -> tuple[TokenScores, jax.Array]:
  """The student's TokenScores of tokens [B, T] and, per position, its divergence from the
  teacher's view for a distribution `signal` ([B, T], 0 at position 0 and invalid positions),
  both from one pass over the student's logits, logits_chunk positions at a time (vision: as
  in `teacher_view`).

  'full_reverse_kl': rows [first_distill_row, B) are distillation rows in R equal consecutive
  groups, group r taught by teacher_heads[r] ([R, V, D], `teacher_head`) applied to
  view.hidden; rows before first_distill_row (native rows) get divergence 0 and no teacher
  logits."""
  model = nnx.merge(graphdef, params)
  first = first_distill_row
  hidden = model_hidden(model, tokens, valid, vision)
  shift = lambda x: x[:, 1:]  # position t of the view predicts token t: logits at t - 1

  def per_chunk(logits, inputs):
    targets, teacher = inputs
    scores = logprobs_from_logits(logits, targets, temperature)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    if signal == TOPK_FORWARD_KL:
      divergence = topk_forward_kl(logp, *teacher)
    elif signal == FULL_REVERSE_KL:
      teacher_logp = teacher_logprobs_from_hidden(teacher[first:], teacher_heads, temperature)
      divergence = jnp.concatenate([jnp.zeros((first, logp.shape[1]), logp.dtype),
                                    reverse_kl(logp[first:], teacher_logp, clamp)])
    else:
      raise ValueError(f'{signal!r} is not a distribution signal')
    return scores, divergence

  teacher = ((shift(view.topk_ids), shift(view.topk_logprobs)) if signal == TOPK_FORWARD_KL
             else shift(view.hidden))
  scores, divergence = map_head_chunks(per_chunk, head_model(model), hidden[:, :-1],
                                       (tokens[:, 1:], teacher), logits_chunk)
  pad = lambda x: pad_first_position(x) * valid
  return TokenScores(pad(scores.logprobs), pad(scores.entropy)), pad(divergence)
