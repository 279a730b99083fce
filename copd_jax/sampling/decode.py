"""Batched rollout sampling: prefill, then a `lax.while_loop` of one-token decode steps over a
preallocated KV cache, all inside one jitted program.

Layout of every [B, P + N] output (P prompt slots, N = max_new_tokens): the prompt's real tokens
are packed to the right of the first P columns (left padding; any other padding pattern of the
input is repacked inside the program), the completion starts at column P. Position t refers to
token t, the convention of `copd_jax.scoring.sequence_logprobs`, so a trainer scores the same
arrays teacher-forced.

Compiled programs are cached by jax.jit per (graphdef, shapes, SamplingParams, eos_ids, pad_id,
group_size, DECODE_MODE); pad prompts to a bucket (`pad_prompts`, `DEFAULT_BUCKETS`) so a run
compiles a bounded number of times. The KV cache and the output buffers are allocated inside
the program and updated in place by the while loop (dynamic_update_slice on loop-carried
buffers), so no step copies them and nothing needs donating across the program boundary;
parameters are only read.

Speed notes (CPU, see BENCHMARKS.md): decode steps run the layers unrolled over weights sliced
once before the loop and per-layer cache buffers ('layerwise'); the model's cache layout makes
both attention matmuls plain batched matmuls; argmax is two plain reductions; RoPE tables are
computed once per call and looked up; the prefill's last layer runs the last position only;
every random number is drawn before the loop (one uniform per row and token, `select_tokens`);
on a mesh each device loops over its own rows with no per-step collective; on CPU the devices
read one shared copy of the weights, passed in as per-layer views (`place_weights`,
`cpu_sharing`). Per-token cost is then dominated by the projection and MLP matmuls.

Randomness: row b of a call with key k samples from `row_keys(k, B)[b]` alone, so results do
not depend on how rows are split over devices.

Group sharing (group_size G > 1, for GRPO-style batches whose rows k*G .. k*G+G-1 repeat one
prompt): the prefill runs on the first row of each group only, and its last-position logits and
KV cache are repeated to the group's G rows, which then sample on their own key streams.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax import cpu_sharing, mesh as mesh_lib
from copd_jax.errors import UserInputError
from copd_jax.models import qwen3
from copd_jax.models.qwen3 import KVCache

# Prompt-length (and generation-length) buckets: powers of two from 16 to 32k.
DEFAULT_BUCKETS: tuple[int, ...] = tuple(2 ** i for i in range(4, 16))

# Parameter shardings while sampling on a mesh: the training rules without 'fsdp' on the embed
# dimension, so weights are gathered once per call (not once per decode step) and the batch is
# split over 'fsdp' instead (data parallel); 'tensor' sharding of heads / mlp / vocab stays.
SAMPLING_RULES = mesh_lib.REPLICATED_OVER_FSDP_RULES

# How prefill and decode steps run the model (see `_Forward`): 'layerwise' (the fast one) or
# 'model' (Qwen3.hidden_states as configured). benchmarks/sampler.py compares them.
DECODE_MODE = 'layerwise'


class SamplingConfigError(UserInputError):
  """Invalid sampling settings (the message names the field)."""


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
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise SamplingConfigError(f'sampling.max_new_tokens must be a positive integer, got '
                                f'{self.max_new_tokens!r}')
    if not self.temperature > 0:
      raise SamplingConfigError(f'sampling.temperature must be > 0 (use greedy=True for argmax), '
                                f'got {self.temperature!r}')
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise SamplingConfigError(f'sampling.top_k must be an integer >= 0, got {self.top_k!r}')
    if not 0 < self.top_p <= 1:
      raise SamplingConfigError(f'sampling.top_p must be in (0, 1], got {self.top_p!r}')


class SampleOutput(NamedTuple):
  """All [B, P + N] (or [K, B, P + N] from `generate_branches`)."""
  tokens: jax.Array           # int32: left-padded prompt, then completion; pad after EOS / end
  token_valid: jax.Array      # bool: real prompt tokens and generated tokens (EOS included)
  completion_mask: jax.Array  # bool: generated tokens only (EOS included)
  logprobs: jax.Array         # fp32: log-prob of each generated token under the distribution it
                              # was sampled from (after temperature / top-k / top-p); 0 elsewhere


# ---------------------------------------------------------------------------------------------
# Host-side helpers: buckets and padding
# ---------------------------------------------------------------------------------------------

def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket >= n."""
  ordered = sorted(buckets)
  i = bisect.bisect_left(ordered, n)
  if i == len(ordered):
    raise SamplingConfigError(f'length {n} exceeds the largest bucket {ordered[-1]}')
  return ordered[i]


def pad_prompts(token_lists: list[list[int]], length: int | None = None, pad_id: int = 0,
                buckets: Sequence[int] = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length` (default: the bucket of the longest) ->
  (tokens [B, length] int32, valid [B, length] bool)."""
  longest = max((len(t) for t in token_lists), default=0)
  if length is None:
    length = bucket_length(max(longest, 1), buckets)
  if longest > length:
    raise SamplingConfigError(f'prompt of {longest} tokens is longer than the padded length '
                              f'{length}')
  tokens = np.full((len(token_lists), length), pad_id, np.int32)
  valid = np.zeros((len(token_lists), length), bool)
  for row, ids in enumerate(token_lists):
    if ids:
      tokens[row, length - len(ids):] = ids
      valid[row, length - len(ids):] = True
  return tokens, valid


# ---------------------------------------------------------------------------------------------
# Token selection (pure, [B, V] -> [B])
# ---------------------------------------------------------------------------------------------

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
# the sum crosses, the draw costs about one pass over the probabilities (at V = 151936 on an H200
# the flat scan cost more than the Gumbel noise it replaces; BENCHMARKS.md, "Sampler").
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


# ---------------------------------------------------------------------------------------------
# The sampling program
# ---------------------------------------------------------------------------------------------

def left_pack(tokens: jax.Array, valid: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens (in order) to the right end: [B, P] -> [B, P]."""
  order = jnp.argsort(valid.astype(jnp.int32), axis=-1, stable=True)
  valid = jnp.take_along_axis(valid, order, axis=-1)
  tokens = jnp.take_along_axis(tokens, order, axis=-1)
  return jnp.where(valid, tokens, pad_id).astype(jnp.int32), valid


class _LayerCaches(NamedTuple):
  """The model's KVCache split into one buffer per layer (k [B, kv_heads, head_dim, S], v
  [B, kv_heads, S, head_dim]): a step updates each in place and attends to it whole, with no
  slice or reshape of a stacked buffer (either makes XLA copy the cache every step)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array       # [B, S]
  index: jax.Array       # scalar int32


class _Weights(NamedTuple):
  params: Any            # the model's nnx.State
  layers: Any            # per-layer weight dicts ('layerwise'): given, or sliced once per call
  head: Any              # the output projection in the compute dtype ('layerwise'); or None
  rope: Any              # (cos, sin) [slots, head_dim] for positions 0..slots-1 ('layerwise')


class _Forward:
  """The model's cached forward: (weights, tokens [B, T], positions [B, T], token_valid [B, T],
  cache) -> (fp32 logits of the last position [B, V], updated cache). Two modes, same function:

  'model': `Qwen3.hidden_states` as the model is configured (scan over layers, or unrolled).
  'layerwise': the same decoder blocks (`qwen3.decoder_layer`) unrolled over per-layer weights,
  sliced once before the decode loop (`prepare`), and per-layer cache buffers, so no step
  re-slices a stacked weight or cache (slices are copies on CPU; see BENCHMARKS.md). Sliced in
  the program (GPU / TPU) they are a second copy of the layer weights for the duration of the
  call; on CPU the matmul weights come in as views of the stacked ones (`_unstacked_layers`).
  """

  def __init__(self, graphdef, mode: str):
    if mode not in ('layerwise', 'model'):
      raise ValueError(f'unknown decode mode {mode!r}')
    self.graphdef = graphdef
    self.mode = mode

  def prepare(self, params, layers=None, *, slots: int) -> _Weights:
    """slots: the cache length (every RoPE position is below it). layers: per-layer dicts of
    weights given as program inputs (`_unstacked_layers`), or None; the rest are sliced here."""
    if self.mode == 'model':
      return _Weights(params, None, None, None)
    model = nnx.merge(self.graphdef, params)
    dtype = model.compute_dtype
    stacked = model.layers.as_dict()
    given = layers or [{}] * model.config.num_layers
    layers = [{name: layer[name] if name in layer else w[i] for name, w in stacked.items()}
              for i, layer in enumerate(given)]
    # Matmul weights are cast to the compute dtype here, once per call, instead of in every
    # decode step (fp32 master weights with bf16 compute would otherwise be read at 4 bytes per
    # parameter per token). Same values: the decoder block casts them the same way; norm scales
    # are read in their own dtype there, so they stay as they are.
    layers = [{name: w if 'norm' in name else w.astype(dtype) for name, w in layer.items()}
              for layer in layers]
    # RoPE tables for every position, looked up per step: computed from the step's positions
    # instead, XLA fuses the sin / cos into each layer's consumers and evaluates them there.
    rope = qwen3.rope_tables(jnp.arange(slots), model.config.head_dim, model.config.rope_theta)
    return _Weights(params, layers, model.head_weight(), rope)

  def empty_cache(self, weights: _Weights, batch: int, slots: int):
    model = nnx.merge(self.graphdef, weights.params)
    cache = KVCache.empty(model.config, batch, slots, dtype=model.compute_dtype)
    if self.mode == 'model':
      return cache
    layers = range(model.config.num_layers)
    return _LayerCaches(tuple(cache.k[i] for i in layers), tuple(cache.v[i] for i in layers),
                        cache.valid, cache.index)

  def __call__(self, weights: _Weights, tokens, positions, token_valid, cache):
    model = nnx.merge(self.graphdef, weights.params)
    if self.mode == 'model':
      hidden, cache = model.hidden_states(tokens, positions=positions, token_valid=token_valid,
                                          cache=cache)
      return model.logits(hidden[:, -1:])[:, 0], cache
    # Mirrors the cached branch of Qwen3.hidden_states, layer by layer.
    c, dtype = model.config, model.compute_dtype
    valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
    mask = qwen3.cached_mask(valid, cache.index, tokens.shape[1])
    h = jnp.take(model.embed[...], tokens, axis=0).astype(dtype)
    cos, sin = (jnp.take(table, positions, axis=0) for table in weights.rope)
    ks, vs = [], []
    last = len(weights.layers) - 1
    for i, (p, k, v) in enumerate(zip(weights.layers, cache.k, cache.v)):
      h, (k, v) = qwen3.decoder_layer(p, h, cos, sin, mask, (k, v, None, cache.index), c, dtype,
                                      last_query_only=i == last)
      ks.append(k)
      vs.append(v)
    h = qwen3.rms_norm(h, model.final_norm[...], c.rms_norm_eps)
    cache = _LayerCaches(tuple(ks), tuple(vs), valid, cache.index + tokens.shape[1])
    return qwen3.head_logits(h, weights.head, c.tie_word_embeddings)[:, 0], cache


class _LoopState(NamedTuple):
  """One sequence batch's decode state (the step counter lives outside, shared by branches)."""
  last: jax.Array        # [B] int32, the token sampled last
  done: jax.Array        # [B] bool, row has emitted EOS (or has no prompt)
  length: jax.Array      # [B] int32, tokens generated so far (EOS included)
  tokens: jax.Array      # [B, N] int32
  logprobs: jax.Array    # [B, N] fp32
  cache: Any             # KVCache ('model' mode) or _LayerCaches ('layerwise')


class _Program:
  """The pieces of one sampling program, written for one batch; `_generate_impl` runs them
  directly or vmapped over branches, with the while_loop itself outside any vmap."""

  def __init__(self, graphdef, sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
               group_size: int = 1, decode_mode: str = 'layerwise'):
    self.forward = _Forward(graphdef, decode_mode)
    self.sampling, self.eos_ids, self.pad_id = sampling, eos_ids, pad_id
    self.group_size = group_size

  def draws(self, row_keys) -> jax.Array:
    """[B, N] uniforms in [0, 1): row b's draw for each of its tokens, from its key alone."""
    N = self.sampling.max_new_tokens
    return jax.vmap(lambda key: jax.random.uniform(key, (N,), jnp.float32))(row_keys)

  def record(self, state: _LoopState, logits, draws, step) -> _LoopState:
    """Samples token `step` from logits [B, V] into the state; draws: `draws(...)`."""
    uniforms = jax.lax.dynamic_index_in_dim(draws, step, axis=1, keepdims=False)
    token, logp = select_tokens(logits, uniforms, self.sampling)
    active = ~state.done
    token = jnp.where(active, token, self.pad_id)
    at = (0, step)
    return state._replace(
        last=token,
        done=state.done | jnp.isin(token, jnp.asarray(self.eos_ids, jnp.int32)),
        length=state.length + active,
        tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], at),
        logprobs=jax.lax.dynamic_update_slice(state.logprobs,
                                              jnp.where(active, logp, 0.0)[:, None], at))

  def start(self, weights: _Weights, prompt_tokens, prompt_valid, draws):
    """Prefill and the first token -> (state, left-packed prompt [B, P], its valid [B, P],
    prompt lengths [B], rows [B] bool whose prompt differs from their group's first row (None
    when group_size is 1))."""
    B, P = prompt_tokens.shape
    N, G = self.sampling.max_new_tokens, self.group_size
    prompt, valid = left_pack(prompt_tokens, prompt_valid, self.pad_id)
    n_prompt = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    if G == 1:
      logits, cache = self.forward(weights, prompt, qwen3.default_positions(valid), valid,
                                   self.forward.empty_cache(weights, B, P + N))
      broken = None
    else:
      lead_prompt, lead_valid = prompt[::G], valid[::G]
      logits, cache = self.forward(weights, lead_prompt, qwen3.default_positions(lead_valid),
                                   lead_valid, self.forward.empty_cache(weights, B // G, P + N))
      logits, cache = jnp.repeat(logits, G, axis=0), _repeat_cache(cache, G)
      # Compared after left-packing: rows that pack to the same prompt share it correctly.
      broken = jnp.any((prompt != jnp.repeat(lead_prompt, G, axis=0))
                       | (valid != jnp.repeat(lead_valid, G, axis=0)), axis=-1)
    state = _LoopState(jnp.zeros((B,), jnp.int32), n_prompt == 0, jnp.zeros((B,), jnp.int32),
                       jnp.full((B, N), self.pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
                       cache)
    return self.record(state, logits, draws, 0), prompt, valid, n_prompt, broken

  def advance(self, weights: _Weights, n_prompt, draws, state: _LoopState, step) -> _LoopState:
    """Feeds token step-1 (slot P + step - 1, RoPE position n_prompt + step - 1), samples token
    `step`."""
    logits, cache = self.forward(weights, state.last[:, None], (n_prompt + step - 1)[:, None],
                                 ~state.done[:, None], state.cache)
    return self.record(state._replace(cache=cache), logits, draws, step)

  @staticmethod
  def output(state: _LoopState, prompt, valid, broken=None) -> SampleOutput:
    """broken [B] bool or None: rows whose completion log-probs become NaN (see `generate`)."""
    N = state.tokens.shape[1]
    generated = jnp.arange(N)[None, :] < state.length[:, None]
    logprobs = state.logprobs
    if broken is not None:
      logprobs = jnp.where(broken[:, None] & generated, jnp.nan, logprobs)
    return SampleOutput(
        tokens=jnp.concatenate([prompt, state.tokens], axis=1),
        token_valid=jnp.concatenate([valid, generated], axis=1),
        completion_mask=jnp.concatenate([jnp.zeros_like(valid), generated], axis=1),
        logprobs=jnp.concatenate([jnp.zeros(prompt.shape, jnp.float32), logprobs], axis=1))


def _repeat_cache(cache, times: int):
  """Each batch row of a KV cache `times` times in place (row b -> rows b*times ..
  b*times+times-1): [B, ...] -> [B * times, ...] for both layouts."""
  if isinstance(cache, KVCache):   # k, v: [layers, B, ...]
    return KVCache(jnp.repeat(cache.k, times, axis=1), jnp.repeat(cache.v, times, axis=1),
                   jnp.repeat(cache.valid, times, axis=0), cache.index)
  rows = lambda xs: tuple(jnp.repeat(x, times, axis=0) for x in xs)
  return _LayerCaches(rows(cache.k), rows(cache.v), jnp.repeat(cache.valid, times, axis=0),
                      cache.index)


def row_keys(key: jax.Array, batch: int) -> jax.Array:
  """One PRNG key per row ([batch]): a row's samples depend on (key, row) only, not on how the
  rows are split over devices."""
  return jax.random.split(key, batch)


def _generate_impl(graphdef, params, layers, prompt_tokens, prompt_valid, keys,
                   sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                   group_size: int = 1, decode_mode: str = 'layerwise',
                   branched: bool = False) -> SampleOutput:
  """The whole sampling program; layers: `_unstacked_layers(params)` or None; keys: one PRNG
  key per row (`row_keys`). branched: every input has a leading branch axis [K, ...]; the
  per-batch pieces are vmapped, the while_loop is not (a vmapped while_loop with a per-branch
  predicate would `select` the whole state, KV caches included, every step) and stops when every
  row of every branch is done."""
  program = _Program(graphdef, sampling, eos_ids, pad_id, group_size, decode_mode)
  over = (lambda f, in_axes=0: jax.vmap(f, in_axes=in_axes)) if branched else (lambda f, **_: f)
  slots = prompt_tokens.shape[-1] + sampling.max_new_tokens
  weights = over(functools.partial(program.forward.prepare, slots=slots))(params, layers)
  draws = over(program.draws)(keys)
  state, prompt, valid, n_prompt, broken = over(program.start)(weights, prompt_tokens,
                                                               prompt_valid, draws)
  advance = over(program.advance, in_axes=(0, 0, 0, 0, None))

  def cond(carry):
    step, state = carry
    return (step < sampling.max_new_tokens) & ~jnp.all(state.done)

  def body(carry):
    step, state = carry
    return step + 1, advance(weights, n_prompt, draws, state, step)

  _, state = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), state))
  return over(program.output)(state, prompt, valid, broken)


_STATIC = ('graphdef', 'sampling', 'eos_ids', 'pad_id', 'group_size', 'decode_mode')
# Python calls of _generate_impl, i.e. traces; tests read it to check that shapes compile once.
TRACE_COUNT = {'generate': 0, 'generate_branches': 0}


def _counted(name: str, fn: Callable) -> Callable:
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    TRACE_COUNT[name] += 1
    return fn(*args, **kwargs)
  return wrapper


def _generate_from_key(graphdef, params, layers, prompt_tokens, prompt_valid, key, **static):
  return _generate_impl(graphdef, params, layers, prompt_tokens, prompt_valid,
                        row_keys(key, prompt_tokens.shape[0]), **static)


_generate_jit = jax.jit(_counted('generate', _generate_from_key), static_argnames=_STATIC)


def _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead: int, group_size: int):
  if prompt_tokens.ndim != lead + 2 or prompt_valid.shape != prompt_tokens.shape:
    raise ValueError(f'prompt_tokens {prompt_tokens.shape} and prompt_valid {prompt_valid.shape} '
                     f'must be equal shapes of rank {lead + 2}')
  if not eos_ids:
    raise ValueError('eos_ids must name at least one token id')
  batch = prompt_tokens.shape[lead]
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f'group_size must be a positive integer, got {group_size!r}')
  if batch % group_size:
    raise ValueError(f'group_size={group_size} does not divide the batch B={batch}')


def generate(graphdef, params, prompt_tokens, prompt_valid, key, sampling: SamplingParams,
             eos_ids: tuple[int, ...], pad_id: int = 0, group_size: int = 1) -> SampleOutput:
  """Samples up to `sampling.max_new_tokens` tokens after each prompt.

  prompt_tokens [B, P] int32, prompt_valid [B, P] bool (left padding preferred; other patterns
  are repacked); key: a PRNG key. A row stops after any token of `eos_ids`; a row without any
  valid prompt token generates nothing. Returns SampleOutput of [B, P + N] arrays.

  group_size G > 1 (must divide B) prefills each group of G adjacent rows (k*G .. k*G+G-1) once,
  from its first row, and gives every row of the group that prompt's cache; the rows then sample
  independently, so the result equals group_size=1's. The caller promises that the rows of a
  group have the same prompt (the same tokens in the same valid positions, up to the repacking
  above). Nothing extra is returned to check it, but a row that breaks the promise is not given
  a plausible completion: it is sampled after its group's first prompt and its completion
  log-probs are NaN (a cheap in-program check), so any loss built on them is non-finite.
  """
  prompt_tokens, prompt_valid = jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_valid,
                                                                                   bool)
  _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead=0, group_size=group_size)
  return _generate_jit(graphdef, params, _unstacked_layers(params, layer_axis=0), prompt_tokens,
                       prompt_valid, key, sampling=sampling,
                       eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                       group_size=group_size, decode_mode=DECODE_MODE)


def _local_branches(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys,
                    sampling, eos_ids, pad_id, group_size, decode_mode):
  """The branches held in one place. A single branch runs the plain program: a vmapped axis of
  size 1 costs XLA:CPU about 1.6x the CPU time per token (BENCHMARKS.md, "Sampler")."""
  if prompt_tokens.shape[0] == 1:
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    out = _generate_impl(graphdef, first(stacked_params), first(layers), prompt_tokens[0],
                         prompt_valid[0], keys[0], sampling, eos_ids, pad_id, group_size,
                         decode_mode)
    return jax.tree.map(lambda x: x[None], out)
  return _generate_impl(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys,
                        sampling, eos_ids, pad_id, group_size, decode_mode, branched=True)


def _branches_impl(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys,
                   sampling, eos_ids, pad_id, group_size=1, decode_mode='layerwise',
                   mesh: Mesh | None = None):
  """keys [K] -> one key per row, then the branches' programs. On a mesh, each device runs its
  own program on its own rows (shard_map over 'branch', and over 'fsdp' when it divides the
  batch B; 'tensor' stays with the compiler): with one branch per 'branch' slice no branch axis
  is left inside the program, and each device's decode loop stops when its own rows are done,
  with no collective per step (a per-step all-reduce of the stop test costs ~4% of a CPU
  sampler call; BENCHMARKS.md, "Sampler"). Group sharing then works on each device's rows,
  which `mesh_group_size` makes whole groups."""
  B = prompt_tokens.shape[1]
  keys = jax.vmap(lambda key: row_keys(key, B))(keys)
  local = functools.partial(_local_branches, graphdef, sampling=sampling, eos_ids=eos_ids,
                            pad_id=pad_id, group_size=group_size, decode_mode=decode_mode)
  if mesh is None:
    return local(stacked_params, layers, prompt_tokens, prompt_valid, keys)
  rows = P('branch', _batch_axis(mesh, B))
  return jax.shard_map(local, mesh=mesh, in_specs=(P('branch'), P('branch'), rows, rows, rows),
                       out_specs=rows, axis_names={'branch'} | set(rows) - {None},
                       check_vma=False)(stacked_params, layers, prompt_tokens, prompt_valid, keys)


def _unstacked_layers(params, layer_axis: int) -> list[dict[str, jax.Array]] | None:
  """On CPU, the decoder's per-layer matmul weights as views of `params` ([..., layers, ...] ->
  one dict per layer), for the program to read as inputs: slicing them inside it would give
  every device its own copy, while views keep replicas shared (`cpu_sharing`). None elsewhere,
  and in 'model' decode mode; the program then slices them itself."""
  if DECODE_MODE != 'layerwise':
    return None
  # The matmul weights: norm scales are small, and slicing them in the program costs nothing.
  names = [name for name in params['layers'].keys() if 'norm' not in name]
  split = cpu_sharing.unstack([params['layers'][name][...] for name in names], layer_axis)
  if split is None:
    return None
  return [dict(zip(names, layer)) for layer in zip(*split)]


def _batch_axis(mesh: Mesh, batch: int) -> str | None:
  """'fsdp' when it divides the batch (rows are then split over it), else None (replicated)."""
  return 'fsdp' if batch % mesh.shape['fsdp'] == 0 else None


@functools.lru_cache(maxsize=None)
def _branches_jit(mesh: Mesh | None) -> Callable:
  fn = _counted('generate_branches', functools.partial(_branches_impl, mesh=mesh))
  if mesh is None:
    return jax.jit(fn, static_argnames=_STATIC)
  out = NamedSharding(mesh, P('branch'))
  return jax.jit(fn, static_argnames=_STATIC, out_shardings=SampleOutput(out, out, out, out))


def mesh_group_size(mesh: Mesh, batch: int, group_size: int) -> int:
  """The group size a sampling mesh runs: prompts [K, B, P] are split over 'fsdp' when it divides
  B (else replicated), and every 'fsdp' shard must hold whole groups, so groups that would
  straddle shards are cut to the largest divisor of group_size that fits a shard (rows of a
  group of G identical rows form groups of any divisor of G). Decode stays data parallel;
  only the prefill sharing shrinks."""
  if _batch_axis(mesh, batch) is None:
    return group_size
  shard = batch // mesh.shape['fsdp']
  return max(g for g in range(1, group_size + 1) if group_size % g == 0 and shard % g == 0)


class PlacedWeights(NamedTuple):
  """Branch-stacked params as `generate_branches` reads them (`place_weights`): sampling several
  times from the same weights places them once."""
  params: Any            # nnx.State, every leaf [K, ...], on the mesh by SAMPLING_RULES
  layers: Any            # `_unstacked_layers(params)`: per-layer views on CPU, else None
  mesh: Mesh | None


def place_weights(stacked_params, mesh: Mesh | None = None) -> PlacedWeights:
  """stacked_params (every leaf [K, ...]) placed for `generate_branches` on `mesh`: stacked on
  'branch', replicated over 'fsdp' (on CPU as one buffer per shard, `cpu_sharing`); ~3 ms for
  the benchmark's tiny model on 2 CPU devices."""
  if isinstance(stacked_params, PlacedWeights):
    if stacked_params.mesh != mesh:
      raise ValueError('PlacedWeights were placed for another mesh than the one given')
    return stacked_params
  if mesh is not None:
    stacked_params = cpu_sharing.put(stacked_params, mesh_lib.state_shardings(
        stacked_params, mesh, SAMPLING_RULES, branch_stacked=True))
  return PlacedWeights(stacked_params, _unstacked_layers(stacked_params, layer_axis=1), mesh)


def generate_branches(graphdef, stacked_params, prompt_tokens, prompt_valid, keys,
                      sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int = 0,
                      mesh: Mesh | None = None, group_size: int = 1) -> SampleOutput:
  """`generate` for K branches at once, one compiled program vmapped over the leading axis.

  stacked_params: params with every leaf [K, ...], or `place_weights(params, mesh)` of them
  (the same result, without placing them again); prompt_tokens, prompt_valid [K, B, P];
  keys [K] PRNG keys. With a ('branch', 'fsdp', 'tensor') mesh, branch k runs on its slice of
  the 'branch' axis: parameters are placed by SAMPLING_RULES (stacked on 'branch', replicated
  over 'fsdp'), prompts are split over 'branch' and, when it divides the batch, over 'fsdp'.
  group_size: as in `generate`, per branch (must divide B; the same promise); on a mesh, cut to
  whole groups per 'fsdp' shard (`mesh_group_size`).
  Returns [K, B, P + N], sharded over 'branch'.
  """
  # Host arrays stay numpy until placed (one transfer); global arrays (multi-process) stay jax.
  as_array = lambda x, dtype: jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(
      x, dtype)
  prompt_tokens, prompt_valid = as_array(prompt_tokens, jnp.int32), as_array(prompt_valid, bool)
  _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead=1, group_size=group_size)
  K, B = prompt_tokens.shape[:2]
  if mesh is not None:
    if K % mesh.shape['branch']:
      raise mesh_lib.MeshConfigError(f'mesh axis branch={mesh.shape["branch"]} does not divide '
                                     f'the number of branches K={K}')
    prompt_sharding = NamedSharding(mesh, P('branch', _batch_axis(mesh, B), None))
    group_size = mesh_group_size(mesh, B, group_size)
    prompt_tokens = jax.device_put(prompt_tokens, prompt_sharding)
    prompt_valid = jax.device_put(prompt_valid, prompt_sharding)
    keys = jax.device_put(keys, mesh_lib.branch_sharded(mesh, keys.ndim))
  weights = place_weights(stacked_params, mesh)
  return _branches_jit(mesh)(graphdef, weights.params, weights.layers, prompt_tokens,
                             prompt_valid, keys, sampling=sampling,
                             eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                             group_size=group_size, decode_mode=DECODE_MODE)


# ---------------------------------------------------------------------------------------------
# Host side: decoding completions and stop strings
# ---------------------------------------------------------------------------------------------

def completion_token_lists(output: SampleOutput) -> list[list[int]]:
  """The generated token ids of each row (EOS included), as Python lists. Works on [B, T]."""
  tokens, mask = np.asarray(output.tokens), np.asarray(output.completion_mask)
  return [row[m].tolist() for row, m in zip(tokens, mask)]


def apply_stop_strings(output: SampleOutput, decode: Callable[[list[int]], str],
                       stop_strings: Sequence[str], pad_id: int = 0
                       ) -> tuple[list[str], SampleOutput]:
  """Cuts each completion after the first token that completes any of `stop_strings`.

  decode maps token ids to text (e.g. `tokenizer.decode`). Returns the decoded completions,
  truncated before the stop string, and a numpy SampleOutput whose masks, tokens and log-probs
  end at that token (the stop string stays in the masked completion, like EOS). [B, T] only.
  """
  tokens = np.array(output.tokens)
  token_valid = np.array(output.token_valid)
  completion = np.array(output.completion_mask)
  logprobs = np.array(output.logprobs)
  texts = []
  for row in range(tokens.shape[0]):
    cols = np.flatnonzero(completion[row])
    ids = tokens[row, cols].tolist()
    text = decode(ids)
    hits = [(text.find(s), s) for s in stop_strings if s and s in text]
    if not hits:
      texts.append(text)
      continue
    start, stop = min(hits)
    end = start + len(stop)
    # Fewest tokens whose decoded text reaches the end of the stop string (binary search:
    # decoded length grows with the prefix).
    lo, hi = 1, len(ids)
    while lo < hi:
      mid = (lo + hi) // 2
      if len(decode(ids[:mid])) >= end:
        hi = mid
      else:
        lo = mid + 1
    cut = cols[lo:]
    tokens[row, cut] = pad_id
    token_valid[row, cut] = False
    completion[row, cut] = False
    logprobs[row, cut] = 0.0
    texts.append(text[:start])
  return texts, SampleOutput(tokens, token_valid, completion, logprobs)
