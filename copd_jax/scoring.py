"""Teacher-forced per-token log-probabilities: the one definition the trainer, the OPD teacher
signal and the sampler-parity tests all use.

The model is used functionally, as (graphdef, params) from `nnx.split`, so the same call works
under `jax.jit` and `jax.vmap` over branch-stacked parameters.

Chunked scoring (`chunk_size`): full-vocabulary fp32 logits [B, T, V], with their log-softmax,
exp and gradient, dominate training memory when V >> D (Qwen3: V = 151,936, D = 1,024). With a
chunk size the model runs to its final hidden states [B, T, D] once, and the output projection,
log-softmax, target log-prob and entropy are computed `chunk_size` positions at a time, each
chunk under `jax.checkpoint`: the backward pass recomputes a chunk's logits instead of storing
them, so at most [B, chunk_size, V] logits are live. The math per position is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from copd_jax.models.qwen3 import head_logits
from copd_jax.models.qwen3_vl import Qwen3VL


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


def model_hidden(model: nnx.Module, tokens: jax.Array, token_valid: jax.Array,
                 vision=None) -> jax.Array:
  """Final hidden states [B, T, D] of rows tokens [B, T]: a Qwen3 model's, or a Qwen3-VL
  model's with the rows' pictures (`vision_batch.VisionBatch` of one branch, None for text
  rows: plain positions)."""
  if isinstance(model, Qwen3VL):
    return model.packed_hidden_states(tokens, token_valid, vision)
  if vision is not None:
    raise ValueError(f'pictures need a Qwen3-VL model, got {type(model).__name__}')
  return model.hidden_states(tokens, token_valid=token_valid)[0]


def head_model(model: nnx.Module) -> nnx.Module:
  """The module holding the output head (`map_head_chunks`): a Qwen3-VL model's text decoder."""
  return model.text if isinstance(model, Qwen3VL) else model


def logprobs_from_logits(logits: jax.Array, targets: jax.Array,
                         temperature: float | jax.Array = 1.0) -> TokenScores:
  """logits [B, T, V] predicting targets [B, T] (already aligned) -> TokenScores of targets."""
  logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return TokenScores(logp, entropy)


def check_chunk_size(chunk_size: int | None) -> None:
  if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                 or chunk_size < 1):
    raise ValueError(f'chunk_size must be a positive integer or None, got {chunk_size!r}')


def map_head_chunks(fn: Callable[[jax.Array, Any], Any], model: nnx.Module,
                    hidden: jax.Array, targets: Any, chunk_size: int | None) -> Any:
  """`fn(logits [B, c, V] fp32, targets chunk)` -> pytree of [B, c, ...] arrays, applied to the
  model's output projection of final hidden states `hidden` [B, T, D] (`Qwen3.hidden_states`)
  predicting `targets` (an array [B, T], or a pytree of [B, T, ...] arrays that travel with
  their positions: token ids, a teacher's per-position top-k or log-probs); returns the pytree
  with [B, T, ...] leaves.

  chunk_size None or >= T: one call on all T positions. Otherwise `lax.map` over chunks of
  chunk_size positions, each under `jax.checkpoint` (its logits are recomputed in the backward
  pass, never stored); a last partial chunk is padded and its padding dropped.
  """
  check_chunk_size(chunk_size)
  tied = model.config.tie_word_embeddings
  B, T = hidden.shape[:2]
  if chunk_size is None or chunk_size >= T:
    return fn(head_logits(hidden, model.head_weight(), tied), targets)
  # The head enters each chunk in its parameter dtype and is cast there, so the gradient the
  # scan accumulates over chunks has the parameter's precision (not bf16 compute precision).
  w = (model.embed if tied else model.lm_head)[...]
  dtype = model.compute_dtype

  def one_chunk(w, h, tgt):
    return fn(head_logits(h, w.astype(dtype), tied), tgt)

  one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)  # prevent_cse is moot inside a scan
  n = -(-T // chunk_size)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n * chunk_size - T)) + ((0, 0),) * (x.ndim - 2))
  hidden, targets = pad(hidden), jax.tree.map(pad, targets)
  to_chunks = lambda x: jnp.moveaxis(x.reshape(B, n, chunk_size, *x.shape[2:]), 1, 0)
  out = jax.lax.map(lambda xs: one_chunk(w, *xs),
                    (to_chunks(hidden), jax.tree.map(to_chunks, targets)))
  from_chunks = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, n * chunk_size, *x.shape[3:])[:, :T]
  return jax.tree.map(from_chunks, out)


def scores_from_hidden(model: nnx.Module, hidden: jax.Array, targets: jax.Array,
                       temperature: float | jax.Array = 1.0,
                       chunk_size: int | None = None) -> TokenScores:
  """Final hidden states [B, T, D] predicting targets [B, T] (already aligned) -> TokenScores,
  `chunk_size` positions of logits at a time (None: all at once)."""
  return map_head_chunks(lambda logits, tgt: logprobs_from_logits(logits, tgt, temperature),
                         model, hidden, targets, chunk_size)


def sequence_logprobs(graphdef, params, tokens: jax.Array, token_valid: jax.Array,
                      temperature: float | jax.Array = 1.0,
                      chunk_size: int | None = None, vision=None) -> TokenScores:
  """Teacher-forced scores of every token of `tokens` [B, T] under the model at `temperature`.
  vision: the rows' pictures for a Qwen3-VL model (`model_hidden`).

  Output position t scores tokens[:, t] from the logits at t-1; position 0 and invalid tokens
  score 0, so masks over completion tokens apply directly. chunk_size (None or >= T: off) bounds
  the logits held at once to [B, chunk_size, V], forward and backward (`map_head_chunks`); the
  model must then expose `hidden_states` and its head as Qwen3 does.
  """
  check_chunk_size(chunk_size)
  model = nnx.merge(graphdef, params)
  if not isinstance(model, Qwen3VL) and (chunk_size is None or chunk_size >= tokens.shape[1]):
    logits, _ = model(tokens, token_valid=token_valid)
    scores = logprobs_from_logits(logits[:, :-1], tokens[:, 1:], temperature)
  else:
    hidden = model_hidden(model, tokens, token_valid, vision)
    scores = scores_from_hidden(head_model(model), hidden[:, :-1], tokens[:, 1:], temperature,
                                chunk_size)
  pad = lambda x: jnp.pad(x, ((0, 0), (1, 0))) * token_valid
  return TokenScores(pad(scores.logprobs), pad(scores.entropy))


def pad_first_position(x: jax.Array) -> jax.Array:
  """[B, T - 1, ...] predictions of tokens 1 .. T-1 -> [B, T, ...] aligned with the tokens
  (position 0, which has no context, holds 0)."""
  return jnp.pad(x, ((0, 0), (1, 0)) + ((0, 0),) * (x.ndim - 2))


def next_token_topk(graphdef, params, tokens, valid, temperature: float, k: int,
                    logits_chunk: int | None = None, vision=None):
  """[M, T] tokens -> (ids [M, T, k], logprobs [M, T, k], token_logprob [M, T]) of the model's
  next-token distribution at `temperature`, aligned as in `sequence_logprobs` (position t
  describes the prediction of token t), ids in descending probability; logits_chunk positions
  of logits at a time (None: all); vision: as in `sequence_logprobs`."""
  model = nnx.merge(graphdef, params)
  hidden = model_hidden(model, tokens, valid, vision)

  def topk(logits, targets):
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp_all, k)
    return top_ids, top_lp, logprobs_from_logits(logits, targets, temperature).logprobs

  out = map_head_chunks(topk, head_model(model), hidden[:, :-1], tokens[:, 1:], logits_chunk)
  return tuple(pad_first_position(x) for x in out)


def next_token_logprobs(graphdef, params, tokens, valid, temperature: float,
                        logits_chunk: int | None = None, vision=None) -> jax.Array:
  """[M, T] tokens -> [M, T, V] log-probs of the whole next-token distribution at
  `temperature`, aligned as in `sequence_logprobs` (position 0 and invalid positions 0).
  Computed logits_chunk positions at a time, but the result is vocabulary-sized per token;
  vision: as in `sequence_logprobs`."""
  model = nnx.merge(graphdef, params)
  hidden = model_hidden(model, tokens, valid, vision)
  logp = map_head_chunks(
      lambda logits, _: jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1),
      head_model(model), hidden[:, :-1], tokens[:, 1:], logits_chunk)
  return pad_first_position(logp) * valid[..., None]
