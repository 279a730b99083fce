"""GRPO and OPD losses as pure functions of per-token arrays.

Shapes: every per-token array is [..., N, T] (N sequences of T positions, any leading axes);
`mask` marks the completion tokens that are trained on. Position conventions follow
`copd_jax.scoring`: position t holds the log-prob of token t given tokens < t.

Normalisation over the global batch: `aggregation_weights` returns per-token weights and this
batch's share of the normaliser. A train step sums the normaliser over every micro-batch (and over
the native and distillation parts of an OPD update) first, then passes the total to `policy_loss`
for each micro-batch, so the summed micro-batch losses equal the full-batch loss exactly. Metrics
are normalised the same way (by the global completion-token count), so they add up too.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

AGGREGATIONS = ('seq-mean-token-mean', 'token-mean', 'seq-mean-token-sum-norm')

# Log importance ratios are clamped to this range before exp, so a masked-out position with a
# garbage log-prob cannot turn into inf * 0 = NaN.
_MAX_LOG_RATIO = 20.0


def group_advantages(rewards: jax.Array, group_size: int, *, normalize_std: bool = True,
                     ddof: int = 1, eps: float = 1e-6) -> jax.Array:
  """GRPO advantages A_i = (r_i - mean_group r) / (std_group r + eps).

  rewards [..., num_prompts * G], the G samples of one prompt adjacent. Returns the same shape.
  `std_group` is the sample standard deviation (ddof=1, as torch.std in TRL and Tunix) by default;
  ddof=0 gives the population std (numpy's default). normalize_std=False gives Dr. GRPO's
  mean-centred rewards.
  """
  n = rewards.shape[-1]
  if group_size <= 0 or n % group_size:
    raise ValueError(f'rewards length {n} is not a multiple of group_size {group_size}')
  if normalize_std and ddof >= group_size:
    raise ValueError(f'ddof={ddof} needs group_size > ddof, got group_size={group_size}')
  r = rewards.astype(jnp.float32).reshape(*rewards.shape[:-1], n // group_size, group_size)
  centred = r - jnp.mean(r, axis=-1, keepdims=True)
  if normalize_std:
    centred = centred / (jnp.std(r, axis=-1, ddof=ddof, keepdims=True) + eps)
  return centred.reshape(rewards.shape)


def k3_kl(logprobs: jax.Array, ref_logprobs: jax.Array) -> jax.Array:
  """Per-token k3 estimate of KL(pi || pi_ref) on tokens sampled from pi:
  exp(ref - lp) - (ref - lp) - 1 (non-negative, unbiased)."""
  d = jnp.clip(ref_logprobs - logprobs, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  return jnp.exp(d) - d - 1.0


def aggregation_weights(mask: jax.Array, mode: str, max_tokens: int | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """(weights [..., N, T], normaliser scalar) with loss = sum(weights * per_token) / normaliser.

  The normaliser returned is this batch's share; sum it over the whole batch before dividing.
  - 'seq-mean-token-mean' (paper Eq. 7): each sequence's token mean, averaged over sequences.
  - 'token-mean' (DAPO): mean over all completion tokens of the batch.
  - 'seq-mean-token-sum-norm' (Dr. GRPO): token sums / max_tokens, averaged over sequences;
    max_tokens defaults to T.
  Only sequences with at least one completion token count as sequences.
  """
  mask = mask.astype(jnp.float32)
  lengths = jnp.sum(mask, axis=-1, keepdims=True)
  num_seqs = jnp.sum(lengths > 0).astype(jnp.float32)
  if mode == 'token-mean':
    return mask, jnp.sum(mask)
  if mode == 'seq-mean-token-mean':
    return mask / jnp.maximum(lengths, 1.0), num_seqs
  if mode == 'seq-mean-token-sum-norm':
    denom = float(max_tokens if max_tokens is not None else mask.shape[-1])
    return mask / denom, num_seqs
  raise ValueError(f'unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}')


def clipped_surrogate(logprobs: jax.Array, sampler_logprobs: jax.Array, advantages: jax.Array,
                      epsilon_low: float = 0.2, epsilon_high: float = 0.28
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token loss -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), rho = pi / pi_sampler.

  advantages broadcast against logprobs ([..., N] per sequence is expanded over T). Returns
  (loss, clipped_low, clipped_high): the two bool arrays mark tokens where the clip binds and
  the gradient through rho is zero (rho < 1 - eps_low with A < 0; rho > 1 + eps_high with A > 0).
  """
  if advantages.ndim == logprobs.ndim - 1:
    advantages = advantages[..., None]
  log_ratio = jnp.clip(logprobs - sampler_logprobs, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  clipped_ratio = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  loss = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
  clipped_low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
  clipped_high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
  return loss, clipped_low, clipped_high


def policy_loss(logprobs: jax.Array, sampler_logprobs: jax.Array, advantages: jax.Array,
                mask: jax.Array, *, epsilon_low: float = 0.2, epsilon_high: float = 0.28,
                aggregation: str = 'seq-mean-token-mean', max_tokens: int | None = None,
                normalizer: jax.Array | float | None = None,
                token_count: jax.Array | float | None = None,
                entropy: jax.Array | None = None, entropy_coef: float = 0.0,
                ref_logprobs: jax.Array | None = None, kl_coef: float = 0.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped-surrogate policy loss (to minimise) with optional k3 KL and entropy bonus.

  logprobs [..., N, T] are the trained policy's (differentiable); sampler_logprobs the sampler's
  at the same positions; advantages [..., N, T] per token or [..., N] per sequence; mask the
  completion tokens. `normalizer` is the global aggregation normaliser (default: this batch's,
  see `aggregation_weights`) and `token_count` the global number of completion tokens used for
  the metric means (default: this batch's).

  loss = agg(pg) + kl_coef * agg(k3(lp, ref)) - entropy_coef * agg(entropy).
  Metrics, each a token mean over the completion tokens: clip_frac_low, clip_frac_high,
  approx_kl (k3 estimate of KL(sampler || policy)), entropy and ref_kl when given;
  plus loss and pg_loss as aggregated.
  """
  mask_f = mask.astype(jnp.float32)
  weights, own_normalizer = aggregation_weights(mask_f, aggregation, max_tokens)
  normalizer = own_normalizer if normalizer is None else normalizer
  normalizer = jnp.maximum(jnp.asarray(normalizer, jnp.float32), 1e-8)
  token_count = jnp.sum(mask_f) if token_count is None else token_count
  token_count = jnp.maximum(jnp.asarray(token_count, jnp.float32), 1.0)
  aggregate = lambda x: jnp.sum(weights * x) / normalizer
  token_mean = lambda x: jnp.sum(mask_f * x) / token_count

  per_token, clipped_low, clipped_high = clipped_surrogate(
      logprobs, sampler_logprobs, advantages, epsilon_low, epsilon_high)
  pg_loss = aggregate(per_token)
  loss = pg_loss
  metrics = {
      'pg_loss': pg_loss,
      'clip_frac_low': token_mean(clipped_low),
      'clip_frac_high': token_mean(clipped_high),
      'approx_kl': token_mean(jax.lax.stop_gradient(k3_kl(sampler_logprobs, logprobs))),
  }
  if ref_logprobs is not None:
    ref_kl = k3_kl(logprobs, jax.lax.stop_gradient(ref_logprobs))
    metrics['ref_kl'] = jax.lax.stop_gradient(token_mean(ref_kl))
    if kl_coef:
      loss = loss + kl_coef * aggregate(ref_kl)
  if entropy is not None:
    metrics['entropy'] = jax.lax.stop_gradient(token_mean(entropy))
    if entropy_coef:
      loss = loss - entropy_coef * aggregate(entropy)
  metrics['loss'] = loss
  metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
  return loss, metrics


def opd_advantages(teacher_logprobs: jax.Array, student_logprobs: jax.Array, mask: jax.Array, *,
                   beta: float = 1.0, clamp: float | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """On-policy distillation teacher signal (paper Eq. 8).

  delta_t = log pi_teacher(y_t) - log pi_student(y_t), with both arguments under stop-gradient
  (the student term is the detached current policy); advantage = beta * clip(delta, -clamp, clamp).
  Returns (advantages, delta), both [..., N, T] and zero outside `mask`; delta is unclamped.
  """
  mask_f = mask.astype(jnp.float32)
  delta = jax.lax.stop_gradient(teacher_logprobs - student_logprobs) * mask_f
  clamped = delta if clamp is None else jnp.clip(delta, -clamp, clamp)
  return beta * clamped, delta


def advantage_stats(advantages: jax.Array, mask: jax.Array) -> Mapping[str, jax.Array]:
  """mean, std (population), min and max of per-token advantages over the mask."""
  if advantages.ndim == mask.ndim - 1:
    advantages = jnp.broadcast_to(advantages[..., None], mask.shape)
  m = mask.astype(bool)
  count = jnp.maximum(jnp.sum(m), 1)
  mean = jnp.sum(jnp.where(m, advantages, 0.0)) / count
  var = jnp.sum(jnp.where(m, (advantages - mean) ** 2, 0.0)) / count
  any_token = jnp.any(m)
  return {
      'advantage_mean': mean,
      'advantage_std': jnp.sqrt(var),
      'advantage_min': jnp.where(any_token, jnp.min(jnp.where(m, advantages, jnp.inf)), 0.0),
      'advantage_max': jnp.where(any_token, jnp.max(jnp.where(m, advantages, -jnp.inf)), 0.0),
  }
