"""Per-device memory plan of a run config on a given set of devices, computed from shapes only.

Nothing is allocated: the model is built with `nnx.eval_shape`, the branch state with
`jax.eval_shape` of the same stacking and optimizer init as `steps.init_branch_state`, and every
leaf's PartitionSpec comes from `steps.branch_state_shardings` (the shardings the train steps
declare). A leaf's per-device bytes are its shard shape (`NamedSharding.shard_shape`) times its
item size, so sharded state is exact; activations and the KV cache are formula estimates:

Notation: L layers, D hidden, H / Kv query / KV heads, hd head_dim, F MLP width, V vocab; a the
compute-dtype bytes; t the 'tensor' axis size, applied to heads / MLP / vocab only where it
divides them; b rows on one device (rows of a micro-batch / 'fsdp' when that divides them,
times the K / mesh.branch branches a device holds, since branches are vmapped); T tokens per row.

  training activations, per layer (saved for the backward pass):
    per token   a * (4 D + (4 H hd + 4 Kv hd + 3 F) / t)
                (layer input, two norm outputs, residual; q / k projected, normed, rotated and
                the attention output; v; MLP gate, up and their product)
                + 4 * (4 D + (3 H hd + 3 Kv hd + F) / t)
                (the fp32 internals of the RMS norms, q / k norms and RoPE, and the SiLU)
    attention   b * H/t * T^2 * (4 + a)   (fp32 scores and the probabilities)
    layer(b, T) = b T * per_token + attention
  output head:    head(b, T) = 4 * b T V/t * 4  (fp32 logits, log-softmax, probabilities and
                  their product for the entropy)
  without remat:  L * layer(b, T) + head(b, T)  (every layer's activations live while the head
                  runs)
  with remat:     L * b T D a + max(layer(b, T), head(b, T))  (each layer's input; the head's
                  arrays are freed before the layers' backward recomputes one layer at a time)
  gradients:      per device, params' element count * (4 + param bytes): the fp32 micro-batch
                  accumulator and one micro-batch's gradient
  KV cache:       b_s * 2 L Kv/t hd S * a  (b_s sampled rows on a device, S = prompt + new tokens)
  prefill:        layer(b_s, P) + 2 b_s V/t * 4 for the P prompt tokens (transient, one layer)
  top-k probe:    layer(b_p, T) + 2 * b_p T V/t * 4: the behavioural metrics
                  (`steps.make_edge_topk`) score a round's b_p distillation rows in one pass
                  (fp32 logits and log-softmax), not micro-batched

Calibration: against XLA:CPU's `memory_analysis().temp_size_in_bytes` of the compiled GRPO step
(fp32, one device) the layer, head and remat terms agree within a few percent
(tests/test_plan.py checks 10%). bf16 activations are as XLA:GPU/TPU store them; XLA:CPU keeps
them in fp32.

Training peak = state + gradients (+ reference params when grpo.kl_coef > 0) + activations of
the larger of the GRPO and OPD batches; sampling peak = state (+ reference) + the sampler's
parameter copy (parameters resharded by `sampling.SAMPLING_RULES` on the sampling mesh: 'embed'
is not split over 'fsdp') + KV cache + prefill; probe peak = state (+ reference) + top-k probe. Not counted: XLA temporaries and fusion
buffers, the compiled programs, host memory.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from copd_jax import mesh as mesh_lib
from copd_jax.errors import UserInputError
from copd_jax.models import hf_io
from copd_jax.models.presets import DTYPES, QWEN3_PRESETS, toy_model_config
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.optim import make_optimizer
from copd_jax.sampling import SAMPLING_RULES
from copd_jax.steps import branch_state_init, branch_state_shardings
from copd_jax.topology import topology_from_config

GIB = 2 ** 30


class PlanError(UserInputError):
  pass


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def model_config_of(config) -> tuple[Qwen3Config, str]:
  """(architecture, where it came from): source 'hf' reads hf_path/config.json when it exists,
  else config.model.preset; source 'toy' uses the built-in character model's shape."""
  model = config.model
  if model.source == 'toy':
    return toy_model_config(model.toy), 'toy'
  if model.hf_path and os.path.isfile(os.path.join(model.hf_path, 'config.json')):
    return hf_io.read_config(model.hf_path), os.path.join(model.hf_path, 'config.json')
  if model.preset:
    return QWEN3_PRESETS[model.preset], f'preset {model.preset}'
  raise PlanError(f'config.model.hf_path: no config.json at {model.hf_path!r}; set model.hf_path '
                  f'to a Hugging Face folder or model.preset to one of {", ".join(QWEN3_PRESETS)}')


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
  reference: bool        # grpo.kl_coef > 0: a frozen reference copy of the params

  @property
  def seq(self) -> int:
    return self.prompt_tokens + self.new_tokens


def num_opd_rounds(config) -> int:
  """R of the OPD step: the rounds of the run's topology (0 when there are no OPD steps)."""
  if not config.copd.s_opd:
    return 0
  return len(topology_from_config(config).rounds())


def workload_of(config, prompt_tokens: int) -> Workload:
  if prompt_tokens < 1:
    raise PlanError(f'--prompt-tokens must be a positive integer, got {prompt_tokens}')
  return Workload(
      num_branches=len(config.branches),
      native_rows=config.grpo.prompts_per_step * config.grpo.group_size,
      distill_rows=config.opd.prompts_per_step * config.opd.samples_per_prompt,
      rounds=num_opd_rounds(config), prompt_tokens=prompt_tokens,
      new_tokens=config.sampling.max_new_tokens, micro_batches=config.grpo.micro_batches,
      compute_bytes=jnp.dtype(DTYPES[config.model.compute_dtype]).itemsize,
      remat=bool(config.model.remat), reference=config.grpo.kl_coef > 0)


# ---------------------------------------------------------------------------------------------
# Abstract state and per-leaf shardings
# ---------------------------------------------------------------------------------------------

def abstract_params(model_config: Qwen3Config, param_dtype=jnp.float32) -> tuple[Any, nnx.State]:
  """(graphdef, params of ShapeDtypeStruct leaves) of one model; nothing allocated."""
  model = nnx.eval_shape(lambda: Qwen3(model_config, rngs=nnx.Rngs(0), param_dtype=param_dtype))
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


def layer_activation_bytes(mc: Qwen3Config, rows: float, seq: int, a: int, tensor: int) -> float:
  """Saved activations of one decoder layer for `rows` sequences of `seq` tokens on one device."""
  # Widths of the q / kv projections and the MLP on one device ('tensor' splits heads / F).
  H = _split(mc.num_heads, tensor) * mc.head_dim
  Kv = _split(mc.num_kv_heads, tensor) * mc.head_dim
  D, F = mc.hidden_size, _split(mc.intermediate_size, tensor)
  compute = a * (4 * D + 4 * H + 4 * Kv + 3 * F)
  fp32 = 4 * (4 * D + 3 * H + 3 * Kv + F)
  attention = rows * _split(mc.num_heads, tensor) * seq * seq * (4 + a)
  return rows * seq * (compute + fp32) + attention


def head_activation_bytes(mc: Qwen3Config, rows: float, seq: int, tensor: int) -> float:
  """The output head's fp32 [rows, seq, V] arrays kept for the backward pass."""
  return 4 * rows * seq * _split(mc.vocab_size, tensor) * 4


def train_activation_bytes(mc: Qwen3Config, rows: float, seq: int, a: int, tensor: int,
                           remat: bool) -> float:
  """Activations of one micro-batch's forward + backward on one device (layers + output head)."""
  layer = layer_activation_bytes(mc, rows, seq, a, tensor)
  head = head_activation_bytes(mc, rows, seq, tensor)
  if remat:
    return mc.num_layers * rows * seq * mc.hidden_size * a + max(layer, head)
  return mc.num_layers * layer + head


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
  """Per-device bytes of one config on one mesh (all numbers are bytes on ONE device)."""
  model: Qwen3Config
  model_source: str
  mesh_shape: dict[str, int]
  sampling_mesh_shape: dict[str, int]
  workload: Workload
  leaves: list[LeafPlan]
  gradient_bytes: int
  reference_bytes: int
  sampling_param_bytes: int
  activation_bytes: dict[str, float]   # 'grpo', 'opd' (a micro-batch of each step)
  kv_cache_bytes: float
  prefill_bytes: float
  probe_bytes: float                   # the OPD steps' top-k probe (0 without OPD)

  def group_bytes(self, group: str) -> int:
    return sum(leaf.per_device_bytes for leaf in self.leaves if leaf.group == group)

  @property
  def state_bytes(self) -> int:
    return sum(leaf.per_device_bytes for leaf in self.leaves)

  @property
  def train_peak(self) -> float:
    return (self.state_bytes + self.gradient_bytes + self.reference_bytes
            + max(self.activation_bytes.values()))

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


def make_plan(config, devices: Sequence[jax.Device], prompt_tokens: int) -> MemoryPlan:
  """The MemoryPlan of `config` with its mesh over `devices`."""
  mc, source = model_config_of(config)
  work = workload_of(config, prompt_tokens)
  K = work.num_branches
  mesh = mesh_lib.make_mesh(config.mesh, devices=devices, num_branches=K)
  s_mesh = mesh_lib.sampling_mesh(config, devices, K)
  param_dtype = DTYPES[config.model.param_dtype]
  _, params = abstract_params(mc, param_dtype)
  state = abstract_branch_state(params, K, make_optimizer(config.optimizer))
  shardings = branch_state_shardings(state, mesh,
                                     mesh_lib.param_rules(config.shard_params_over_fsdp))
  leaves = state_leaf_plans(state, shardings)

  param_leaves = [leaf for leaf in leaves if leaf.group == 'params']
  itemsize = jnp.dtype(param_dtype).itemsize
  gradients = sum(leaf.per_device_bytes // itemsize * (4 + itemsize) for leaf in param_leaves)
  reference = 0
  if work.reference:  # one unstacked copy, the params' shardings without 'branch'
    reference = sum(shard_bytes(leaf.shape[1:], leaf.dtype,
                                NamedSharding(mesh, P(*leaf.spec[1:])))
                    for leaf in param_leaves)
  sampling_sh = mesh_lib.state_shardings(state.params, s_mesh, SAMPLING_RULES, branch_stacked=True)
  sampling_params = sum(leaf.per_device_bytes for leaf in
                        _leaf_rows('params', state.params, sampling_sh))

  a, tensor = work.compute_bytes, mesh.shape['tensor']
  mesh_shape = dict(mesh.shape)
  activations = {}
  for step, rows in (('grpo', work.native_rows),
                     ('opd', work.native_rows + work.rounds * work.distill_rows)):
    if step == 'opd' and not work.rounds:
      continue
    per_micro = rows // work.micro_batches
    activations[step] = train_activation_bytes(
        mc, rows_per_device(per_micro, K, mesh_shape), work.seq, a, tensor, work.remat)

  s_shape = dict(s_mesh.shape)
  s_tensor = s_shape['tensor']
  sample_rows = max(work.native_rows, work.distill_rows if work.rounds else 0)
  b_s = rows_per_device(sample_rows, K, s_shape)
  kv = kv_cache_bytes(mc, b_s, work.seq, a, s_tensor)
  prefill = (layer_activation_bytes(mc, b_s, work.prompt_tokens, a, s_tensor)
             + 2 * b_s * _split(mc.vocab_size, s_tensor) * 4)
  probe = 0.0
  if work.rounds:
    b_p = rows_per_device(work.distill_rows, K, mesh_shape)
    probe = (layer_activation_bytes(mc, b_p, work.seq, a, tensor)
             + 2 * b_p * work.seq * _split(mc.vocab_size, tensor) * 4)
  return MemoryPlan(mc, source, mesh_shape, s_shape, work, leaves, gradients, reference,
                    sampling_params, activations, kv, prefill, probe)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def gib(n: float) -> str:
  return f'{n / GIB:.3f} GiB'


def fit_warnings(plan: MemoryPlan, device_memory_bytes: float | None) -> list[str]:
  """One line per phase whose estimated peak exceeds the per-device memory, with what to change."""
  if not device_memory_bytes:
    return []
  train_fixes = ['more devices on mesh.fsdp / mesh.tensor']
  if not plan.workload.remat:
    train_fixes.append('model.remat=True')
  train_fixes.append('a larger grpo.micro_batches')
  sample_fixes = ['a mesh_sampling with a larger tensor axis (the sampler replicates parameters '
                  "over 'fsdp')", 'fewer rows per sampling call']
  out = []
  probe_fixes = ['more devices on mesh.fsdp / mesh.tensor', 'fewer opd rows per step']
  for phase, need, fixes in (('training', plan.train_peak, train_fixes),
                             ('sampling', plan.sampling_peak, sample_fixes),
                             ('the top-k probe', plan.probe_peak, probe_fixes)):
    if need > device_memory_bytes:
      out.append(f'WARNING: {phase} needs about {gib(need)} per device, more than the '
                 f'{gib(device_memory_bytes)} available; try {", ".join(fixes)}')
  return out


def format_plan(plan: MemoryPlan, device_memory_bytes: float | None = None,
                leaves: bool = True) -> str:
  """The human-readable report the `plan` command prints."""
  mc, w = plan.model, plan.workload
  lines = [
      f'model: {plan.model_source}: {mc.num_params():,} parameters per branch '
      f'(L={mc.num_layers}, D={mc.hidden_size}, H={mc.num_heads}, KV={mc.num_kv_heads}, '
      f'hd={mc.head_dim}, F={mc.intermediate_size}, V={mc.vocab_size}, '
      f'tied={mc.tie_word_embeddings})',
      f'branches K={w.num_branches}; training mesh {plan.mesh_shape}; sampling mesh '
      f'{plan.sampling_mesh_shape}',
      f'batch per branch: GRPO {w.native_rows} rows, OPD {w.rounds} round(s) x {w.distill_rows} '
      f'rows, {w.micro_batches} micro-batch(es); T = {w.prompt_tokens} prompt + {w.new_tokens} '
      f'new tokens; remat={w.remat}',
  ]
  if leaves:
    lines += ['', f'| group | leaf | shape | dtype | PartitionSpec | per device |',
              '|---|---|---|---|---|---:|']
    for leaf in plan.leaves:
      spec = ', '.join(str(s) for s in leaf.spec)
      lines.append(f'| {leaf.group} | {leaf.path} | {list(leaf.shape)} | {leaf.dtype} | '
                   f'({spec}) | {leaf.per_device_bytes:,} |')
  rows = [('parameters', plan.group_bytes('params')),
          ('optimizer state', plan.group_bytes('opt_state')),
          ('step + rng', plan.group_bytes('step') + plan.group_bytes('rng')),
          ('gradients (fp32 accumulator + one micro-batch)', plan.gradient_bytes)]
  if plan.reference_bytes:
    rows.append(('reference params (kl_coef > 0)', plan.reference_bytes))
  for step, value in plan.activation_bytes.items():
    rows.append((f'activations, {step.upper()} micro-batch (estimate)', value))
  rows += [('sampler parameter copy (SAMPLING_RULES)', plan.sampling_param_bytes),
           ('KV cache (estimate)', plan.kv_cache_bytes),
           ('prefill transient (estimate)', plan.prefill_bytes)]
  if plan.probe_bytes:
    rows.append(('top-k probe transient (estimate)', plan.probe_bytes))
  rows += [('peak while training', plan.train_peak), ('peak while sampling', plan.sampling_peak)]
  if plan.probe_bytes:
    rows.append(('peak during the top-k probe', plan.probe_peak))
  lines += ['', '| per device | bytes | GiB |', '|---|---:|---:|']
  lines += [f'| {name} | {int(value):,} | {value / GIB:.3f} |' for name, value in rows]
  if device_memory_bytes:
    lines.append('')
    warnings = fit_warnings(plan, device_memory_bytes)
    lines += warnings or [f'fits: peak {gib(plan.peak)} of {gib(device_memory_bytes)} per device']
  return '\n'.join(lines)


def per_device_bytes_of_array(x: jax.Array) -> int:
  """Bytes of the largest addressable shard of a concrete array (checks a plan against reality)."""
  return max(int(np.prod(s.data.shape)) * x.dtype.itemsize for s in x.addressable_shards)
