"""Continuous-batching rollout engine: a fixed number of decode slots over a slot-wise KV cache,
rows admitted into free slots as other rows finish, all inside one jitted program.

Why: a static batch (`decode.py`) decodes every row until the longest one ends, so with
reasoning-length completions (10x spread and more) most of its row-steps are padding. Here the
cache holds `slots` rows (sized from a token budget, `slot_count`), and the loop body first
admits waiting rows into free slots (prefill, then their first token), then runs one decode
step over every slot. A row leaves its slot at EOS or at `max_new_tokens`.

Admission: the groups of G rows sharing one prompt (`prompt_groups`; G = 1 for one sample per
prompt) are taken in `order` (default 0, 1, ...; the tests permute it). One admission prefills
several prompts at once, as many as the free slots hold, up to `prefill_prompts`; the program
holds one prefill per size in `admission_sizes` (powers of two up to that most), so its shapes
stay static and a slot freed alone costs a one-prompt prefill. Each prompt is prefilled once,
from its group's first row, into a staging cache, and copied into its G rows' slots. Prefill
chunks (`prefill_chunk` < P): the admission's prompts are prefilled `chunk` columns per call,
one call per decode step of the running rows, so a long prompt neither stalls them nor needs
more than one chunk's activations; chunks that hold only left padding are skipped. Without
chunks every admission the free slots hold runs before the next decode step.

Same samples as the static decoder: row b draws from `row_keys(key, B)[b]` and its token t uses
that key's uniform t (`_Program.draws`), whatever slot it lands in, whenever it is admitted and
with whichever prompts it is prefilled; a slot's cache row has the static decoder's layout
(prompt left-packed in columns 0..P-1, completion token t at column P + t), the same length
P + N, and the decode step masks the same keys, so each row computes what it would compute in
a static batch: the same tokens, and log-probs equal up to float rounding (a prefill of other
shapes than the batch's, fewer prompts or one chunk, rounds the last float32 bits differently,
as group sharing does: ~1e-6; a training run fed by either decoder therefore drifts apart over
its steps by float noise). Stale keys of a slot's or the staging cache's earlier row stay
masked (their attention weight is exactly 0).

Shapes are static (slots, cache length P + N, the admission sizes, the chunk), so the program
compiles once per (prompt bucket, batch, slots). Teacher scoring is not sampling and stays a
teacher-forced prefill (`copd_jax.scoring`). Text prompts only (a Qwen3-VL prompt's pictures
go through `decode.generate`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax.errors import ConfigError, UserInputError
from copd_jax.fields import Fields, named_by_config
from copd_jax.models import qwen3
from copd_jax.models.attention import Mask
from copd_jax.prompt_groups import repeat_cache, rows_off_group
from copd_jax.sampling.decode import (SampleOutput, _LoopState, _Program, _check_inputs,
                                      left_pack)
from copd_jax.sampling.forward import Forward, LayerCaches, Weights
from copd_jax.sampling.placement import (batch_axis, mesh_group_size, place_prompts,
                                         place_weights)
from copd_jax.sampling.token_selection import (SamplingFieldError, SamplingParams, force_eos,
                                               row_keys, select_tokens)
from copd_jax.tracing import TRACE_COUNTS

DECODERS = ('engine', 'static')


@dataclasses.dataclass(frozen=True)
class EngineSettings:
  """kv_token_budget: KV-cache tokens per branch and device shard; the engine holds
  budget // (P + N) rows at a time (`slot_count`). 0: one slot per row (the static decoder's
  cache size). prefill_prompts: the most prompts (groups) one admission prefills together when
  several groups' slots are free (1: one group at a time). prefill_chunk: prompt tokens per
  prefill call (a power of two; 0: the whole prompt at once); a longer prompt is prefilled
  chunk by chunk, one chunk per decode step of the other slots."""
  kv_token_budget: int = 0
  prefill_prompts: int = 8
  prefill_chunk: int = 0

  def __post_init__(self):
    fields = Fields('EngineSettings', SamplingFieldError)
    fields.positive_int('kv_token_budget', self.kv_token_budget, allow_zero=True)
    fields.positive_int('prefill_prompts', self.prefill_prompts)
    fields.positive_int('prefill_chunk', self.prefill_chunk, allow_zero=True)
    # A power of two divides every longer prompt bucket (rollouts.PROMPT_BUCKETS).
    fields.check(self.prefill_chunk & (self.prefill_chunk - 1) == 0, 'prefill_chunk',
                 f'must be 0 or a power of two, got {self.prefill_chunk!r}')

  @classmethod
  def from_config(cls, config) -> 'EngineSettings | None':
    """config.sampling.decoder 'engine' -> the settings; 'static' -> None (the static decoder)."""
    s = config.sampling
    if s.decoder not in DECODERS:
      raise ConfigError(f'config.sampling.decoder must be one of {DECODERS}, got {s.decoder!r}')
    names = {name: f'sampling.{name}'
             for name in ('kv_token_budget', 'prefill_prompts', 'prefill_chunk')}
    with named_by_config(names):
      settings = cls(kv_token_budget=s.kv_token_budget, prefill_prompts=s.prefill_prompts,
                     prefill_chunk=s.prefill_chunk)
    return settings if s.decoder == 'engine' else None


def slot_count(token_budget: int, cache_length: int, rows: int, group_size: int) -> int:
  """Decode slots for a token budget: budget // cache_length rows (0 budget: all `rows`), at
  most `rows`, a multiple of group_size. Raises UserInputError when not even one group fits."""
  slots = rows if token_budget == 0 else min(rows, token_budget // cache_length)
  slots -= slots % group_size
  if slots < 1:
    raise UserInputError(f'sampling.kv_token_budget={token_budget} holds fewer than one group '
                         f'of {group_size} rows of {cache_length} tokens (prompt + '
                         f'max_new_tokens); raise it to at least {group_size * cache_length}')
  return slots


def admission_sizes(prefill_prompts: int, slots: int, group_size: int) -> tuple[int, ...]:
  """The prompt counts one admission may prefill: the powers of two up to the most that fit
  (prefill_prompts, and the groups the slots hold) and that most itself. One prefill program
  per size keeps the program's shapes static; an admission takes the largest size that fits
  its free slots, so a slot freed alone costs a one-prompt prefill."""
  most = max(1, min(prefill_prompts, slots // group_size))
  return tuple(sorted({2 ** i for i in range(most.bit_length()) if 2 ** i <= most} | {most}))


def chunk_length(prefill_chunk: int, prompt_length: int) -> int:
  """Prompt columns per prefill call: the whole prompt when prefill_chunk is 0 or not shorter;
  raises ValueError when a shorter chunk does not divide it."""
  if prefill_chunk == 0 or prefill_chunk >= prompt_length:
    return prompt_length
  if prompt_length % prefill_chunk:
    raise ValueError(f'prefill_chunk {prefill_chunk} must divide the prompt length '
                     f'{prompt_length}')
  return prefill_chunk


class _Slots(NamedTuple):
  row: jax.Array         # [S] int32: the row a slot decodes, -1 when free
  length: jax.Array      # [S] int32: tokens its row has generated (the next token's index)
  last: jax.Array        # [S] int32: the token its row sampled last
  n_prompt: jax.Array    # [S] int32: its row's prompt length
  cache: LayerCaches     # k, v per layer [S, ...] over P + N columns; valid [S, P + N]


class _Admission(NamedTuple):
  """The admission in progress: `count` groups (0: none) whose lead prompts are prefilled
  chunk by chunk into a staging cache, then copied into their groups' slots."""
  groups: jax.Array      # [A] int32: the groups admitted (the first `count`)
  count: jax.Array       # scalar int32
  size: jax.Array        # scalar int32: index of count in the admission sizes
  chunk: jax.Array       # scalar int32: the next chunk to prefill
  cache: LayerCaches     # [A, ...] over P + N columns, as the slots'


class _State(NamedTuple):
  slots: _Slots
  admission: _Admission
  tokens: jax.Array      # [B, N] int32, by row
  logprobs: jax.Array    # [B, N] fp32
  length: jax.Array      # [B] int32
  admitted: jax.Array    # scalar int32: groups admitted so far (in progress included)


def slot_forward(forward: Forward, weights: Weights, tokens, positions, token_valid,
                 cache: LayerCaches, column):
  """One decode step of every slot, each at its own cache column: tokens, positions,
  token_valid [S, 1], column [S] -> (logits [S, V], cache). The 'layerwise' forward
  (`Forward.__call__`) with a per-slot write column."""
  model = nnx.merge(forward.graphdef, weights.params)
  c, dtype = model.config, model.compute_dtype
  S, C = cache.valid.shape
  valid = cache.valid.at[jnp.arange(S), column].set(token_valid[:, 0])
  # Every slot's unwritten columns are invalid, so the causal bound is the cache's end.
  mask = Mask(valid, jnp.full((1,), C - 1, jnp.int32))
  h = jnp.take(model.embed[...], tokens, axis=0).astype(dtype)
  cos, sin = (jnp.take(table, positions, axis=0) for table in weights.rope)
  ks, vs = [], []
  for p, k, v in zip(weights.layers, cache.k, cache.v):
    h, (k, v) = qwen3.decoder_layer(p, h, cos, sin, mask, (k, v, None, column), c, dtype,
                                    attention=model.attention)
    ks.append(k)
    vs.append(v)
  h = qwen3.rms_norm(h, model.final_norm[...], c.rms_norm_eps)
  logits = qwen3.head_logits(h, weights.head, c.tie_word_embeddings)[:, 0]
  return logits, LayerCaches(tuple(ks), tuple(vs), valid, cache.index)


def _map_cache(f, *caches: LayerCaches) -> LayerCaches:
  """f applied to the k, v and valid buffers of caches alike (the index of the first kept)."""
  return LayerCaches(tuple(map(f, *(c.k for c in caches))), tuple(map(f, *(c.v for c in caches))),
                     f(*(c.valid for c in caches)), caches[0].index)


def _engine_program(graphdef, params, layers, prompt_tokens, prompt_valid, keys, eos_at, order,
                    *, sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                    group_size: int, slots: int, sizes: tuple[int, ...],
                    chunk: int) -> SampleOutput:
  """One branch: prompts [B, P], keys [B] (one per row), eos_at [B] or None, order [B // G]
  (admission order of the groups) -> SampleOutput [B, P + N]. sizes: `admission_sizes`;
  chunk: `chunk_length`."""
  B, P = prompt_tokens.shape
  N, G, S, A = sampling.max_new_tokens, group_size, slots, sizes[-1]
  chunks = P // chunk
  forward = Forward(graphdef, 'layerwise')
  weights = forward.prepare(params, layers, slots=P + N)
  program = _Program(graphdef, sampling, eos_ids, pad_id, G)
  draws = program.draws(keys)
  prompt, valid = left_pack(prompt_tokens, prompt_valid, pad_id)
  positions = qwen3.default_positions(valid)
  n_prompt = jnp.sum(valid, axis=-1, dtype=jnp.int32)
  eos = jnp.asarray(eos_ids, jnp.int32)
  groups = B // G
  # Padded so that a slice of A groups from any admission point stays in bounds.
  order = jnp.concatenate([order, jnp.zeros((A,), jnp.int32)])

  def sample(logits, rows, index):
    """Token `index` of `rows` ([n] each) from logits [n, V], on the rows' own draws."""
    forced = None if eos_at is None else eos_at[rows]
    logits = force_eos(logits, index, forced, eos_ids)
    return select_tokens(logits, draws[rows, index], sampling)

  def begin(state: _State) -> _State:
    """Takes the next groups in `order`: the largest admission size their free slots hold.
    Prefill starts at the first chunk holding any of their prompts' tokens (prompts are
    left-padded, so the chunks before hold padding only, whose keys are masked anyway)."""
    fit = jnp.minimum(jnp.sum(state.slots.row < 0) // G, groups - state.admitted)
    size = jnp.sum(jnp.asarray(sizes) <= fit) - 1
    count = jnp.asarray(sizes)[size]
    taken = jax.lax.dynamic_slice_in_dim(order, state.admitted, A)
    lead_prompt = jnp.where(jnp.arange(A) < count, n_prompt[taken * G], 0)
    first = jnp.minimum((P - jnp.max(lead_prompt)) // chunk, chunks - 1)
    # Stale keys of the previous admission must not be seen: nothing valid yet.
    cache = state.admission.cache._replace(valid=jnp.zeros_like(state.admission.cache.valid))
    return state._replace(admission=_Admission(taken, count, size, first, cache),
                          admitted=state.admitted + count)

  def prefill_chunk(count: int, state: _State) -> _State:
    """One chunk of the admission's `count` lead prompts; after the last, `place`."""
    adm = state.admission
    lead = adm.groups[:count] * G
    start = adm.chunk * chunk
    cut = lambda x: jax.lax.dynamic_slice_in_dim(x[lead], start, chunk, axis=1)
    staging = _map_cache(lambda x: x[:count], adm.cache)._replace(index=start)
    logits, staging = forward(weights, cut(prompt), cut(positions), cut(valid), staging)
    cache = _map_cache(lambda full, part: full.at[:count].set(part), adm.cache, staging)
    state = state._replace(admission=adm._replace(chunk=adm.chunk + 1, cache=cache))
    if chunks == 1:
      return place(count, state, logits, staging)
    return jax.lax.cond(adm.chunk == chunks - 1,
                        lambda st: place(count, st, logits, staging), lambda st: st, state)

  def place(count: int, state: _State, logits, staging: LayerCaches) -> _State:
    """The admitted groups' rows (count x G) into the first free slots, each with its lead
    prompt's cache, and each row's first token sampled."""
    rows = (state.admission.groups[:count, None] * G + jnp.arange(G, dtype=jnp.int32)).reshape(-1)
    logits, cache = jnp.repeat(logits, G, axis=0), repeat_cache(staging, G)
    free = jnp.argsort(state.slots.row >= 0, stable=True)[:count * G]
    token, logp = sample(logits, rows, jnp.zeros((count * G,), jnp.int32))
    empty = n_prompt[rows] == 0       # a row without a prompt generates nothing
    token, logp = jnp.where(empty, pad_id, token), jnp.where(empty, 0.0, logp)
    finished = empty | jnp.isin(token, eos) | (N == 1)
    s = state.slots
    put = lambda buffer, new: buffer.at[free].set(new)
    return _State(
        _Slots(put(s.row, jnp.where(finished, -1, rows)), put(s.length, jnp.ones_like(rows)),
               put(s.last, token), put(s.n_prompt, n_prompt[rows]),
               _map_cache(put, s.cache, cache)),
        state.admission._replace(count=jnp.zeros((), jnp.int32)),
        state.tokens.at[rows, 0].set(token), state.logprobs.at[rows, 0].set(logp),
        state.length.at[rows].set((~empty).astype(jnp.int32)), state.admitted)

  def admission_work(state: _State) -> _State:
    """One prefill chunk, beginning an admission first when none is in progress."""
    state = jax.lax.cond(state.admission.count == 0, begin, lambda st: st, state)
    return jax.lax.switch(state.admission.size,
                          [functools.partial(prefill_chunk, count) for count in sizes], state)

  def decode(state: _State) -> _State:
    """Feeds every busy slot its last token and samples its row's next one."""
    s = state.slots
    busy = s.row >= 0
    t = s.length
    # Free slots run too (static shapes); their position is clamped to a valid RoPE row.
    position = jnp.maximum(s.n_prompt + t - 1, 0)
    logits, cache = slot_forward(forward, weights, s.last[:, None], position[:, None],
                                 busy[:, None], s.cache, P + jnp.maximum(t, 1) - 1)
    rows, index = jnp.where(busy, s.row, 0), jnp.minimum(t, N - 1)
    token, logp = sample(logits, rows, index)
    target = jnp.where(busy, s.row, B)   # free slots write nowhere ('drop')
    finished = jnp.isin(token, eos) | (t + 1 >= N)
    slots_ = _Slots(jnp.where(busy & finished, -1, s.row), jnp.where(busy, t + 1, t),
                    jnp.where(busy, token, s.last), s.n_prompt, cache)
    return state._replace(slots=slots_,
                          tokens=state.tokens.at[target, index].set(token, mode='drop'),
                          logprobs=state.logprobs.at[target, index].set(logp, mode='drop'),
                          length=state.length.at[target].set(t + 1, mode='drop'))

  def has_admission_work(state: _State):
    can_begin = (state.admitted < groups) & (jnp.sum(state.slots.row < 0) >= G)
    return (state.admission.count > 0) | can_begin

  def body(state: _State) -> _State:
    if chunks == 1:   # every admission the free slots hold, then one decode step
      state = jax.lax.while_loop(has_admission_work, admission_work, state)
    else:   # one prefill chunk per decode step: a long prompt does not stall the running rows
      state = jax.lax.cond(has_admission_work(state), admission_work, lambda st: st, state)
    return jax.lax.cond(jnp.any(state.slots.row >= 0), decode, lambda x: x, state)

  def cond(state: _State):
    return ((state.admitted < groups) | (state.admission.count > 0)
            | jnp.any(state.slots.row >= 0))

  empty_slots = _Slots(jnp.full((S,), -1, jnp.int32), jnp.zeros((S,), jnp.int32),
                       jnp.zeros((S,), jnp.int32), jnp.zeros((S,), jnp.int32),
                       forward.empty_cache(weights, S, P + N))
  zero = jnp.zeros((), jnp.int32)
  no_admission = _Admission(jnp.zeros((A,), jnp.int32), zero, zero, zero,
                            forward.empty_cache(weights, A, P + N))
  state = _State(empty_slots, no_admission, jnp.full((B, N), pad_id, jnp.int32),
                 jnp.zeros((B, N), jnp.float32), jnp.zeros((B,), jnp.int32), zero)
  state = jax.lax.while_loop(cond, body, state)
  broken = None if G == 1 else rows_off_group(prompt, G) | rows_off_group(valid, G)
  rows_state = _LoopState(None, None, state.length, state.tokens, state.logprobs, None)
  return _Program.output(rows_state, prompt, valid, broken)


_STATIC = ('graphdef', 'sampling', 'eos_ids', 'pad_id', 'group_size', 'slots', 'sizes', 'chunk')


def _local_branches(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys, eos_at,
                    order, **static) -> SampleOutput:
  """The branches held in one place, one engine loop after the other (a vmapped loop would
  run every branch until the slowest one ends, the waste this engine removes)."""
  outs = []
  for k in range(prompt_tokens.shape[0]):
    pick = lambda tree: jax.tree.map(lambda x: x[k], tree)
    outs.append(_engine_program(graphdef, pick(stacked_params), pick(layers), prompt_tokens[k],
                                prompt_valid[k], keys[k], pick(eos_at), order, **static))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def _branches_impl(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys, eos_at,
                   order, *, mesh: Mesh | None, **static) -> SampleOutput:
  """keys [K] -> one key per row (of the whole batch, as `decode` derives them), then each
  device's engine on its own rows."""
  TRACE_COUNTS['engine_branches'] += 1
  B = prompt_tokens.shape[1]
  keys = jax.vmap(lambda key: row_keys(key, B))(keys)
  local = functools.partial(_local_branches, graphdef, **static)
  if mesh is None:
    return local(stacked_params, layers, prompt_tokens, prompt_valid, keys, eos_at, order)
  rows = P('branch', batch_axis(mesh, B))
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P('branch'), P('branch'), rows, rows, rows,
                                 None if eos_at is None else rows, P()),
                       out_specs=rows, axis_names={'branch'} | set(rows) - {None},
                       check_vma=False)(stacked_params, layers, prompt_tokens, prompt_valid, keys,
                                        eos_at, order)


@functools.lru_cache(maxsize=None)
def _branches_jit(mesh: Mesh | None):
  fn = functools.partial(_branches_impl, mesh=mesh)
  if mesh is None:
    return jax.jit(fn, static_argnames=_STATIC)
  out = NamedSharding(mesh, P('branch'))
  return jax.jit(fn, static_argnames=_STATIC, out_shardings=SampleOutput(out, out, out, out))


def engine_generate_branches(graphdef, stacked_params, prompt_tokens, prompt_valid, keys,
                             sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int = 0,
                             mesh: Mesh | None = None, group_size: int = 1,
                             settings: EngineSettings = EngineSettings(), order=None,
                             eos_at=None) -> SampleOutput:
  """`decode.generate_branches` through the engine: the same arguments and the same result
  (same tokens, masks and log-probs per row), [K, B, P + N].

  settings: the KV-cache token budget (per branch and device shard; `slot_count`), the most
  prompts one admission prefills (`admission_sizes`) and the prefill chunk (`chunk_length`:
  a shorter chunk must divide the prompt length P). order:
  the admission order of each device's groups (a permutation of 0 .. B_local / G - 1, default
  in order); it changes no result. eos_at [K, B] or None: forced completion lengths
  (`token_selection.force_eos`). Only the 'layerwise' forward (per-slot cache writes)."""
  as_array = lambda x, dtype: jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(
      x, dtype)
  prompt_tokens, prompt_valid = as_array(prompt_tokens, jnp.int32), as_array(prompt_valid, bool)
  _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead=1, group_size=group_size)
  K, B, prompt_len = prompt_tokens.shape
  local_rows = B
  if mesh is not None:
    group_size = mesh_group_size(mesh, B, group_size)
    if batch_axis(mesh, B) is not None:
      local_rows = B // mesh.shape['fsdp']
    prompt_tokens, prompt_valid, keys = place_prompts(mesh, prompt_tokens, prompt_valid, keys)
  slots = slot_count(settings.kv_token_budget, prompt_len + sampling.max_new_tokens,
                     local_rows, group_size)
  order = np.arange(local_rows // group_size, dtype=np.int32) if order is None else np.asarray(
      order, np.int32)
  if sorted(order.tolist()) != list(range(local_rows // group_size)):
    raise ValueError(f'order must be a permutation of the {local_rows // group_size} groups')
  if eos_at is not None:
    eos_at = np.asarray(eos_at, np.int32)
    if mesh is not None:
      eos_at = jax.device_put(eos_at, NamedSharding(mesh, P('branch', batch_axis(mesh, B))))
  weights = place_weights(stacked_params, mesh)
  return _branches_jit(mesh)(graphdef, weights.params, weights.layers, prompt_tokens,
                             prompt_valid, keys, eos_at, order, sampling=sampling,
                             eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                             group_size=group_size, slots=slots,
                             sizes=admission_sizes(settings.prefill_prompts, slots, group_size),
                             chunk=chunk_length(settings.prefill_chunk, prompt_len))


def engine_generate(graphdef, params, prompt_tokens, prompt_valid, key, sampling: SamplingParams,
                    eos_ids: tuple[int, ...], pad_id: int = 0, group_size: int = 1,
                    settings: EngineSettings = EngineSettings(), order=None,
                    eos_at=None) -> SampleOutput:
  """`decode.generate` (one model, [B, P] prompts, one key) through the engine: [B, P + N]."""
  stacked = jax.tree.map(lambda x: x[None], params)
  out = engine_generate_branches(graphdef, stacked, np.asarray(prompt_tokens)[None],
                                 np.asarray(prompt_valid)[None], key[None], sampling, eos_ids,
                                 pad_id, None, group_size, settings, order,
                                 None if eos_at is None else np.asarray(eos_at)[None])
  return SampleOutput(*(x[0] for x in out))
