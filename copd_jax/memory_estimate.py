"""Per-device memory estimate of a run config on a given set of devices, computed from shapes
only: what `plan` prints (copd_jax/memory_plan.py) and what `train` checks before its first step
(copd_jax/memory_check.py).

Nothing is allocated: the model is built with `nnx.eval_shape`, the branch state with
`jax.eval_shape` of the same stacking and optimizer init as `steps.init_branch_state`, and every
leaf's PartitionSpec comes from `steps.branch_state_shardings` (the shardings the train steps
declare). A leaf's per-device bytes are its shard shape (`NamedSharding.shard_shape`) times its
item size, so sharded state is exact; activations and the KV cache are formula estimates:

Notation: L layers, D hidden, H / Kv query / KV heads, hd head_dim, F MLP width, V vocab; a the
compute-dtype bytes; t the 'tensor' axis size, applied to heads / MLP / vocab only where it
divides them; b rows on one device (rows of a micro-batch / 'fsdp' when that divides them,
times the K / mesh.branch branches a device holds, since branches are vmapped); T tokens per row;
c the positions of logits scored at once: grpo.logits_chunk as resolved
(copd_jax/logits_chunk.py), T when off.

  training activations, per layer (saved for the backward pass):
    per token   a * (4 D + (4 H hd + 4 Kv hd + 3 F) / t)
                (layer input, two norm outputs, residual; q / k projected, normed, rotated and
                the attention output; v; MLP gate, up and their product)
                + 4 * (4 D + (3 H hd + 3 Kv hd + F) / t)
                (the fp32 internals of the RMS norms, q / k norms and RoPE, and the SiLU)
    attention   b * H/t * T^2 * (4 + a)   (fp32 scores and the probabilities) where the scores
                are dense (model.attention 'dense', or 'auto' with T <= model.attention_block);
                else b * H/t * (B^2 (4 + a) + 4 T), B = min(T, block): one tile of the
                blockwise / fused kernel and the saved log-sum-exp (copd_jax/models/attention.py)
    layer(b, T) = b T * per_token + attention
  output head:    head(b, T) = 4 * b c V/t * 4  (fp32 logits, log-softmax, probabilities and
                  their product for the entropy, of the c positions scored at once)
                  + V/t D * 4 when chunked (the head weight's gradient carried through the
                  chunks)
  without remat:  L * layer(b, T) + head(b, T)  (every layer's activations live while the head
                  runs)
  with remat:     L * b T D a + max(layer(b, T), head(b, T))  (each layer's input; the head's
                  arrays are freed before the layers' backward recomputes one layer at a time)
  gradients:      per device, params' element count * (4 + param bytes): the fp32 micro-batch
                  accumulator and one micro-batch's gradient
  OPD teacher signal at the student (opd.signal; 0 for 'sampled_token', whose [rows, T]
                  log-probs count as little as the batch's other per-token arrays):
                  'topk_forward_kl' b_o T k * 8 (the teachers' top-k ids and log-probs);
                  'full_reverse_kl' b_o T D a + K/branch (R + 1) V/t D a (the teachers'
                  final-normed hidden states, laid into the whole combined batch, and [V, D]
                  heads: the R routed to each branch, split over 'tensor' as the student's
                  logits are, and the compute-dtype copy each teacher makes of its own to send)
                  held through the update, b_o = the OPD step's rows of all micro-batches on a
                  device; plus, in the head term of the OPD micro-batch,
                  SIGNAL_CHUNK_ARRAYS * b_d c V/t * 4 for the teachers' logits formed in each
                  chunk (b_d: the micro-batch's distillation rows on a device)
  OPD teacher pass: layer(b_t, T) + 2 * b_t c V/t * 4, b_t the distillation rows of one
                  micro-batch (opd rows / grpo.micro_batches) on a device: the teachers score
                  the students' tokens forward only (fp32 logits and log-softmax) before the
                  update, so the OPD step's peak is the larger of the two
  KV cache:       r * 2 L Kv/t hd S * a  (S = prompt + new tokens; r the cache's rows: the static
                  decoder holds all b_s sampled rows of a device, the engine
                  (sampling.decoder='engine') the slots its kv_token_budget holds,
                  `sampling.engine.slot_count`)
  prefill:        layer(b, P) + 2 b V/t * 4 for the P prompt tokens (transient, one layer;
                  b = b_s). The engine prefills b = the most prompts one admission takes
                  (`sampling.engine.admission_sizes`: sampling.prefill_prompts, at most the
                  groups its slots hold) over min(P, sampling.prefill_chunk) tokens at a
                  time, into a staging cache of those b rows (r * ... above with r = b,
                  held for the whole sampling call), per branch engine on the device
  top-k probe:    layer(b_p, T) + 3 * b_p c V/t * 4: the behavioural metrics
                  (`edge_topk.make_edge_topk`) of a round's b_p distillation rows on a device (fp32
                  logits, the log-softmax of the top-k and that of the token's log-prob),
                  counted as one pass (the probe splits them into grpo.micro_batches, so this
                  errs high by up to that factor)

Calibration: against XLA:CPU's `memory_analysis().temp_size_in_bytes` of the compiled GRPO step
(fp32, one device) the layer, head and remat terms agree within a few percent
(tests/test_plan.py checks 10%; with chunked logits 10% with remat, up to 20% high without).
Issue 17.3's run (9.8M parameters, V = 151,936, K=2 on 2 CPU devices, 8-position chunks):
compiled temporaries per device 1.87 GiB (OPD step; estimate 1.92 with gradients), 1.25 (GRPO;
1.24 + 0.07), 0.44 (probe; 0.45). That run's process peaked at 7.8 GiB RSS against a host
estimate of 4.1 GiB: the runtime, compiled programs and allocator slack are not estimated.
bf16 activations are as XLA:GPU/TPU store them; XLA:CPU keeps them in fp32.

Qwen3-VL (a Qwen3VLConfig): the state holds the vision tower's leaves (no gradients under
model.freeze_vision), and `add_vision_terms` adds the tower's activations on each step's patch
pack, the deepstack additions, the pictures and the OPD packs routed to the teachers
(formulas: copd_jax/vision_memory.py) to the GRPO / OPD updates, the teacher pass, the top-k
probe and the prefill; the decoder's terms above use its text side.

Base model: the run reads the un-stacked base parameters onto the devices (in the params'
shardings without 'branch') to broadcast the branch state from them, and keeps them only as the
frozen reference of the k3 KL term (`run_setup.starting_state`). So the phases count one base
shard per device only when grpo.kl_coef > 0 (`MemoryPlan.reference_bytes`); with kl_coef = 0
(the paper's setting) they are freed after set-up, whose transient (state + one base shard) is
below the training peak (state + gradients, at least twice the params, + activations).

Training peak = state + gradients + reference + the largest of the GRPO and OPD
micro-batches' activations (the OPD one plus the teacher signal it holds) and the OPD teacher
pass; sampling peak = state + reference + the sampler's parameter copy (parameters resharded by
`sampling.SAMPLING_RULES` on the sampling mesh: 'embed' is not split over 'fsdp') + KV cache +
prefill; probe peak = state + reference + top-k probe. Not counted: XLA temporaries and fusion
buffers, the compiled programs, the Python process. Host memory (CPU devices share their host's
RAM): `MemoryPlan.host_peak` sums the per-device peaks of a host's devices (with the reference,
their base shards are the base model the run holds in RAM: a shard replicated over 'branch' is
one copy per device on CPU too).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from copd_jax.sampling.engine import EngineSettings, admission_sizes, slot_count
from copd_jax import config_checks, logits_chunk as logits_chunk_lib, mesh as mesh_lib, opd_signals
from copd_jax.errors import UserInputError
from copd_jax.models.attention import Attention, uses_dense_scores
from copd_jax.models.presets import DTYPES
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.optim import make_optimizer
from copd_jax.sampling import SAMPLING_RULES
from copd_jax.steps import branch_state_init, branch_state_shardings
from copd_jax.topology import topology_from_config
from copd_jax import vision_memory

GIB = 2 ** 30
# fp32 [rows, c, V] arrays a chunk of the 'full_reverse_kl' student loss holds for the teachers'
# distribution beside the student's own (their log-softmax; the logits fuse into it). Against
# XLA:CPU's compiled OPD step the signal's terms err high by up to about 25%
# (tests/test_plan.py: test_full_reverse_kl_estimate_tracks_xla_memory_analysis).
SIGNAL_CHUNK_ARRAYS = 1


class PlanError(UserInputError):
  pass


@dataclasses.dataclass(frozen=True)
class Workload:
  """Batch shapes of one run, per branch."""
  num_branches: int
  native_rows: int       # GRPO rows per step: grpo.prompts_per_step * grpo.group_size
  distill_rows: int      # OPD rows per round: opd.prompts_per_step * opd.samples_per_prompt
  rounds: int            # OPD rounds R (0: no OPD steps)
  prompt_tokens: int     # padded prompt length P
  new_tokens: int        # sampling.max_new_tokens
  micro_batches: int
  compute_bytes: int
  remat: bool
  reference: bool        # grpo.kl_coef > 0: the base params are the k3 KL term's reference
  logits_chunk: int | None = None   # grpo.logits_chunk as resolved (None: off)
  attention: Attention = Attention()  # model.attention / model.attention_block
  opd_signal: str = opd_signals.SAMPLED_TOKEN   # opd.signal
  opd_topk: int = 8                             # opd.topk ('topk_forward_kl')

  @property
  def seq(self) -> int:
    return self.prompt_tokens + self.new_tokens


def num_opd_rounds(config) -> int:
  """R of the OPD step: the rounds of the run's topology (0 when there are no OPD steps)."""
  if not config.copd.s_opd:
    return 0
  return len(topology_from_config(config).rounds())


def workload_of(config, prompt_tokens: int, vocab_size: int | None = None) -> Workload:
  """The run's batch shapes; grpo.logits_chunk resolved for `vocab_size` (None: what the
  config tells) as StepConfig.from_config resolves it."""
  if prompt_tokens < 1:
    raise PlanError(f'--prompt-tokens must be a positive integer, got {prompt_tokens}')
  return Workload(
      num_branches=len(config.branches),
      native_rows=config.grpo.prompts_per_step * config.grpo.group_size,
      distill_rows=config.opd.prompts_per_step * config.opd.samples_per_prompt,
      rounds=num_opd_rounds(config), prompt_tokens=prompt_tokens,
      new_tokens=config.sampling.max_new_tokens, micro_batches=config.grpo.micro_batches,
      compute_bytes=jnp.dtype(DTYPES[config.model.compute_dtype]).itemsize,
      remat=bool(config.model.remat), reference=config.grpo.kl_coef > 0,
      logits_chunk=logits_chunk_lib.resolve(config, prompt_tokens, vocab_size),
      attention=Attention(config.model.attention, config.model.attention_block),
      opd_signal=config.opd.signal, opd_topk=config.opd.topk)


# ---------------------------------------------------------------------------------------------
# Abstract state and per-leaf shardings
# ---------------------------------------------------------------------------------------------

def abstract_params(model_config: Qwen3Config | Qwen3VLConfig, param_dtype=jnp.float32
                    ) -> tuple[Any, nnx.State]:
  """(graphdef, params of ShapeDtypeStruct leaves) of one model (a Qwen3, or a Qwen3-VL with
  its vision tower); nothing allocated."""
  cls = Qwen3VL if isinstance(model_config, Qwen3VLConfig) else Qwen3
  model = nnx.eval_shape(lambda: cls(model_config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
  return nnx.split(model)


def abstract_branch_state(params: nnx.State, num_branches: int, optimizer) -> Any:
  """The BranchState `steps.init_branch_state` builds, as ShapeDtypeStructs."""
  return jax.eval_shape(branch_state_init(num_branches, optimizer, seed=0), params)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  group: str                  # 'params', 'opt_state', 'step' or 'rng'
  path: str                   # e.g. 'layers.q_proj', 'opt_state.1.0.mu.layers.q_proj'
  shape: tuple[int, ...]
  dtype: str
  spec: Any                   # PartitionSpec
  per_device_bytes: int

  @property
  def total_bytes(self) -> int:
    return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize


def shard_bytes(shape: Sequence[int], dtype, sharding: NamedSharding) -> int:
  """Bytes one device holds of an array of `shape` placed with `sharding`."""
  return math.prod(sharding.shard_shape(tuple(shape))) * jnp.dtype(dtype).itemsize


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _leaf_rows(group: str, tree: Any, shardings: Any) -> list[LeafPlan]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)[0]
  sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  if len(leaves) != len(sh):
    raise ValueError(f'{group}: {len(leaves)} leaves but {len(sh)} shardings')
  rows = []
  for (path, leaf), sharding in zip(leaves, sh):
    name = jax.tree_util.keystr(path, simple=True, separator='.')
    rows.append(LeafPlan(group, name or group, tuple(leaf.shape), str(jnp.dtype(leaf.dtype)),
                         sharding.spec, shard_bytes(leaf.shape, leaf.dtype, sharding)))
  return rows


def state_leaf_plans(state: Any, shardings: Any) -> list[LeafPlan]:
  """One LeafPlan per leaf of an (abstract) BranchState and its shardings."""
  rows = []
  for group in ('params', 'opt_state', 'step', 'rng'):
    rows += _leaf_rows(group, getattr(state, group), getattr(shardings, group))
  return rows


# ---------------------------------------------------------------------------------------------
# Formula estimates (see the module docstring)
# ---------------------------------------------------------------------------------------------

def _split(n: int, axis_size: int) -> float:
  """n / axis_size when the axis divides n (the mesh shards it), else n (replicated)."""
  return n / axis_size if n % axis_size == 0 else n


def attention_score_bytes(mc: Qwen3Config, rows: float, seq: int, a: int, tensor: int,
                          attention: Attention = Attention('dense')) -> float:
  """Attention's score-shaped arrays of one layer: the dense [seq, seq] scores and probabilities,
  or one [block, block] tile and the fp32 log-sum-exp of the blockwise / fused kernels."""
  heads = rows * _split(mc.num_heads, tensor)
  if uses_dense_scores(attention.impl, attention.block, seq):
    return heads * seq * seq * (4 + a)
  tile = min(seq, attention.block)
  return heads * (tile * tile * (4 + a) + 4 * seq)


def layer_activation_bytes(mc: Qwen3Config, rows: float, seq: int, a: int, tensor: int,
                           attention: Attention = Attention('dense')) -> float:
  """Saved activations of one decoder layer for `rows` sequences of `seq` tokens on one device."""
  # Widths of the q / kv projections and the MLP on one device ('tensor' splits heads / F).
  H = _split(mc.num_heads, tensor) * mc.head_dim
  Kv = _split(mc.num_kv_heads, tensor) * mc.head_dim
  D, F = mc.hidden_size, _split(mc.intermediate_size, tensor)
  compute = a * (4 * D + 4 * H + 4 * Kv + 3 * F)
  fp32 = 4 * (4 * D + 3 * H + 3 * Kv + F)
  return rows * seq * (compute + fp32) + attention_score_bytes(mc, rows, seq, a, tensor, attention)


def scored_positions(seq: int, chunk: int | None) -> int:
  """Positions of logits held at once: the chunk, or all `seq` when chunking is off."""
  return seq if chunk is None or chunk >= seq else chunk


def head_activation_bytes(mc: Qwen3Config, rows: float, seq: int, tensor: int,
                          chunk: int | None = None) -> float:
  """The output head's fp32 [rows, positions, V] arrays kept for the backward pass (positions:
  `chunk` or all `seq`), plus, when chunked, the head weight's gradient carried through the
  chunks."""
  V = _split(mc.vocab_size, tensor)
  positions = scored_positions(seq, chunk)
  carried = V * mc.hidden_size * 4 if positions < seq else 0
  return 4 * rows * positions * V * 4 + carried


def forward_pass_bytes(mc: Qwen3Config, rows: float, seq: int, a: int, tensor: int,
                       chunk: int | None = None, arrays: int = 2,
                       attention: Attention = Attention('dense')) -> float:
  """A forward-only scoring pass (the OPD teacher pass, the top-k probe) on one device: one
  layer's activations and `arrays` fp32 [rows, positions, V] arrays (logits, log-softmax, ...)
  of the positions scored at once."""
  return (layer_activation_bytes(mc, rows, seq, a, tensor, attention)
          + arrays * rows * scored_positions(seq, chunk) * _split(mc.vocab_size, tensor) * 4)


def train_activation_bytes(mc: Qwen3Config, rows: float, seq: int, a: int, tensor: int,
                           remat: bool, chunk: int | None = None,
                           attention: Attention = Attention('dense'),
                           head_extra: float = 0.0) -> float:
  """Activations of one micro-batch's forward + backward on one device (layers + output head,
  `chunk` positions of logits at a time; None: all); head_extra: bytes the loss holds beside
  the head's own arrays while a chunk runs (`signal_chunk_bytes`)."""
  layer = layer_activation_bytes(mc, rows, seq, a, tensor, attention)
  head = head_activation_bytes(mc, rows, seq, tensor, chunk) + head_extra
  if remat:
    return mc.num_layers * rows * seq * mc.hidden_size * a + max(layer, head)
  return mc.num_layers * layer + head


def signal_held_bytes(mc: Qwen3Config, signal: str, rows: float, seq: int, a: int,
                      tensor: int, heads: float, topk: int) -> float:
  """The OPD teacher signal (beyond per-token log-probs) the update holds on one device for
  `rows` rows of `seq` tokens and `heads` teacher heads (branches here x (rounds + 1)):
  'topk_forward_kl' the int32 ids and fp32 log-probs of the top-k; 'full_reverse_kl' the
  teachers' hidden states and their [V, D] heads (vocabulary over 'tensor') in compute dtype;
  'sampled_token' 0."""
  if signal == opd_signals.TOPK_FORWARD_KL:
    return rows * seq * topk * 8
  if signal == opd_signals.FULL_REVERSE_KL:
    return (rows * seq + heads * _split(mc.vocab_size, tensor)) * mc.hidden_size * a
  return 0.0


def signal_chunk_bytes(mc: Qwen3Config, signal: str, rows: float, seq: int, tensor: int,
                       chunk: int | None) -> float:
  """'full_reverse_kl': the teachers' fp32 [rows, positions, V] arrays one chunk of the
  student's loss holds for its `rows` distillation rows (SIGNAL_CHUNK_ARRAYS of them); else 0."""
  if signal != opd_signals.FULL_REVERSE_KL:
    return 0.0
  return (SIGNAL_CHUNK_ARRAYS * rows * scored_positions(seq, chunk)
          * _split(mc.vocab_size, tensor) * 4)


def kv_cache_bytes(mc: Qwen3Config, rows: float, slots: int, a: int, tensor: int) -> float:
  """K and V caches of all layers for `rows` sequences of `slots` positions on one device."""
  return rows * 2 * mc.num_layers * _split(mc.num_kv_heads, tensor) * mc.head_dim * slots * a


def rows_per_device(rows_per_branch: int, num_branches: int, mesh_shape: Mapping[str, int]
                    ) -> float:
  """Rows one device works on: its K / branch branches, each split over 'fsdp' if it divides."""
  branches_here = num_branches / mesh_shape['branch']
  return branches_here * _split(rows_per_branch, mesh_shape['fsdp'])


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MemoryPlan:
  """Per-device bytes of one config on one mesh (all numbers are bytes on ONE device, except
  host_peak)."""
  model: Qwen3Config
  model_source: str
  mesh_shape: dict[str, int]
  sampling_mesh_shape: dict[str, int]
  workload: Workload
  leaves: list[LeafPlan]
  gradient_bytes: int
  base_shard_bytes: int     # the base model's params on one device (read at set-up; kept
                            # all run only as the KL reference: `reference_bytes`)
  sampling_param_bytes: int
  activation_bytes: dict[str, float]   # 'grpo', 'opd' (a micro-batch of each step)
  kv_cache_bytes: float
  prefill_bytes: float
  probe_bytes: float                   # the OPD steps' top-k probe (0 without OPD)
  teacher_bytes: float = 0.0           # the OPD step's teacher pass (0 without OPD)
  kv_cache_rows: float = 0.0           # sequences the KV cache holds on a device
  opd_signal_bytes: float = 0.0        # opd.signal's teacher arrays held through the OPD update
  # Qwen3-VL (copd_jax/vision_memory.py): the whole architecture, the patch buckets planned
  # for, and per step ('grpo', 'opd') the tower's activations, deepstack additions and
  # pictures an update holds beside the decoder's (all 0 / None for a text model).
  vl_model: Qwen3VLConfig | None = None
  pictures: vision_memory.PictureLoad | None = None
  vision_train_bytes: dict[str, float] = dataclasses.field(default_factory=dict)
  vision_routed_bytes: float = 0.0     # OPD: the students' packs at their teachers' shards

  @property
  def architecture(self) -> Qwen3Config | Qwen3VLConfig:
    """What the plan was made for: the Qwen3-VL model, or the text decoder alone."""
    return self.vl_model or self.model

  def group_bytes(self, group: str) -> int:
    return sum(leaf.per_device_bytes for leaf in self.leaves if leaf.group == group)

  @property
  def state_bytes(self) -> int:
    return sum(leaf.per_device_bytes for leaf in self.leaves)

  @property
  def reference_bytes(self) -> int:
    """The k3 KL term's reference on one device: the base shard when grpo.kl_coef > 0, else 0
    (the run frees the base params after set-up)."""
    return self.base_shard_bytes if self.workload.reference else 0

  @property
  def train_peak(self) -> float:
    steps = dict(self.activation_bytes)
    for step, extra in self.vision_train_bytes.items():
      steps[step] += extra
    if 'opd' in steps:   # the teachers' signal stays at the student through its update
      steps['opd'] += self.opd_signal_bytes
    return (self.state_bytes + self.gradient_bytes + self.reference_bytes
            + max(*steps.values(), self.teacher_bytes))

  @property
  def sampling_peak(self) -> float:
    return (self.state_bytes + self.reference_bytes + self.sampling_param_bytes
            + self.kv_cache_bytes + self.prefill_bytes)

  @property
  def probe_peak(self) -> float:
    return self.state_bytes + self.reference_bytes + self.probe_bytes

  @property
  def peak(self) -> float:
    return max(self.train_peak, self.sampling_peak, self.probe_peak)

  def host_peak(self, devices_on_host: int) -> float:
    """Bytes of host RAM when `devices_on_host` CPU devices share it: their per-device peaks
    (every device runs the same phase at once; each holds its base shard when it is the KL
    reference)."""
    return devices_on_host * self.peak


def estimate(config, devices: Sequence[jax.Device], prompt_tokens: int,
             model_config: Qwen3Config | Qwen3VLConfig, model_source: str = '',
             patches_per_prompt: int | vision_memory.PromptFrames | None = None) -> MemoryPlan:
  """The MemoryPlan of `config` for a model of architecture `model_config` with the run's mesh
  over `devices` and prompts padded to `prompt_tokens`. A Qwen3-VL model adds the vision terms
  (copd_jax/vision_memory.py) for prompts of these pictures each: PromptFrames (patches in
  frames), or a number of patches taken as one frame (None: the most a prompt of
  `prompt_tokens` tokens can carry, every position a merged visual token; 0: text rows only,
  planned as the smallest patch bucket)."""
  vl = model_config if isinstance(model_config, Qwen3VLConfig) else None
  mc = vl.text if vl else model_config
  work = workload_of(config, prompt_tokens, mc.vocab_size)
  K = work.num_branches
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices, num_branches=K)
  s_mesh = mesh_lib.sampling_mesh(config, devices, K)
  param_dtype = DTYPES[config.model.param_dtype]
  _, params = abstract_params(model_config, param_dtype)
  state = abstract_branch_state(params, K, make_optimizer(config.optimizer))
  shardings = branch_state_shardings(state, mesh,
                                     mesh_lib.param_rules(config.shard_params_over_fsdp))
  leaves = state_leaf_plans(state, shardings)

  param_leaves = [leaf for leaf in leaves if leaf.group == 'params']
  itemsize = jnp.dtype(param_dtype).itemsize
  # A frozen vision tower (model.freeze_vision) gets no gradient (steps._branch_update).
  frozen = vl is not None and bool(config.model.freeze_vision)
  gradients = sum(leaf.per_device_bytes // itemsize * (4 + itemsize) for leaf in param_leaves
                  if not (frozen and leaf.path.startswith('vision.')))
  # The base params as the run reads them (the params' shardings without 'branch',
  # steps.reference_shardings); the peaks count them only as the KL reference.
  base_shard = sum(shard_bytes(leaf.shape[1:], leaf.dtype, NamedSharding(mesh, P(*leaf.spec[1:])))
                   for leaf in param_leaves)
  sampling_sh = mesh_lib.state_shardings(state.params, s_mesh, SAMPLING_RULES, branch_stacked=True)
  sampling_params = sum(leaf.per_device_bytes for leaf in
                        _leaf_rows('params', state.params, sampling_sh))

  a, tensor, chunk = work.compute_bytes, mesh.shape['tensor'], work.logits_chunk
  mesh_shape = dict(mesh.shape)
  activations = {}
  opd_rows = work.native_rows + work.rounds * work.distill_rows
  for step, rows in (('grpo', work.native_rows), ('opd', opd_rows)):
    if step == 'opd' and not work.rounds:
      continue
    per_micro = rows // work.micro_batches
    head_extra = 0.0
    if step == 'opd':
      distill = rows_per_device(work.rounds * work.distill_rows // work.micro_batches, K,
                                mesh_shape)
      head_extra = signal_chunk_bytes(mc, work.opd_signal, distill, work.seq, tensor, chunk)
    activations[step] = train_activation_bytes(
        mc, rows_per_device(per_micro, K, mesh_shape), work.seq, a, tensor, work.remat, chunk,
        work.attention, head_extra)
  signal = 0.0
  if work.rounds:
    signal = signal_held_bytes(mc, work.opd_signal, rows_per_device(opd_rows, K, mesh_shape),
                               work.seq, a, tensor,
                               K / mesh_shape['branch'] * (work.rounds + 1),
                               work.opd_topk)

  s_shape = dict(s_mesh.shape)
  s_tensor = s_shape['tensor']
  sample_rows = max(work.native_rows, work.distill_rows if work.rounds else 0)
  b_s = rows_per_device(sample_rows, K, s_shape)
  kv_rows, prefill_rows, prefill_tokens, staging = b_s, b_s, work.prompt_tokens, 0.0
  engine = EngineSettings.from_config(config)
  # The evaluation's groups of eval.samples_k rows must fit the budget too (one line if not).
  config_checks.check_eval_kv_budget(config, work.prompt_tokens)
  if engine is not None:   # the larger of its GRPO and OPD calls
    calls = [(work.native_rows, config.grpo.group_size)]
    if work.rounds:
      calls.append((work.distill_rows, config.opd.samples_per_prompt))
    # The budget is per branch and device shard; a device runs K / branch branches' engines.
    engines = K / s_shape['branch']
    slots = [(slot_count(engine.kv_token_budget, work.seq,
                         max(int(_split(rows, s_shape['fsdp'])), group), group), group)
             for rows, group in calls]
    kv_rows = engines * max(s for s, _ in slots)
    prefill_rows = engines * max(admission_sizes(engine.prefill_prompts, s, group)[-1]
                                 for s, group in slots)
    if engine.prefill_chunk:
      prefill_tokens = min(prefill_tokens, engine.prefill_chunk)
    staging = kv_cache_bytes(mc, prefill_rows, work.seq, a, s_tensor)
  kv = kv_cache_bytes(mc, kv_rows, work.seq, a, s_tensor)
  prefill = (layer_activation_bytes(mc, prefill_rows, prefill_tokens, a, s_tensor,
                                    work.attention)
             + 2 * prefill_rows * _split(mc.vocab_size, s_tensor) * 4 + staging)
  probe = teacher = 0.0
  if work.rounds:
    b_p = rows_per_device(work.distill_rows, K, mesh_shape)
    probe = forward_pass_bytes(mc, b_p, work.seq, a, tensor, chunk, arrays=3,
                               attention=work.attention)
    b_t = rows_per_device(work.distill_rows // work.micro_batches, K, mesh_shape)
    teacher = forward_pass_bytes(mc, b_t, work.seq, a, tensor, chunk,
                                 attention=work.attention)
  plan = MemoryPlan(mc, model_source, mesh_shape, s_shape, work, leaves, gradients, base_shard,
                    sampling_params, activations, kv, prefill, probe, teacher,
                    kv_cache_rows=kv_rows, opd_signal_bytes=signal)
  if vl is not None:
    if patches_per_prompt is None:
      patches_per_prompt = prompt_bound(vl, prompt_tokens)
    if not isinstance(patches_per_prompt, vision_memory.PromptFrames):
      patches_per_prompt = vision_memory.PromptFrames.one_frame(patches_per_prompt)
    add_vision_terms(plan, config, vl, patches_per_prompt, b_s)
  return plan


def prompt_bound(vl: Qwen3VLConfig, prompt_tokens: int) -> int:
  """The most patches a prompt of `prompt_tokens` tokens can carry: every position a merged
  visual token (what `plan` assumes when the run's data cannot tell)."""
  return vl.vision.merge_unit * prompt_tokens


def add_vision_terms(plan: MemoryPlan, config, vl: Qwen3VLConfig,
                     pictures_per_prompt: vision_memory.PromptFrames, sample_rows: float) -> None:
  """Adds a Qwen3-VL model's terms (copd_jax/vision_memory.py) to `plan`: per step the tower's
  activations on the whole pack, the deepstack additions of a micro-batch and the pictures the
  update holds; the tower's forward in the teacher pass, the top-k probe and the sampler's
  prefill; the students' packs routed to their teachers. Every device of a branch holds its
  whole pack."""
  vc, w, K = vl.vision, plan.workload, plan.workload.num_branches
  vm = vision_memory
  pictures = vm.picture_load(config, pictures_per_prompt)
  a, tensor, seq, D = w.compute_bytes, plan.mesh_shape['tensor'], w.seq, vl.text.hidden_size
  here = K / plan.mesh_shape['branch']   # branches (and so packs) on a device
  S_n, S_d, R = pictures.native, pictures.distill, w.rounds
  # The pictures an update holds: GRPO its native pack; OPD the native (S_n) and distillation
  # (R S_d) packs it is given, the copies routed to the teachers (R S_d) and the joined pack
  # of the update (S_n + R S_d).
  held = {'grpo': vm.pack_bytes(vc, S_n),
          'opd': 2 * vm.pack_bytes(vc, S_n) + 3 * R * vm.pack_bytes(vc, S_d)}
  for step, S, rows in (('grpo', S_n, w.native_rows),
                        ('opd', vm.joined_pack(S_n, *[S_d] * R),
                         w.native_rows + R * w.distill_rows)):
    if step not in plan.activation_bytes:
      continue
    micro = rows_per_device(rows // w.micro_batches, K, plan.mesh_shape)
    plan.vision_train_bytes[step] = (
        here * (vm.tower_train_bytes(vc, S, a, tensor, pictures.frozen, w.remat) + held[step])
        + vm.deepstack_bytes(vc, micro, seq, D, a)
        + vm.row_picture_bytes(rows_per_device(rows, K, plan.mesh_shape), seq))
  if R:
    b_t = rows_per_device(w.distill_rows // w.micro_batches, K, plan.mesh_shape)
    plan.teacher_bytes += (here * vm.tower_forward_bytes(vc, S_d, a, tensor)
                           + vm.deepstack_bytes(vc, b_t, seq, D, a))
    plan.vision_routed_bytes = here * R * vm.pack_bytes(vc, S_d)
    # The top-k probe (edge_topk.py) scores one round's distillation rows as the teacher pass
    # does (steps.encoded_once: the tower forward once on the pack, then chunked_rows), the
    # student on its own pack and the teacher on the student's pack routed to its shard (the
    # R rounds' packs given, one routed copy); the decoder's probe term counts all b_p rows at
    # once, so the deepstack additions and the rows' positions do too.
    b_p = rows_per_device(w.distill_rows, K, plan.mesh_shape)
    plan.probe_bytes += (here * (vm.tower_forward_bytes(vc, S_d, a, tensor)
                                 + (R + 1) * vm.pack_bytes(vc, S_d))
                         + vm.deepstack_bytes(vc, b_p, seq, D, a)
                         + vm.row_picture_bytes(b_p, seq))
  # The sampler's prefill: the tower forward on the larger call's pack, the deepstack
  # additions of the prompt positions.
  s_here = K / plan.sampling_mesh_shape['branch']
  S_s = max((S_n, S_d) if R else (S_n,), key=lambda pack: pack.patches)
  plan.prefill_bytes += (s_here * (vm.tower_forward_bytes(vc, S_s, a,
                                                         plan.sampling_mesh_shape['tensor'])
                                   + vm.pack_bytes(vc, S_s))
                         + vm.deepstack_bytes(vc, sample_rows, w.prompt_tokens, D, a))
  plan.vl_model, plan.pictures = vl, pictures


def phase_fixes(plan: MemoryPlan, shared_host: bool = False) -> dict[str, list[str]]:
  """Per phase ('training', 'sampling', 'the top-k probe'), the settings that lower its peak.
  shared_host: the devices share one host's memory, so more of them does not help."""
  w = plan.workload
  chunk = (f'a smaller grpo.logits_chunk (now {w.logits_chunk})' if w.logits_chunk
           else 'grpo.logits_chunk (now off)')
  chunkable = w.logits_chunk is None or w.logits_chunk > 1
  devices = [] if shared_host else ['more devices on mesh.fsdp / mesh.tensor']
  training = devices + ([chunk] if chunkable else []) + ['a larger grpo.micro_batches']
  if not w.remat:
    training.append('model.remat=True')
  if w.rounds:
    training.append('a smaller opd.prompts_per_step')
  sampling = ([] if shared_host else
              ['a mesh_sampling with a larger tensor axis (the sampler replicates parameters '
               "over 'fsdp')"]) + ['fewer rows per sampling call']
  probe = devices + ([chunk] if chunkable else []) + ['a smaller opd.prompts_per_step']
  return {'training': training, 'sampling': sampling, 'the top-k probe': probe}


def phase_peaks(plan: MemoryPlan) -> dict[str, float]:
  """Per-device peak of each phase, keyed as phase_fixes."""
  return {'training': plan.train_peak, 'sampling': plan.sampling_peak,
          'the top-k probe': plan.probe_peak}
