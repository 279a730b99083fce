"""Token selection: from one step's logits [B, V] to the next token of each row and its log-prob,
under the run's `SamplingParams` (temperature, top-k, top-p, greedy). Pure functions, traced into
the decode program (`decode.py`).

Randomness: row b of a sampler call with key k draws from `row_keys(k, B)[b]` alone (one
uniform per generated token), so results do not depend on how rows are split over devices.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from copd_jax.errors import UserInputError
from copd_jax.fields import FieldError, Fields, named_by_config


class SamplingConfigError(UserInputError):
  """Invalid sampling settings (the message names the field)."""


class SamplingFieldError(FieldError, SamplingConfigError):
  """A bad SamplingParams field."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick each next token. top_k=0 and top_p=1 switch those filters off. Greedy picks the
  argmax; its reported log-prob is then that of the untruncated distribution at `temperature`."""
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    check = Fields('SamplingParams', SamplingFieldError)
    check.positive_int('max_new_tokens', self.max_new_tokens)
    check.real('temperature', self.temperature, 0, low_open=True)  # greedy=True for argmax
    check.positive_int('top_k', self.top_k, allow_zero=True)
    check.real('top_p', self.top_p, 0, 1, low_open=True)
    check.typed('greedy', self.greedy, bool)

  @classmethod
  def from_config(cls, config) -> 'SamplingParams':
    """The run's settings from config.sampling; a bad value names its config field."""
    s, names = config.sampling, ('max_new_tokens', 'temperature', 'top_k', 'top_p')
    with named_by_config({name: f'sampling.{name}' for name in names}):
      return cls(**{name: s[name] for name in names})


def row_keys(key: jax.Array, batch: int) -> jax.Array:
  """One PRNG key per row ([batch]): a row's samples depend on (key, row) only, not on how the
  rows are split over devices."""
  return jax.random.split(key, batch)


def force_eos(logits: jax.Array, token_index: jax.Array, eos_at: jax.Array | None,
              eos_ids: tuple[int, ...]) -> jax.Array:
  """Completion lengths fixed in advance, keyed by row: logits [B, V] of each row's token
  `token_index` ([B] or scalar) -> the same, except that row b can pick no EOS id before its
  token eos_at[b] - 1, and only eos_ids[0] there (its completion then has eos_at[b] tokens, EOS
  included). eos_at None: unchanged. For benchmarks (the same lengths on every sampler) and the
  decoders' equality tests; the run never sets it."""
  if eos_at is None:
    return logits
  ids = jnp.arange(logits.shape[-1])
  at = (token_index == eos_at - 1)[:, None]
  before = (token_index < eos_at - 1)[:, None]
  blocked = (at & (ids != eos_ids[0])) | (before & jnp.isin(ids, jnp.asarray(eos_ids)))
  return jnp.where(blocked, -jnp.inf, logits)


def filter_logits(logits: jax.Array, sampling: SamplingParams) -> jax.Array:
  """Temperature, then top-k, then top-p (nucleus over the top-k distribution). Filtered-out
  entries become -inf; [B, V] fp32. Ties at the top-k / top-p threshold are all kept."""
  x = logits.astype(jnp.float32) / sampling.temperature
  vocab = x.shape[-1]
  if 0 < sampling.top_k < vocab:
    kth = jax.lax.top_k(x, sampling.top_k)[0][:, -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if sampling.top_p < 1:
    ordered = jax.lax.top_k(x, vocab)[0]   # descending
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True)   # >= 1
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    x = jnp.where(x >= threshold, x, -jnp.inf)
  return x


def first_argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis (first index of the maximum) as two plain reductions: [B, V] ->
  [B] int32. XLA:CPU runs jnp.argmax's variadic reduce unvectorised, several times slower."""
  top = jnp.max(x, axis=-1, keepdims=True)
  index = jnp.arange(x.shape[-1], dtype=jnp.int32)
  first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
  return jnp.minimum(first, x.shape[-1] - 1)   # a NaN row picks the last id, not out of range


# Vocabulary block of the two-level inverse CDF (`inverse_cdf`). Outside TPU, XLA's prefix sum
# is a log-depth scan of V-sized passes; over block masses and then inside the one block where
# the sum crosses, the draw costs about one pass over the probabilities (BENCHMARKS.md,
# "Sampler").
CDF_BLOCK = 1024


def _first_above(mass: jax.Array, target: jax.Array) -> jax.Array:
  """mass [B, n] >= 0, target [B] -> [B] int32: the first entry of non-zero mass at which the
  running sum exceeds the target; where rounding leaves none, the last entry of non-zero mass
  (every row has one)."""
  n = mass.shape[-1]
  index = jnp.arange(n, dtype=jnp.int32)
  hit = (jnp.cumsum(mass, axis=-1) > target[:, None]) & (mass > 0)
  # One reduction gives both answers: a hit scores its index, another non-zero entry 2n - index.
  score = jnp.where(hit, index, jnp.where(mass > 0, 2 * n - index, 3 * n))
  best = jnp.min(score, axis=-1)
  return jnp.where(best < n, best, 2 * n - best)


def inverse_cdf(probs: jax.Array, uniforms: jax.Array, block: int = CDF_BLOCK) -> jax.Array:
  """probs [B, V] unnormalised probabilities (0: excluded), uniforms [B] in [0, 1) -> [B] int32:
  the token at which the row's running probability first exceeds uniform * total, an exact
  draw. A token of zero probability is never returned, whatever the rounding. Beyond `block`
  tokens, in two levels: the block in which the sum crosses, then the token inside it."""
  B, V = probs.shape
  target = uniforms * jnp.sum(probs, axis=-1)
  if V <= block:
    return _first_above(probs, target)
  num_blocks = -(-V // block)
  blocks = jnp.pad(probs, ((0, 0), (0, num_blocks * block - V))).reshape(B, num_blocks, block)
  mass = jnp.sum(blocks, axis=-1)
  chosen = _first_above(mass, target)
  before = jnp.take_along_axis(jnp.cumsum(mass, axis=-1) - mass, chosen[:, None], axis=-1)[:, 0]
  inside = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]
  return chosen * block + _first_above(inside, target - before)


def select_tokens(logits: jax.Array, uniforms: jax.Array, sampling: SamplingParams
                  ) -> tuple[jax.Array, jax.Array]:
  """logits [B, V], uniforms [B] (one draw in [0, 1) per row) -> (tokens [B] int32, their
  log-probs [B] fp32). Sampling inverts the CDF of the filtered distribution at the row's
  uniform (`inverse_cdf`), so filtered-out tokens are never drawn; greedy ignores the draws.
  One uniform per row and token, instead of Gumbel-max's one per vocabulary entry, keeps the
  random-number generation out of the decode loop (`_Program.draws`)."""
  if sampling.greedy:
    x = logits.astype(jnp.float32) / sampling.temperature
    tokens = first_argmax(x)
    log_total = jax.nn.logsumexp(x, axis=-1)
  else:
    x = filter_logits(logits, sampling)
    top = jnp.max(x, axis=-1, keepdims=True)
    probs = jnp.exp(x - top)
    tokens = inverse_cdf(probs, uniforms)
    log_total = top[:, 0] + jnp.log(jnp.sum(probs, axis=-1))
  chosen = jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]
  return tokens, chosen - log_total

