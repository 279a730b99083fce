"""The sampling program: prefill, then a `lax.while_loop` of one-token decode steps over a
preallocated KV cache, all inside one jitted program; `generate` runs it on one model,
`generate_branches` on K branch-stacked models at once (on a mesh: each device its own rows).

Layout of every [B, P + N] output (P prompt slots, N = max_new_tokens): the prompt's real tokens
are packed to the right of the first P columns (left padding; any other padding pattern of the
input is repacked inside the program), the completion starts at column P. Position t refers to
token t, the convention of `copd_jax.scoring.sequence_logprobs`, so a trainer scores the same
arrays teacher-forced.

Compiled programs are cached by jax.jit per (graphdef, shapes, SamplingParams, eos_ids, pad_id,
group_size, decode_mode); pad prompts to a bucket (`rollouts.pad_prompts`) so a run compiles a
bounded number of times. The KV cache and the output buffers are allocated inside the program
and updated in place by the while loop (dynamic_update_slice on loop-carried buffers), so no
step copies them and nothing needs donating across the program boundary; parameters are only
read. Every random number is drawn before the loop (`token_selection.select_tokens`).

Group sharing (group_size G > 1, for GRPO-style batches whose rows k*G .. k*G+G-1 repeat one
prompt, `prompt_groups`): the prefill runs on the first row of each group only, and its
last-position logits and KV cache are repeated to the group's G rows, which then sample on
their own key streams.

Qwen3-VL (`generate` with images / videos): the same program with the VL model plugged into
`Forward`. The vision tower runs in the prefill, once per call, on the pictures of the distinct
prompts (one per group); decode steps are text steps whose RoPE positions continue from each
prompt's largest M-RoPE position (`rope_deltas`, as transformers' generate).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax.models import qwen3
from copd_jax.prompt_groups import check_group_size, repeat_cache, rows_off_group
from copd_jax.sampling.forward import Forward, VisionPrefill, Weights, vision_prefill
from copd_jax.sampling.placement import (batch_axis, mesh_group_size, place_prompts,
                                         place_weights, unstacked_layers)
from copd_jax.sampling.token_selection import (SamplingParams, force_eos, row_keys,
                                               select_tokens)
from copd_jax.tracing import TRACE_COUNTS
from copd_jax.vision_batch import VisionBatch


class SampleOutput(NamedTuple):
  """All [B, P + N] (or [K, B, P + N] from `generate_branches`)."""
  tokens: jax.Array           # int32: left-padded prompt, then completion; pad after EOS / end
  token_valid: jax.Array      # bool: real prompt tokens and generated tokens (EOS included)
  completion_mask: jax.Array  # bool: generated tokens only (EOS included)
  logprobs: jax.Array         # fp32: log-prob of each generated token under the distribution it
                              # was sampled from (after temperature / top-k / top-p); 0 elsewhere


def pack_order(valid: jax.Array) -> jax.Array:
  """[B, P] -> [B, P] column indices that move each row's real tokens (in order) to the right."""
  return jnp.argsort(valid.astype(jnp.int32), axis=-1, stable=True)


def left_pack(tokens: jax.Array, valid: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Moves each row's real tokens (in order) to the right end: [B, P] -> [B, P]."""
  order = pack_order(valid)
  valid = jnp.take_along_axis(valid, order, axis=-1)
  tokens = jnp.take_along_axis(tokens, order, axis=-1)
  return jnp.where(valid, tokens, pad_id).astype(jnp.int32), valid


class _LoopState(NamedTuple):
  """One sequence batch's decode state (the step counter lives outside, shared by branches)."""
  last: jax.Array        # [B] int32, the token sampled last
  done: jax.Array        # [B] bool, row has emitted EOS (or has no prompt)
  length: jax.Array      # [B] int32, tokens generated so far (EOS included)
  tokens: jax.Array      # [B, N] int32
  logprobs: jax.Array    # [B, N] fp32
  cache: Any             # KVCache ('model' mode) or LayerCaches ('layerwise')


class _Program:
  """The pieces of one sampling program, written for one batch; `_generate_impl` runs them
  directly or vmapped over branches, with the while_loop itself outside any vmap."""

  def __init__(self, graphdef, sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
               group_size: int = 1, decode_mode: str = 'layerwise'):
    self.forward = Forward(graphdef, decode_mode)
    self.sampling, self.eos_ids, self.pad_id = sampling, eos_ids, pad_id
    self.group_size = group_size

  def draws(self, row_keys) -> jax.Array:
    """[B, N] uniforms in [0, 1): row b's draw for each of its tokens, from its key alone."""
    N = self.sampling.max_new_tokens
    return jax.vmap(lambda key: jax.random.uniform(key, (N,), jnp.float32))(row_keys)

  def record(self, state: _LoopState, logits, draws, step, eos_at=None) -> _LoopState:
    """Samples token `step` from logits [B, V] into the state; draws: `draws(...)`; eos_at:
    [B] forced completion lengths or None (`token_selection.force_eos`)."""
    uniforms = jax.lax.dynamic_index_in_dim(draws, step, axis=1, keepdims=False)
    logits = force_eos(logits, step, eos_at, self.eos_ids)
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

  def start(self, weights: Weights, prompt_tokens, prompt_valid, draws, eos_at=None,
            vision: VisionPrefill | None = None):
    """Prefill and the first token -> (state, left-packed prompt [B, P], its valid [B, P],
    RoPE position [B] of the first generated token, rows [B] bool whose prompt differs from
    their group's first row (None when group_size is 1)). vision: a Qwen3-VL prompt's pictures
    and M-RoPE positions, of the B / group_size distinct prompts."""
    B, P = prompt_tokens.shape
    N, G = self.sampling.max_new_tokens, self.group_size
    prompt, valid = left_pack(prompt_tokens, prompt_valid, self.pad_id)
    n_prompt = jnp.sum(valid, axis=-1, dtype=jnp.int32)
    rope_start = n_prompt
    if isinstance(vision, VisionBatch):   # per-row pictures as data (the branched sampler)
      vision, rope_start = packed_prefill(vision, prompt_valid, G)
    elif vision is not None:   # M-RoPE positions packed like the tokens; decode continues after
      lead_order = pack_order(prompt_valid[::G])
      vision = vision._replace(positions=jnp.take_along_axis(vision.positions,
                                                             lead_order[None], axis=-1))
      rope_start = n_prompt + jnp.repeat(vision.deltas, G)
    if G == 1:
      positions = qwen3.default_positions(valid) if vision is None else vision.positions
      logits, cache = self.forward(weights, prompt, positions, valid,
                                   self.forward.empty_cache(weights, B, P + N), vision)
      broken = None
    else:
      lead_prompt, lead_valid = prompt[::G], valid[::G]
      positions = qwen3.default_positions(lead_valid) if vision is None else vision.positions
      logits, cache = self.forward(weights, lead_prompt, positions, lead_valid,
                                   self.forward.empty_cache(weights, B // G, P + N), vision)
      logits, cache = jnp.repeat(logits, G, axis=0), repeat_cache(cache, G)
      # Compared after left-packing: rows that pack to the same prompt share it correctly.
      broken = rows_off_group(prompt, G) | rows_off_group(valid, G)
    state = _LoopState(jnp.zeros((B,), jnp.int32), n_prompt == 0, jnp.zeros((B,), jnp.int32),
                       jnp.full((B, N), self.pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
                       cache)
    return self.record(state, logits, draws, 0, eos_at), prompt, valid, rope_start, broken

  def advance(self, weights: Weights, rope_start, draws, state: _LoopState, step,
              eos_at=None) -> _LoopState:
    """Feeds token step-1 (slot P + step - 1, RoPE position rope_start + step - 1), samples
    token `step`."""
    logits, cache = self.forward(weights, state.last[:, None], (rope_start + step - 1)[:, None],
                                 ~state.done[:, None], state.cache)
    return self.record(state._replace(cache=cache), logits, draws, step, eos_at)

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


def packed_prefill(vision: VisionBatch, prompt_valid, group_size: int):
  """(VisionPrefill of the group leaders, RoPE position [B] of every row's first generated
  token) from a `vision_batch.VisionBatch` of rows [B] over the prompt's P columns and the
  completion's (positions [B, 3, P + N]): the prompt's slots and positions packed like the
  tokens (`left_pack`), the first completion column's position as the decode's start."""
  P = prompt_valid.shape[-1]
  order = pack_order(prompt_valid)
  positions = jnp.take_along_axis(vision.positions[..., :P], order[:, None], axis=-1)
  slots = jnp.take_along_axis(vision.visual_slot[:, :P], order, axis=-1)
  lead = slice(None, None, group_size)
  prefill = VisionPrefill(None, None, jnp.moveaxis(positions[lead], 1, 0), None,
                          patches=vision.patches, visual_slot=slots[lead])
  return prefill, vision.positions[:, 0, P]


def _generate_impl(graphdef, params, layers, prompt_tokens, prompt_valid, keys,
                   sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                   group_size: int = 1, decode_mode: str = 'layerwise',
                   branched: bool = False, vision: VisionPrefill | None = None,
                   eos_at=None) -> SampleOutput:
  """The whole sampling program; layers: `placement.unstacked_layers(params)` or None; keys: one
  PRNG key per row (`row_keys`); vision: a Qwen3-VL prefill's pictures and positions (a
  VisionPrefill; with branched, a branch-stacked `vision_batch.VisionBatch`). branched: every input has a leading branch axis [K, ...]; the per-batch pieces are
  vmapped, the while_loop is not (a vmapped while_loop with a per-branch predicate would
  `select` the whole state, KV caches included, every step) and stops when every row of every
  branch is done."""
  program = _Program(graphdef, sampling, eos_ids, pad_id, group_size, decode_mode)
  over = (lambda f, in_axes=0: jax.vmap(f, in_axes=in_axes)) if branched else (lambda f, **_: f)
  slots = prompt_tokens.shape[-1] + sampling.max_new_tokens
  weights = over(functools.partial(program.forward.prepare, slots=slots))(params, layers)
  draws = over(program.draws)(keys)
  state, prompt, valid, rope_start, broken = over(program.start)(
      weights, prompt_tokens, prompt_valid, draws, eos_at, vision)
  advance = over(program.advance, in_axes=(0, 0, 0, 0, None, 0))

  def cond(carry):
    step, state = carry
    return (step < sampling.max_new_tokens) & ~jnp.all(state.done)

  def body(carry):
    step, state = carry
    return step + 1, advance(weights, rope_start, draws, state, step, eos_at)

  _, state = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), state))
  return over(program.output)(state, prompt, valid, broken)


_STATIC = ('graphdef', 'sampling', 'eos_ids', 'pad_id', 'group_size', 'decode_mode')


def _generate_from_key(graphdef, params, layers, prompt_tokens, prompt_valid, key, vision=None,
                       eos_at=None, **static):
  TRACE_COUNTS['generate'] += 1
  return _generate_impl(graphdef, params, layers, prompt_tokens, prompt_valid,
                        row_keys(key, prompt_tokens.shape[0]), vision=vision, eos_at=eos_at,
                        **static)


_generate_jit = jax.jit(_generate_from_key, static_argnames=_STATIC)


def _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead: int, group_size: int):
  if prompt_tokens.ndim != lead + 2 or prompt_valid.shape != prompt_tokens.shape:
    raise ValueError(f'prompt_tokens {prompt_tokens.shape} and prompt_valid {prompt_valid.shape} '
                     f'must be equal shapes of rank {lead + 2}')
  if not eos_ids:
    raise ValueError('eos_ids must name at least one token id')
  check_group_size(prompt_tokens.shape[lead], group_size)


def generate(graphdef, params, prompt_tokens, prompt_valid, key, sampling: SamplingParams,
             eos_ids: tuple[int, ...], pad_id: int = 0, group_size: int = 1,
             decode_mode: str = 'layerwise', images=None, videos=None,
             eos_at=None) -> SampleOutput:
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

  decode_mode: how the program runs the model (`forward.DECODE_MODES`): 'layerwise', the fast
  one, or 'model', the model's own forward, the reference it is tested against. Same samples.

  images, videos (a Qwen3-VL model, 'layerwise'): `qwen3_vl.VisualInput` of the pictures of
  the B / group_size distinct prompts (rows 0, G, 2G, ...), packed in prompt order, as
  transformers' processor packs a batch; the prompts hold the matching runs of image / video
  pad tokens (`vision_inputs.encode_vision_prompt`). The vision tower runs once per call, in the prefill.
  eos_at: None, or [B] int32 completion lengths forced by row (`token_selection.force_eos`:
  row b's token eos_at[b] - 1 is eos_ids[0]), for benchmarks and tests of uneven lengths.
  """
  prompt_tokens, prompt_valid = jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_valid,
                                                                                   bool)
  _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead=0, group_size=group_size)
  vision = None
  if images is not None or videos is not None:
    if decode_mode != 'layerwise':
      raise ValueError(f"images / videos are sampled with decode_mode='layerwise', not "
                       f"{decode_mode!r}")
    vision = vision_prefill(nnx.merge(graphdef, params), np.asarray(prompt_tokens)[::group_size],
                            np.asarray(prompt_valid)[::group_size], images, videos)
  # Per-layer weight views (CPU): only the 'layerwise' program reads them.
  layers = unstacked_layers(params, layer_axis=0) if decode_mode == 'layerwise' else None
  return _generate_jit(graphdef, params, layers, prompt_tokens, prompt_valid, key, vision,
                       None if eos_at is None else jnp.asarray(eos_at, jnp.int32),
                       sampling=sampling, eos_ids=tuple(int(e) for e in eos_ids),
                       pad_id=int(pad_id), group_size=group_size, decode_mode=decode_mode)


def _local_branches(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys,
                    eos_at, vision, sampling, eos_ids, pad_id, group_size, decode_mode):
  """The branches held in one place. A single branch runs the plain program: XLA:CPU runs a
  vmapped axis of size 1 markedly slower per token (BENCHMARKS.md, "Sampler")."""
  if prompt_tokens.shape[0] == 1:
    first = lambda tree: jax.tree.map(lambda x: x[0], tree)
    out = _generate_impl(graphdef, first(stacked_params), first(layers), prompt_tokens[0],
                         prompt_valid[0], keys[0], sampling, eos_ids, pad_id, group_size,
                         decode_mode, vision=first(vision), eos_at=first(eos_at))
    return jax.tree.map(lambda x: x[None], out)
  return _generate_impl(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys,
                        sampling, eos_ids, pad_id, group_size, decode_mode, branched=True,
                        vision=vision, eos_at=eos_at)


def _branches_impl(graphdef, stacked_params, layers, prompt_tokens, prompt_valid, keys,
                   eos_at, vision, sampling, eos_ids, pad_id, group_size=1,
                   decode_mode='layerwise', mesh: Mesh | None = None):
  """keys [K] -> one key per row, then the branches' programs. On a mesh, each device runs its
  own program on its own rows (shard_map over 'branch', and over 'fsdp' when it divides the
  batch B; 'tensor' stays with the compiler): with one branch per 'branch' slice no branch axis
  is left inside the program, and each device's decode loop stops when its own rows are done,
  with no collective per step (a per-step all-reduce of the stop test would cost every step;
  BENCHMARKS.md, "Sampler"). Group sharing then works on each device's rows, which
  `mesh_group_size` makes whole groups."""
  TRACE_COUNTS['generate_branches'] += 1
  B = prompt_tokens.shape[1]
  keys = jax.vmap(lambda key: row_keys(key, B))(keys)
  local = functools.partial(_local_branches, graphdef, sampling=sampling, eos_ids=eos_ids,
                            pad_id=pad_id, group_size=group_size, decode_mode=decode_mode)
  if mesh is None:
    return local(stacked_params, layers, prompt_tokens, prompt_valid, keys, eos_at, vision)
  rows = P('branch', batch_axis(mesh, B))
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P('branch'), P('branch'), rows, rows, rows,
                                 None if eos_at is None else rows, _vision_specs(vision, rows)),
                       out_specs=rows, axis_names={'branch'} | set(rows) - {None},
                       check_vma=False)(stacked_params, layers, prompt_tokens, prompt_valid, keys,
                                        eos_at, vision)


def _vision_specs(vision: VisionBatch | None, rows: P):
  """Where a branch-stacked VisionBatch lives in the sampler's shard_map: each device holds its
  branch's whole pack of patches (its rows' slots point anywhere in it) and its own rows."""
  if vision is None:
    return None
  return VisionBatch(jax.tree.map(lambda _: P('branch'), vision.patches), rows, rows)


@functools.lru_cache(maxsize=None)
def _branches_jit(mesh: Mesh | None) -> Callable:
  fn = functools.partial(_branches_impl, mesh=mesh)
  if mesh is None:
    return jax.jit(fn, static_argnames=_STATIC)
  out = NamedSharding(mesh, P('branch'))
  return jax.jit(fn, static_argnames=_STATIC, out_shardings=SampleOutput(out, out, out, out))


def generate_branches(graphdef, stacked_params, prompt_tokens, prompt_valid, keys,
                      sampling: SamplingParams, eos_ids: tuple[int, ...], pad_id: int = 0,
                      mesh: Mesh | None = None, group_size: int = 1,
                      decode_mode: str = 'layerwise', eos_at=None,
                      vision: VisionBatch | None = None) -> SampleOutput:
  """`generate` for K branches at once, one compiled program vmapped over the leading axis.

  stacked_params: params with every leaf [K, ...], or `place_weights(params, mesh)` of them
  (the same result, without placing them again); prompt_tokens, prompt_valid [K, B, P];
  keys [K] PRNG keys. With a ('branch', 'fsdp', 'tensor') mesh, branch k runs on its slice of
  the 'branch' axis: parameters are placed by SAMPLING_RULES (stacked on 'branch', replicated
  over 'fsdp'), prompts are split over 'branch' and, when it divides the batch, over 'fsdp'.
  group_size: as in `generate`, per branch (must divide B; the same promise); on a mesh, cut to
  whole groups per 'fsdp' shard (`mesh_group_size`). decode_mode, eos_at ([K, B] or None): as
  in `generate`. vision (Qwen3-VL): the rows' pictures as a branch-stacked
  `vision_batch.VisionBatch` over the P + N columns (`build_vision_batch`: the positions of the
  completion columns give the decode's start); rows of a group point at one copy of their
  prompt's pictures, and the tower runs on each branch's pack once per call, in the prefill.
  Returns [K, B, P + N], sharded over 'branch'.
  """
  # Host arrays stay numpy until placed (one transfer); global arrays (multi-process) stay jax.
  as_array = lambda x, dtype: jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(
      x, dtype)
  prompt_tokens, prompt_valid = as_array(prompt_tokens, jnp.int32), as_array(prompt_valid, bool)
  _check_inputs(prompt_tokens, prompt_valid, eos_ids, lead=1, group_size=group_size)
  if mesh is not None:
    group_size = mesh_group_size(mesh, prompt_tokens.shape[1], group_size)
    prompt_tokens, prompt_valid, keys = place_prompts(mesh, prompt_tokens, prompt_valid, keys)
  if eos_at is not None:
    eos_at = np.asarray(eos_at, np.int32)
    if mesh is not None:
      eos_at = jax.device_put(eos_at, NamedSharding(
          mesh, P('branch', batch_axis(mesh, prompt_tokens.shape[1]))))
  weights = place_weights(stacked_params, mesh)
  layers = weights.layers if decode_mode == 'layerwise' else None
  if vision is not None:
    if decode_mode != 'layerwise':
      raise ValueError(f"pictures are sampled with decode_mode='layerwise', not {decode_mode!r}")
    if mesh is None:
      vision = jax.tree.map(jnp.asarray, vision)
    else:
      specs = _vision_specs(vision, P('branch', batch_axis(mesh, prompt_tokens.shape[1])))
      vision = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)),
                            vision, specs)
  return _branches_jit(mesh)(graphdef, weights.params, layers, prompt_tokens, prompt_valid,
                             keys, eos_at, vision, sampling=sampling, eos_ids=tuple(int(e) for e in eos_ids),
                             pad_id=int(pad_id), group_size=group_size, decode_mode=decode_mode)
