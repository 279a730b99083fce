"""Teacher-forced per-token log-probabilities: the one definition the trainer, the OPD teacher
signal and the sampler-parity tests all use.

The model is used functionally, as (graphdef, params) from `nnx.split`, so the same call works
under `jax.jit` and `jax.vmap` over branch-stacked parameters.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class TokenScores(NamedTuple):
  """Per position t of a [B, T] sequence, the score of token t given tokens < t.
  Position 0 has no context and scores 0."""
  logprobs: jax.Array   # [B, T] log p_T(token_t | prefix) at temperature T
  entropy: jax.Array    # [B, T] entropy of that next-token distribution


def split_model(model: nnx.Module):
  """(graphdef, params). Our models hold nothing but nnx.Param, so params is the whole state."""
  return nnx.split(model)


def apply_model(graphdef, params, tokens, **kwargs):
  """Calls the model functionally: returns what `model(tokens, **kwargs)` returns."""
  return nnx.merge(graphdef, params)(tokens, **kwargs)


def logprobs_from_logits(logits: jax.Array, targets: jax.Array,
                         temperature: float | jax.Array = 1.0) -> TokenScores:
  """logits [B, T, V] predicting targets [B, T] (already aligned) -> TokenScores of targets."""
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return TokenScores(logp, entropy)


def sequence_logprobs(graphdef, params, tokens: jax.Array, token_valid: jax.Array,
                      temperature: float | jax.Array = 1.0) -> TokenScores:
  """Teacher-forced scores of every token of `tokens` [B, T] under the model at `temperature`.

  Output position t scores tokens[:, t] from the logits at t-1; position 0 and invalid tokens
  score 0, so masks over completion tokens apply directly.
  """
  logits, _ = apply_model(graphdef, params, tokens, token_valid=token_valid)
  scores = logprobs_from_logits(logits[:, :-1], tokens[:, 1:], temperature)
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 0))) * token_valid
  return TokenScores(pad(scores.logprobs), pad(scores.entropy))
