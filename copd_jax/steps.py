"""Jitted, sharded GRPO and OPD updates on branch-stacked state.

`BranchState` holds K branches' parameters, optimizer state, step counters and rng keys, every
leaf stacked on a leading 'branch' axis and sharded over the mesh's 'branch' axis; graphdef,
optimizer and `StepConfig` stay static outside it. One update is a per-branch function vmapped
over K and jitted with explicit shardings and a donated state:

  grpo_step(state, batch[K, N, T] (, ref_params)) -> (state, metrics[K])
  opd_step(state, native[K, N, T], distill[R, K, M, T] (, ref_params)) -> (state, metrics[K])

Within a branch the loss is accumulated over micro-batches with `lax.scan` against one
normaliser computed from the whole batch first, so micro-batching leaves the update unchanged.
GRPO groups repeat one prompt G times; with StepConfig.group_size / prompt_length set, each
group's prompt is scored once and its KV cache shared by the group's rows
(`shared_prompt_logprobs`), which removes (G - 1) / G of the prompt compute from the update.

OPD teacher signal: in round r (`Topology.rounds()`), student k distils from teacher_of[k]. The
students' tokens are permuted along the branch axis to their teachers' shards (`shard_map` +
`ppermute`: a device receives only its student's rows), every teacher scores them with its own
parameters, and the log-probs are permuted back. Parameters never leave their branch (but for
the teachers' output heads of 'full_reverse_kl', once per round); only [K, M, T] tokens and
log-probs cross it (with opd.signal='topk_forward_kl' also [K, M, T, k]
top-k ids and log-probs; 'full_reverse_kl' moves the teachers' [K, M, T, D] hidden states and,
once per round, their output heads, from which the students form the teachers' logits one
logits_chunk at a time: copd_jax.opd_signals).
`copd_jax.edge_topk` does the same for the behavioural metrics (top-k ids and log-probs of
student and teacher per position).

Qwen3-VL: a batch's pictures travel in `RolloutBatch.vision` (copd_jax.vision_batch: each
branch's patches padded to a bucket, per-position visual slots, M-RoPE positions), so a step
compiles once per (tokens, patch bucket). Every forward of the update (policy, reference,
teacher) runs the vision tower on the pack and the decoder with the pictures' merged tokens and
deepstack features; the tower gets gradients (unless StepConfig.freeze_vision). The pack is
whole in every micro-batch (rows point into it) and each row is scored whole (no shared-prompt
KV cache for the VL forward). In OPD the student's pack goes with its tokens to the teacher's
shard (pixels cross branches, parameters never), and the native and distillation packs are
joined into one per branch for the update (`combined_pictures`).

Rng: `state.rng` is not consumed by the updates; derive per-step keys as fold_in(rng, step).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax import losses, opd_signals
from copd_jax.mesh import DEFAULT_RULES, branch_sharded, state_shardings
from copd_jax.models.qwen3 import KVCache, default_positions
from copd_jax.models.qwen3_vl import Qwen3VL
from copd_jax.opd_signals import TeacherView
from copd_jax.prompt_groups import repeat_cache, rows_off_group
from copd_jax.scoring import TokenScores, scores_from_hidden, sequence_logprobs
from copd_jax.step_config import StepConfig, StepConfigError
from copd_jax.tracing import TRACE_COUNTS
from copd_jax.vision_batch import VisionBatch, concat_packs


class BranchState(NamedTuple):
  """Per-branch training state; every leaf has a leading [K] 'branch' axis."""
  params: nnx.State     # nnx.split(model)[1] stacked K times
  opt_state: Any        # optimizer.init of one branch, vmapped
  step: jax.Array       # [K] int32, updates applied
  rng: jax.Array        # [K, 2] uint32 raw keys (jax.random.wrap_key_data to use)


class RolloutBatch(NamedTuple):
  """Sampled sequences to train on; every leaf [K, N, T] (or [R, K, M, T] for OPD distillation),
  T = prompt + completion positions."""
  tokens: jax.Array             # int32
  token_valid: jax.Array        # bool, real (non-pad) tokens
  completion_mask: jax.Array    # bool, completion tokens that are trained on
  sampler_logprobs: jax.Array   # float32, the sampler's log-prob of each token (0 elsewhere)
  advantages: jax.Array         # float32 per token (GRPO: the sequence advantage broadcast);
                                # ignored for distillation batches
  vision: Any = None            # Qwen3-VL: the rows' pictures, a vision_batch.VisionBatch
                                # (patches [K, S, ...], visual_slot [K, N, T], positions
                                # [K, N, 3, T]); None for a text model


# ----------------------------------------------------------------------------- state

def stack_params(params: nnx.State, num_branches: int) -> nnx.State:
  """Every leaf broadcast to [K, ...]."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x[None], (num_branches,) + x.shape), params)


def _is_param_tree(params_def):
  return lambda x: jax.tree.structure(x) == params_def


def branch_state_shardings(state: BranchState, mesh: Mesh,
                           rules: Mapping[str, str | None] = DEFAULT_RULES) -> BranchState:
  """Shardings for a concrete or abstract (`jax.eval_shape`) BranchState.

  Params follow their logical axes with the leading 'branch' axis; every sub-tree of the
  optimizer state shaped like the params (Adam's mu, nu, ...) gets the params' shardings; every
  other optimizer leaf (counts) and step/rng are sharded on 'branch' only.
  """
  param_sh = state_shardings(state.params, mesh, rules, branch_stacked=True)
  is_params = _is_param_tree(jax.tree.structure(state.params))
  opt_sh = jax.tree.map(lambda x: param_sh if is_params(x) else branch_sharded(mesh, x.ndim),
                        state.opt_state, is_leaf=is_params)
  return BranchState(param_sh, opt_sh, branch_sharded(mesh, 1), branch_sharded(mesh, 2))


def init_branch_state(graphdef, base_params: nnx.State, num_branches: int,
                      optimizer: optax.GradientTransformation, mesh: Mesh, seed: int,
                      rules: Mapping[str, str | None] = DEFAULT_RULES) -> BranchState:
  """K copies of base_params with fresh optimizer states, built directly in their shardings.

  graphdef is accepted for symmetry with the step factories (the state never contains it).
  """
  del graphdef
  if mesh.shape['branch'] and num_branches % mesh.shape['branch']:
    raise StepConfigError(f'num_branches={num_branches} is not divisible by the mesh branch axis '
                          f'({mesh.shape["branch"]})')

  init = branch_state_init(num_branches, optimizer, seed)
  shardings = branch_state_shardings(jax.eval_shape(init, base_params), mesh, rules)
  return jax.jit(init, out_shardings=shardings)(base_params)


def branch_state_init(num_branches: int, optimizer: optax.GradientTransformation, seed: int
                      ) -> Callable[[nnx.State], BranchState]:
  """params -> the BranchState of K copies with fresh optimizer states, step 0 and per-branch
  keys from `seed` (traceable: `jax.eval_shape` of it is the abstract state `plan` measures)."""
  from_stacked = stacked_state_init(num_branches, optimizer, seed)
  return lambda params: from_stacked(stack_params(params, num_branches))


def stacked_state_init(num_branches: int, optimizer: optax.GradientTransformation, seed: int
                       ) -> Callable[[nnx.State], BranchState]:
  """Branch-stacked params [K, ...] -> their BranchState, as `branch_state_init` builds it."""
  def init(stacked):
    keys = jax.random.split(jax.random.key(seed), num_branches)
    return BranchState(stacked, jax.vmap(optimizer.init)(stacked),
                       jnp.zeros((num_branches,), jnp.int32), jax.random.key_data(keys))
  return init


def init_stacked_branch_state(stacked_params: nnx.State, optimizer: optax.GradientTransformation,
                              mesh: Mesh, seed: int,
                              rules: Mapping[str, str | None] = DEFAULT_RULES) -> BranchState:
  """The BranchState of branch-stacked params already placed in their training shardings
  (e.g. read per branch from checkpoints), fresh optimizer states built in theirs. The params
  are copied, not donated: on CPU a placed buffer may share its host memory with other devices'
  copies (`hf_io.place_blocks`), which an in-place update would overwrite."""
  num_branches = jax.tree.leaves(stacked_params)[0].shape[0]
  init = stacked_state_init(num_branches, optimizer, seed)
  shardings = branch_state_shardings(jax.eval_shape(init, stacked_params), mesh, rules)
  return jax.jit(init, out_shardings=shardings)(stacked_params)


def reference_shardings(state_sharding: BranchState) -> Any:
  """Shardings of un-stacked (reference) params: the branch-stacked ones without 'branch'."""
  return jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:])), state_sharding.params)


# ----------------------------------------------------------------------------- batch layout

def _rows_constraint(x: jax.Array, mesh: Mesh, branch_dim: int) -> jax.Array:
  """Branch dim on 'branch'; the sequence dim after it on 'fsdp' (data parallel within a branch)
  when it divides; the rest replicated."""
  spec = [None] * x.ndim
  spec[branch_dim] = 'branch'
  rows = branch_dim + 1
  if rows < x.ndim and x.shape[rows] % mesh.shape['fsdp'] == 0:
    spec[rows] = 'fsdp'
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def _split_micro(x: jax.Array, num: int, group: int = 1) -> jax.Array:
  """[N, ...] -> [num, N // num, ...]; group j of `group` adjacent rows goes to micro-batch
  j % num, so a block-sharded N stays block-sharded inside every micro-batch."""
  n = x.shape[0]
  if n % (num * group):
    raise StepConfigError(f'StepConfig.num_micro_batches={num} (x group_size={group}) does not '
                          f'divide the {n} sequences per branch')
  x = jnp.swapaxes(x.reshape(n // (num * group), num, group, *x.shape[1:]), 0, 1)
  return x.reshape(num, n // num, *x.shape[3:])


def _merge_micro(x: jax.Array) -> jax.Array:
  """Inverse of _split_micro."""
  return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


# ----------------------------------------------------------------------------- one branch

def shared_prompt_logprobs(graphdef, params, tokens: jax.Array, token_valid: jax.Array,
                           temperature: float, group_size: int, prompt_length: int,
                           chunk_size: int | None = None) -> TokenScores:
  """`scoring.sequence_logprobs` for rows [B, T] whose groups of `group_size` adjacent rows repeat
  one prompt in columns [0, prompt_length): each prompt runs once into a KV cache that every row
  of its group continues from, saving (G - 1) / G of the prompt compute. Completion positions
  (t >= prompt_length) equal sequence_logprobs' up to float reordering; prompt positions are 0.
  Only the T - prompt_length scored positions go through the output head, chunk_size at a time
  (None: all at once; see scoring.map_head_chunks).
  """
  model = nnx.merge(graphdef, params)
  B, T = tokens.shape
  P, G = prompt_length, group_size
  if not 0 < P < T or B % G:
    raise StepConfigError(f'StepConfig.prompt_length={P} / group_size={G} do not fit a batch of '
                          f'{B} rows of {T} tokens')
  positions = default_positions(token_valid)
  cache = KVCache.empty(model.config, B // G, T, model.compute_dtype)
  prompt_hidden, cache = model.hidden_states(tokens[::G, :P], positions=positions[::G, :P],
                                             token_valid=token_valid[::G, :P], cache=cache)
  cache = repeat_cache(cache, G)
  hidden, _ = model.hidden_states(tokens[:, P:], positions=positions[:, P:],
                                  token_valid=token_valid[:, P:], cache=cache)
  # hidden states predicting tokens P .. T-1: the prompt's last position, then the completion's
  hidden = jnp.concatenate([jnp.repeat(prompt_hidden[:, P - 1:], G, axis=0), hidden[:, :-1]],
                           axis=1)
  scores = scores_from_hidden(model, hidden, tokens[:, P:], temperature, chunk_size)
  pad = lambda x: jnp.pad(x, ((0, 0), (P, 0))) * token_valid
  return TokenScores(pad(scores.logprobs), pad(scores.entropy))


def prompt_mismatch(tokens: jax.Array, token_valid: jax.Array, group_size: int,
                    prompt_length: int) -> jax.Array:
  """Share of rows [..., N, T] whose prompt columns differ from their group's first row (0 when
  the batch fits the shared-prompt layout)."""
  differs = lambda x: rows_off_group(x[..., :prompt_length], group_size)
  return jnp.mean(differs(tokens) | differs(token_valid), axis=-1)


class TeacherSignal(NamedTuple):
  """What the OPD teachers say about the rows of a combined batch ([N, T, ...] / [N] leaves):
  the teacher's log-prob of each distillation token, from which the update forms the OPD
  advantage, and for a distribution signal (copd_jax.opd_signals) the teacher's top-k or its
  hidden states (None when the signal does not use them; the teachers' heads of
  'full_reverse_kl' are per round, not per row, and travel beside the signal)."""
  teacher_logprobs: jax.Array   # [N, T], 0 on native rows
  is_distill: jax.Array         # [N] bool: the row is a distillation rollout
  topk_ids: jax.Array | None = None        # [N, T, k] 'topk_forward_kl'
  topk_logprobs: jax.Array | None = None   # [N, T, k]
  teacher_hidden: jax.Array | None = None  # [N, T, D] 'full_reverse_kl', 0 on native rows

  def view(self) -> TeacherView:
    return TeacherView(self.teacher_logprobs, self.topk_ids, self.topk_logprobs,
                       self.teacher_hidden)


def _branch_update(params, opt_state, batch: RolloutBatch, signal: TeacherSignal | None,
                   ref_params, trainable, teacher_heads, *, graphdef, optimizer, cfg: StepConfig,
                   native_rows: int = 0):
  """One optimizer update of one branch from batch [N, T] (native rows with their advantages,
  plus, for OPD, distillation rows whose advantage is the teacher signal), micro-batched against
  one normaliser of the whole batch. Returns (params, opt_state, metrics).

  teacher_heads ('full_reverse_kl', else None): [R, V, D] the head of this branch's teacher in
  each round; the batch is native_rows native rows, then R rounds of equally many distillation
  rows, so each micro-batch holds native_rows / num_micro_batches native rows and then its
  share of each round's rows, in round order (`_split_micro` deals rows out in turn).

  The update is applied only when the branch is `trainable` (frozen teachers are not) and its
  loss and gradients are finite; metrics['skipped_nonfinite'] is 1 when a non-finite value
  blocked it (numerical guard: params and optimizer state stay as they were)."""
  mask = batch.completion_mask.astype(jnp.float32)
  normalizer = losses.aggregation_weights(mask, cfg.aggregation, cfg.max_completion_tokens)[1]
  token_count = jnp.sum(mask)
  if signal is not None:
    distill_tokens = jnp.maximum(jnp.sum(mask * signal.is_distill[:, None]), 1.0)

  # A Qwen3-VL model scores every row whole (its forward has no KV cache to share a prompt
  # through); its pictures run through the tower once per prompt of the pack all the same.
  is_vl = isinstance(nnx.merge(graphdef, params), Qwen3VL)
  group = cfg.group_size if cfg.shares_prompts and signal is None and not is_vl else 1
  # The pack of pictures is whole in every micro-batch (its rows point into it); only the
  # per-row fields (visual_slot, positions) are split with the rows. The tower runs on it once
  # per update, not once per micro-batch: its output enters every micro-batch's loss as an
  # input, the gradients the micro-batches give that output are summed, and one backward
  # through the tower (its vjp) turns the sum into the tower's gradient. A gradient is linear
  # in its cotangent, so that equals the sum of the micro-batches' tower gradients.
  patches = None if batch.vision is None else batch.vision.patches
  encoded = ref_encoded = tower_vjp = None
  if patches is not None:
    batch = batch._replace(vision=batch.vision._replace(patches=None))

    def encode(vision_params):
      with_vision = jax.tree.map(lambda x: x, params)   # a new State; params stays as it is
      with_vision['vision'] = vision_params
      return nnx.merge(graphdef, with_vision).encode_pack(patches)

    if cfg.freeze_vision:
      encoded = jax.lax.stop_gradient(encode(params['vision']))
    else:
      encoded, tower_vjp = jax.vjp(encode, params['vision'])
    if ref_params is not None:
      ref_encoded = jax.lax.stop_gradient(nnx.merge(graphdef, ref_params).encode_pack(patches))
  with_patches = lambda mb, enc: None if mb.vision is None else mb.vision._replace(patches=enc)

  def score(p, mb: RolloutBatch, enc) -> TokenScores:
    if group > 1:
      return shared_prompt_logprobs(graphdef, p, mb.tokens, mb.token_valid, cfg.temperature,
                                    group, cfg.prompt_length, cfg.logits_chunk)
    return sequence_logprobs(graphdef, p, mb.tokens, mb.token_valid, cfg.temperature,
                             cfg.logits_chunk, with_patches(mb, enc))

  distribution = signal is not None and cfg.opd_signal != opd_signals.SAMPLED_TOKEN

  def loss_fn(p, enc, mb: RolloutBatch, mb_signal: TeacherSignal | None):
    if distribution:
      scores, divergence = opd_signals.student_scores(
          graphdef, p, mb.tokens, mb.token_valid, mb_signal.view(), cfg.opd_signal,
          cfg.temperature, cfg.logits_chunk, cfg.opd_clamp, teacher_heads,
          native_rows // cfg.num_micro_batches, with_patches(mb, enc))
    else:
      scores = score(p, mb, enc)
    advantages = mb.advantages
    if mb_signal is not None:
      mb_mask = mb.completion_mask * mb_signal.is_distill[:, None].astype(mb.completion_mask.dtype)
      opd_adv, delta = losses.opd_advantages(mb_signal.teacher_logprobs, scores.logprobs, mb_mask,
                                             beta=cfg.opd_beta, clamp=cfg.opd_clamp)
      # A distribution signal replaces the distillation rows' token advantage (opd_signals).
      opd_adv = jnp.zeros_like(opd_adv) if distribution else opd_adv
      advantages = jnp.where(mb_signal.is_distill[:, None], opd_adv, advantages)
    ref_lp = None
    if ref_params is not None:
      ref_lp = score(ref_params, mb, ref_encoded).logprobs
    loss, metrics = losses.policy_loss(
        scores.logprobs, mb.sampler_logprobs, advantages, mb.completion_mask,
        epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, aggregation=cfg.aggregation,
        max_tokens=cfg.max_completion_tokens, normalizer=normalizer, token_count=token_count,
        entropy=scores.entropy, entropy_coef=cfg.entropy_coef, ref_logprobs=ref_lp,
        kl_coef=cfg.kl_coef)
    if mb_signal is not None:
      metrics['opd_delta_mean'] = jnp.sum(delta) / distill_tokens
      metrics['opd_delta_abs_mean'] = jnp.sum(jnp.abs(delta)) / distill_tokens
    if distribution:
      weights = losses.aggregation_weights(mb_mask, cfg.aggregation, cfg.max_completion_tokens)[0]
      opd_loss = cfg.opd_beta * jnp.sum(weights * divergence) / normalizer
      loss = loss + opd_loss
      metrics['loss'] = metrics['loss'] + jax.lax.stop_gradient(opd_loss)
      metrics['opd_divergence_mean'] = jax.lax.stop_gradient(
          jnp.sum(mb_mask * divergence) / distill_tokens)
    return loss, metrics

  if cfg.freeze_vision:   # no gradient into the Qwen3-VL vision tower, and no update of it
    trained_loss = loss_fn
    loss_fn = lambda p, *rest: trained_loss(_on_vision(jax.lax.stop_gradient, p), *rest)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  xs = jax.tree.map(lambda x: _split_micro(x, cfg.num_micro_batches, group), (batch, signal))
  add = lambda a, b: a + b.astype(jnp.float32)

  def body(carry, x):
    g_acc, e_acc, m_acc = carry
    (_, metrics), (g, g_encoded) = grad_fn(params, encoded, *x)
    return (jax.tree.map(add, g_acc, g), jax.tree.map(add, e_acc, g_encoded),
            jax.tree.map(jnp.add, m_acc, metrics)), None

  metric_shapes = jax.eval_shape(
      lambda: grad_fn(params, encoded, *jax.tree.map(lambda x: x[0], xs))[0][1])
  zeros32 = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)
  init = (zeros32(params), zeros32(encoded),
          jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
  (grads, encoded_grads, metrics), _ = jax.lax.scan(body, init, xs)
  if tower_vjp is not None:   # the tower's one backward, from the micro-batches' summed signal
    (tower_grads,) = tower_vjp(jax.tree.map(lambda g, e: g.astype(e.dtype), encoded_grads,
                                            encoded))
    grads['vision'] = jax.tree.map(add, grads['vision'], tower_grads)
  metrics = dict(metrics)
  metrics['grad_norm'] = optax.global_norm(grads)
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  if cfg.freeze_vision:   # weight decay would still move the tower
    updates = _on_vision(jnp.zeros_like, updates)
  apply = finite & trainable
  keep_old = lambda new, old: jnp.where(apply, new, old)
  params = jax.tree.map(keep_old, optax.apply_updates(params, updates), params)
  opt_state = jax.tree.map(keep_old, new_opt_state, opt_state)
  metrics['skipped_nonfinite'] = (~finite).astype(jnp.float32)
  return params, opt_state, metrics


def _on_vision(fn, tree):
  """tree (params-shaped) with `fn` applied to the Qwen3-VL vision tower's leaves ('vision/...');
  a text model's tree is returned unchanged."""
  is_vision = lambda path: bool(path) and str(getattr(path[0], 'key', path[0])) == 'vision'
  return jax.tree_util.tree_map_with_path(lambda path, x: fn(x) if is_vision(path) else x, tree)


def _update_every_branch(graphdef, optimizer: optax.GradientTransformation,
                         cfg: StepConfig, native_rows: int = 0) -> Callable:
  """`_branch_update` vmapped over the K branches: update(params, opt_state, batch, signal,
  ref_params, trainable, teacher_heads=None), every argument stacked on 'branch' except the
  reference params, which all branches share (signal: a TeacherSignal, or None for GRPO;
  native_rows: the native rows leading each branch's batch)."""
  def update(params, opt_state, batch, signal, ref_params, trainable, teacher_heads):
    return _branch_update(params, opt_state, batch, signal, ref_params, trainable, teacher_heads,
                          graphdef=graphdef, optimizer=optimizer, cfg=cfg,
                          native_rows=native_rows)
  vmapped = jax.vmap(update, in_axes=(0, 0, 0, 0, None, 0, 0))
  return lambda *args, teacher_heads=None: vmapped(*args, teacher_heads)


def _trainable(cfg: StepConfig, num_branches: int) -> jax.Array:
  return jnp.asarray([k not in cfg.frozen_branches for k in range(num_branches)])


# ----------------------------------------------------------------------------- GRPO

def make_grpo_step(graphdef, optimizer: optax.GradientTransformation, mesh: Mesh,
                   config: StepConfig, state_sharding: BranchState) -> Callable:
  """Jitted `grpo_step(state, batch (, ref_params if config.kl_coef > 0)) -> (state, metrics)`.

  batch: RolloutBatch of [K, N, T] leaves. metrics: dict of [K] arrays (loss, pg_loss,
  clip_frac_low/high, approx_kl, entropy, grad_norm, advantage_mean/std/min/max, ref_kl; with
  shared prompts also prompt_mismatch, which must be 0: the share of rows whose prompt differs
  from their group's first row, whose scores are then wrong).
  The state argument is donated.
  """
  use_ref = config.kl_coef > 0
  rows = NamedSharding(mesh, P('branch'))

  def grpo_step(state: BranchState, batch: RolloutBatch, ref_params=None):
    TRACE_COUNTS['grpo_step'] += 1
    batch = jax.tree.map(lambda x: _rows_constraint(x, mesh, 0), batch)
    update = _update_every_branch(graphdef, optimizer, config)
    params, opt_state, metrics = update(state.params, state.opt_state, batch, None, ref_params,
                                        _trainable(config, batch.tokens.shape[0]))
    metrics.update(jax.vmap(losses.advantage_stats)(batch.advantages, batch.completion_mask))
    if config.shares_prompts:
      metrics['prompt_mismatch'] = prompt_mismatch(batch.tokens, batch.token_valid,
                                                   config.group_size, config.prompt_length)
    return BranchState(params, opt_state, state.step + 1, state.rng), metrics

  in_sh = (state_sharding, rows) + ((reference_shardings(state_sharding),) if use_ref else ())
  return jax.jit(grpo_step, in_shardings=in_sh, out_shardings=(state_sharding, rows),
                 donate_argnums=0)


# ----------------------------------------------------------------------------- OPD

def round_table(rounds: Sequence[Sequence[int]], num_branches: int,
                 num_batch_rounds: int) -> np.ndarray:
  """rounds as an [R, K] int table, checked: each round a partial permutation in which no branch
  teaches itself, and as many rounds as the distillation batch has (num_batch_rounds)."""
  table = np.asarray(rounds, np.int32).reshape(len(rounds), num_branches)
  if num_batch_rounds != len(table):
    raise StepConfigError(f'distill batch has {num_batch_rounds} rounds but the topology has '
                          f'{len(table)}')
  for r, teacher_of in enumerate(table):
    teachers = teacher_of[teacher_of >= 0]
    if len(set(teachers.tolist())) != len(teachers) or np.any(teacher_of >= num_branches):
      raise StepConfigError(f'rounds[{r}]={teacher_of.tolist()} is not a partial permutation')
    if np.any(teacher_of == np.arange(num_branches)):
      raise StepConfigError(f'rounds[{r}]={teacher_of.tolist()}: a branch cannot teach itself')
  return table


def routing(teacher_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(to_teacher, to_student, active) index arrays for one round.

  Row t of x[to_teacher] is the batch of t's student (t's own rows when it teaches nobody);
  row k of y[to_student] is what k's teacher computed (k's own row when k is idle)."""
  K = len(teacher_of)
  active = teacher_of >= 0
  to_student = np.where(active, teacher_of, np.arange(K))
  to_teacher = np.arange(K)
  to_teacher[teacher_of[active]] = np.nonzero(active)[0]
  return to_teacher, to_student, active


def permute_branches(x: jax.Array, index: np.ndarray, num_branches: int) -> jax.Array:
  """Inside `shard_map` manual over 'branch': branch t's rows become x[index[t]] (x [K / branch,
  ...] the local branches). With one branch per block the moved rows of a round form a partial
  permutation (`routing`), so this is one `lax.ppermute`: every block receives only the rows it
  needs, branches that keep their own rows receive nothing. With several branches per block it
  gathers the local blocks' rows over 'branch' (K times the tokens; still no vocabulary- or
  parameter-sized array)."""
  local = x.shape[0]
  block = jax.lax.axis_index('branch')
  if local == 1:
    pairs = [(int(src), dst) for dst, src in enumerate(index) if src != dst]
    if not pairs:
      return x
    received = np.zeros(num_branches, bool)
    received[[dst for _, dst in pairs]] = True
    moved = jax.lax.ppermute(x, 'branch', pairs)
    return jnp.where(jnp.asarray(received)[block], moved, x)
  every = jax.lax.all_gather(x, 'branch', axis=0, tiled=True)[np.asarray(index)]
  return jax.lax.dynamic_slice_in_dim(every, block * local, local, axis=0)


def chunked(fn, num: int, *xs):
  """fn over [M, ...] inputs evaluated num sequential micro-batches at a time (bounded memory)."""
  if num == 1:
    return fn(*xs)
  out = jax.lax.map(lambda c: fn(*c), tuple(_split_micro(x, num) for x in xs))
  return jax.tree.map(_merge_micro, out)


def chunked_rows(fn, num: int, tokens: jax.Array, valid: jax.Array,
                 vision: VisionBatch | None):
  """`fn(tokens, valid, pictures)` over one branch's rows [M, T], `chunked` into num sequential
  micro-batches: the pack of pictures is whole in every micro-batch (its rows point into it),
  the rows' visual slots and M-RoPE positions are split with the rows (pictures None for text
  rows). The one way the OPD teacher pass and the top-k probe feed rows to a scoring function."""
  def one(t, v, *rows):
    pictures = None if vision is None else vision._replace(visual_slot=rows[0], positions=rows[1])
    return fn(t, v, pictures)
  rows = () if vision is None else (vision.visual_slot, vision.positions)
  return chunked(one, num, tokens, valid, *rows)


def encoded_once(graphdef, params: nnx.State, vision: VisionBatch | None) -> VisionBatch | None:
  """`vision` with its pack already through the tower (`Qwen3VL.encode_pack`), so the
  micro-batches of a forward-only pass (`chunked_rows`) share one tower run."""
  if vision is None:
    return None
  return vision._replace(patches=nnx.merge(graphdef, params).encode_pack(vision.patches))


def route(x: jax.Array, index: np.ndarray, mesh: Mesh) -> jax.Array:
  """Rows of x [K, M, ...] permuted along the branch axis (row t becomes x[index[t]]) by
  `permute_branches` under a `shard_map` manual over every mesh axis, laid out as
  `_rows_constraint` lays rows out: only x's moved rows cross branches, as one collective
  permute per call (x[index] left to the partitioner compiled to an all-gather over 'branch'
  at K=4: every device received every branch's rows)."""
  x = _rows_constraint(x, mesh, 0)
  rows = 'fsdp' if x.ndim > 1 and x.shape[1] % mesh.shape['fsdp'] == 0 else None
  spec = P('branch', rows)
  return jax.shard_map(lambda v: permute_branches(v, index, x.shape[0]), mesh=mesh,
                       in_specs=spec, out_specs=spec, check_vma=False)(x)


def teacher_views(graphdef, params: nnx.State, distill: RolloutBatch, rounds: np.ndarray,
                  mesh: Mesh, config: StepConfig) -> TeacherView:
  """What each student's teacher says about its distillation rollouts, every leaf [R, K, M, T,
  ...] (0 for idle students): `opd_signals.teacher_view` of config.opd_signal, computed on the
  teacher's shard with the teacher's parameters (micro-batched and logits_chunk'ed as in
  `config`). Tokens go to the teacher and the view comes back by `route`: [M, T] log-probs per
  edge for 'sampled_token', [M, T, k] ids and log-probs for 'topk_forward_kl', [M, T] log-probs
  and [M, T, D] hidden states for 'full_reverse_kl' (whose heads `teacher_heads` routes)."""
  def score(p, tok, valid, vision):
    # The teacher's tower runs once per round on the student's pack, not per micro-batch.
    return chunked_rows(
        lambda t, v, pictures: opd_signals.teacher_view(
            graphdef, p, t, v, config.opd_signal, config.temperature, config.opd_topk,
            config.logits_chunk, pictures),
        config.num_micro_batches, tok, valid, encoded_once(graphdef, p, vision))

  out = []
  for r, teacher_of in enumerate(rounds):
    to_teacher, to_student, active = routing(teacher_of)
    tokens = route(distill.tokens[r], to_teacher, mesh)
    valid = route(distill.token_valid[r], to_teacher, mesh)
    # Qwen3-VL: the student's pictures go with its tokens (pixels, never parameters, cross).
    vision = None if distill.vision is None else jax.tree.map(
        lambda x: route(x[r], to_teacher, mesh), distill.vision)
    view = jax.vmap(score)(params, tokens, valid, vision)
    view = jax.tree.map(lambda x: route(x, to_student, mesh), view)
    keep = lambda x: x * jnp.asarray(active, x.dtype)[(slice(None),) + (None,) * (x.ndim - 1)]
    out.append(jax.tree.map(keep, view))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def teacher_heads(graphdef, params: nnx.State, rounds: np.ndarray, mesh: Mesh) -> jax.Array:
  """[R, K, V, D] the output head (`opd_signals.teacher_head`, compute dtype) of each student's
  teacher per round (0 for idle students), moved by `route` like the views: per round one
  collective permute of each teacher's head, split over 'fsdp' where it divides V."""
  heads = jax.vmap(lambda p: opd_signals.teacher_head(graphdef, p))(params)
  out = []
  for teacher_of in rounds:
    _, to_student, active = routing(teacher_of)
    routed = route(heads, to_student, mesh)
    out.append(routed * jnp.asarray(active, routed.dtype)[:, None, None])
  return jnp.stack(out)


def teacher_logprobs(graphdef, params: nnx.State, distill: RolloutBatch, rounds: np.ndarray,
                     mesh: Mesh, temperature: float, num_micro_batches: int = 1,
                     logits_chunk: int | None = None) -> jax.Array:
  """[R, K, M, T] log pi_teacher of each student's distillation tokens (0 for idle students):
  `teacher_views` of the default signal."""
  config = StepConfig(temperature=temperature, num_micro_batches=num_micro_batches,
                      logits_chunk=logits_chunk)
  return teacher_views(graphdef, params, distill, rounds, mesh, config).token_logprobs


def combined_pictures(native: VisionBatch, distill: VisionBatch, length: int,
                      model: Qwen3VL) -> VisionBatch:
  """The pictures of an OPD step's combined batch [K, N + R * M, length]: native [K, ...] and
  every round's distill [R, K, ...] packs joined into one pack per branch, the rows' slots and
  positions in the combined row order (native rows, then round by round), right-padded to
  `length` columns (text slots, position 0)."""
  R = distill.visual_slot.shape[0]
  rounds = [jax.tree.map(lambda x: x[r], distill) for r in range(R)]
  joined = concat_packs([native] + rounds, model.config.vision.merge_unit)
  pad = lambda x: jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, length - x.shape[-1]),))
  rows = lambda name: jnp.concatenate([pad(getattr(v, name)) for v in joined], axis=1)
  return VisionBatch(joined[0].patches, rows('visual_slot'), rows('positions'))


def make_opd_step(graphdef, optimizer: optax.GradientTransformation, mesh: Mesh,
                  config: StepConfig, state_sharding: BranchState,
                  rounds: Sequence[Sequence[int]]) -> Callable:
  """Jitted `opd_step(state, native, distill (, ref_params)) -> (state, metrics)` (Algorithm 1,
  lines 8-17): one update per branch from its native GRPO batch native [K, N, T] together with
  its distillation rollouts distill [R, K, M, T] (row [r, k] sampled by student k on the domain
  of rounds[r][k]; its advantages field is ignored; rows of idle students are masked out).

  Distillation tokens get the advantage opd_beta * delta (optionally clamped), or with a
  distribution config.opd_signal the loss opd_beta * divergence instead (copd_jax.opd_signals).
  The native and
  distillation rows form one batch [K, N + R * M, max T] (right-padded), so they share one
  aggregation normaliser and num_micro_batches must divide N + R * M (and M, for the teacher
  pass). metrics [K]: those of grpo_step plus opd_delta_mean and
  opd_delta_abs_mean (over distillation tokens), and with a distribution signal
  opd_divergence_mean (its per-position divergence over distillation tokens). rounds is static
  (Topology.rounds()).
  """
  use_ref = config.kl_coef > 0
  rows = NamedSharding(mesh, P('branch'))
  rounds_sh = NamedSharding(mesh, P(None, 'branch'))

  def opd_step(state: BranchState, native: RolloutBatch, distill: RolloutBatch, ref_params=None):
    TRACE_COUNTS['opd_step'] += 1
    R, K, M = distill.tokens.shape[:3]
    table = round_table(rounds, K, R)
    native = jax.tree.map(lambda x: _rows_constraint(x, mesh, 0), native)
    active = jnp.asarray(table >= 0)[:, :, None, None]
    mask = distill.completion_mask
    distill = distill._replace(completion_mask=mask * active.astype(mask.dtype))
    distill = jax.tree.map(lambda x: _rows_constraint(x, mesh, 1), distill)
    if (native.vision is None) != (distill.vision is None):
      raise StepConfigError('native and distillation batches must both carry pictures or '
                            'neither (a Qwen3-VL run attaches them to every batch)')
    teacher = teacher_views(graphdef, state.params, distill, table, mesh, config)
    heads = None
    if config.opd_signal == opd_signals.FULL_REVERSE_KL:   # [R, K, V, D] -> [K, R, V, D]
      heads = jnp.swapaxes(teacher_heads(graphdef, state.params, table, mesh), 0, 1)
      # At the student the vocabulary is split over 'tensor' as its own logits are (and as
      # memory_estimate counts the heads), the hidden axis whole.
      vocab = 'tensor' if heads.shape[2] % mesh.shape['tensor'] == 0 else None
      heads = jax.lax.with_sharding_constraint(heads, NamedSharding(mesh, P('branch', None,
                                                                            vocab)))
    # One combined batch per branch: native rows, then its distillation rows of all rounds
    # ([R, K, M, T] -> [K, R * M, T]), both right-padded to a common T.
    per_branch = lambda x: jnp.swapaxes(x, 0, 1).reshape(K, R * M, *x.shape[3:])
    distill_rows = jax.tree.map(per_branch, distill._replace(advantages=jnp.zeros_like(
        distill.sampler_logprobs), vision=None))
    T = max(native.tokens.shape[-1], distill.tokens.shape[-1])
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, T - x.shape[2])) + ((0, 0),) * (x.ndim - 3))
    combined = jax.tree.map(lambda a, b: jnp.concatenate([pad(a), pad(b)], axis=1),
                            native._replace(vision=None), distill_rows)
    if native.vision is not None:
      combined = combined._replace(vision=combined_pictures(
          native.vision, distill.vision, T, nnx.merge(graphdef, state.params)))
    N = native.tokens.shape[1]
    # Native rows get zeros in every teacher field (they have no teacher).
    with_native = lambda x: jnp.concatenate(
        [jnp.zeros((K, N, T) + x.shape[4:], x.dtype), pad(per_branch(x))], axis=1)
    teacher = jax.tree.map(with_native, teacher)
    signal = TeacherSignal(
        teacher.token_logprobs.astype(jnp.float32),
        jnp.broadcast_to(jnp.arange(N + R * M) >= N, (K, N + R * M)),
        teacher.topk_ids, teacher.topk_logprobs, teacher.hidden)
    combined, signal = jax.tree.map(lambda x: _rows_constraint(x, mesh, 0), (combined, signal))

    update = _update_every_branch(graphdef, optimizer, config, native_rows=N)
    params, opt_state, metrics = update(state.params, state.opt_state, combined, signal,
                                        ref_params, _trainable(config, K), teacher_heads=heads)
    metrics.update(jax.vmap(losses.advantage_stats)(native.advantages, native.completion_mask))
    return BranchState(params, opt_state, state.step + 1, state.rng), metrics

  in_sh = ((state_sharding, rows, rounds_sh)
           + ((reference_shardings(state_sharding),) if use_ref else ()))
  return jax.jit(opd_step, in_shardings=in_sh, out_shardings=(state_sharding, rows),
                 donate_argnums=0)
