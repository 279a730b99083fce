"""The `plan` command's memory plan: the per-device estimate of copd_jax/memory_estimate.py
(shapes only, nothing allocated; the formulas are written out there) for the architecture a
config names, and the report the command prints: per-leaf shardings, per-device totals, and
warnings with what to change where a phase will not fit a device's memory or, for CPU devices,
the host's RAM they share.
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from copd_jax import mesh as mesh_lib, vision_memory
from copd_jax.memory_estimate import (  # noqa: F401  (re-exported: the planner's names)
    GIB, LeafPlan, MemoryPlan, PlanError, Workload, abstract_branch_state, abstract_params,
    estimate, forward_pass_bytes, head_activation_bytes, kv_cache_bytes,
    layer_activation_bytes, num_opd_rounds, phase_fixes, phase_peaks, rows_per_device,
    shard_bytes, state_leaf_plans, train_activation_bytes, workload_of)
from copd_jax.models import hf_io, hf_io_vl
from copd_jax.models.presets import MODEL_PRESETS, toy_model_config
from copd_jax.models.toy_vl import toy_vl_model_config
from copd_jax.models.qwen3 import Qwen3, Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VL, Qwen3VLConfig
from copd_jax.optim import make_optimizer
from copd_jax.step_config import StepConfig
from copd_jax.steps import RolloutBatch, branch_state_shardings, make_grpo_step
from copd_jax.vision_batch import PatchPack, VisionBatch


def model_config_of(config) -> tuple[Qwen3Config | Qwen3VLConfig, str]:
  """(architecture, where it came from): source 'hf' reads hf_path/config.json when it exists
  (a Qwen3 or a Qwen3-VL folder), else config.model.preset; source 'toy' uses the built-in
  character model's shape."""
  model = config.model
  if model.source == 'toy':
    return toy_model_config(model.toy), 'toy'
  if model.source == 'toy_vl':
    return toy_vl_model_config(model.toy, model.toy_vision), 'toy_vl'
  if model.hf_path and os.path.isfile(os.path.join(model.hf_path, 'config.json')):
    source = os.path.join(model.hf_path, 'config.json')
    if hf_io_vl.is_vl_folder(model.hf_path):
      return hf_io_vl.read_vl_config(model.hf_path), source
    return hf_io.read_config(model.hf_path), source
  if model.preset:
    return MODEL_PRESETS[model.preset], f'preset {model.preset}'
  raise PlanError(f'config.model.hf_path: no config.json at {model.hf_path!r}; set model.hf_path '
                  f'to a Hugging Face folder or model.preset to one of {", ".join(MODEL_PRESETS)}')

def make_plan(config, devices: Sequence[jax.Device], prompt_tokens: int,
              patches_per_prompt: int | vision_memory.PromptFrames | None = None
              ) -> MemoryPlan:
  """The MemoryPlan of `config` with its mesh over `devices`, for the architecture
  `model_config_of` finds (a Qwen3-VL one's prompts with these pictures each, as `estimate`
  takes them; None: `estimate`'s bound)."""
  mc, source = model_config_of(config)
  return estimate(config, devices, prompt_tokens, mc, source, patches_per_prompt)


def host_memory_bytes() -> float | None:
  """This machine's RAM (MemTotal of /proc/meminfo), None where it cannot be read."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return float(line.split()[1]) * 1024
  except OSError:
    return None
  return None


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def gib(n: float) -> str:
  return f'{n / GIB:.3f} GiB'


def fit_warnings(plan: MemoryPlan, device_memory_bytes: float | None) -> list[str]:
  """One line per phase whose estimated peak exceeds the per-device memory, with what to change."""
  if not device_memory_bytes:
    return []
  fixes = phase_fixes(plan)
  return [f'WARNING: {phase} needs about {gib(need)} per device, more than the '
          f'{gib(device_memory_bytes)} available; try {", ".join(fixes[phase])}'
          for phase, need in phase_peaks(plan).items() if need > device_memory_bytes]


def host_warnings(plan: MemoryPlan, devices_on_host: int, host_bytes: float) -> list[str]:
  """One line per phase whose estimated host RAM (CPU devices: `devices_on_host` per-device
  peaks, each with its base shard when it is the KL reference) exceeds `host_bytes`, with what
  to change."""
  fixes = phase_fixes(plan, shared_host=True)
  out = []
  for phase, need in phase_peaks(plan).items():
    total = devices_on_host * need
    if total > host_bytes:
      out.append(f'WARNING: {phase} needs about {gib(total)} of host RAM ({devices_on_host} '
                 f'CPU devices sharing it), more than the {gib(host_bytes)} available; try '
                 f'{", ".join(fixes[phase])}')
  return out


def format_plan(plan: MemoryPlan, device_memory_bytes: float | None = None,
                leaves: bool = True, host_memory: tuple[int, float] | None = None) -> str:
  """The human-readable report the `plan` command prints. host_memory (devices on the host,
  its RAM in bytes): the devices are CPU devices of one host sharing its RAM."""
  mc, w = plan.model, plan.workload
  lines = [
      f'model: {plan.model_source}: {_params_per_branch(plan):,} parameters per branch '
      f'(L={mc.num_layers}, D={mc.hidden_size}, H={mc.num_heads}, KV={mc.num_kv_heads}, '
      f'hd={mc.head_dim}, F={mc.intermediate_size}, V={mc.vocab_size}, '
      f'tied={mc.tie_word_embeddings})',
      f'branches K={w.num_branches}; training mesh {plan.mesh_shape}; sampling mesh '
      f'{plan.sampling_mesh_shape}',
      f'batch per branch: GRPO {w.native_rows} rows, OPD {w.rounds} round(s) x {w.distill_rows} '
      f'rows, {w.micro_batches} micro-batch(es); T = {w.prompt_tokens} prompt + {w.new_tokens} '
      f'new tokens; remat={w.remat}; logits scored {_chunk_words(w)}',
  ]
  if plan.vl_model is not None:
    vc, pics = plan.vl_model.vision, plan.pictures
    lines.append(
        f'vision tower: depth={vc.depth}, D={vc.hidden_size}, H={vc.num_heads}, '
        f'F={vc.intermediate_size}, patch dim {vc.patch_dim}, deepstack taps '
        f'{list(vc.deepstack_visual_indexes)}, freeze_vision={pics.frozen}; '
        f'{vision_memory.picture_words(pics.prompt)} per prompt: packs GRPO '
        f'{_pack_words(pics.native)}, OPD {_pack_words(pics.distill)} per round')
  if leaves:
    lines += ['', '| group | leaf | shape | dtype | PartitionSpec | per device |',
              '|---|---|---|---|---|---:|']
    for leaf in plan.leaves:
      spec = ', '.join(str(s) for s in leaf.spec)
      lines.append(f'| {leaf.group} | {leaf.path} | {list(leaf.shape)} | {leaf.dtype} | '
                   f'({spec}) | {leaf.per_device_bytes:,} |')
  rows = [('parameters', plan.group_bytes('params')),
          ('optimizer state', plan.group_bytes('opt_state')),
          ('step + rng', plan.group_bytes('step') + plan.group_bytes('rng')),
          ('gradients (fp32 accumulator + one micro-batch)', plan.gradient_bytes)]
  rows.append((reference_words(w), plan.reference_bytes))
  for step, value in plan.activation_bytes.items():
    rows.append((f'activations, {step.upper()} micro-batch (estimate)', value))
  rows += [('sampler parameter copy (SAMPLING_RULES)', plan.sampling_param_bytes),
           (f'KV cache (estimate; {plan.kv_cache_rows:g} rows x {w.seq} tokens: '
            f'sampling.decoder / kv_token_budget)', plan.kv_cache_bytes),
           ('prefill transient (estimate)', plan.prefill_bytes)]
  for step, value in plan.vision_train_bytes.items():
    rows.append((f'Qwen3-VL, {step.upper()} update: vision tower, deepstack, pictures '
                 '(estimate)', value))
  if plan.vision_routed_bytes:
    rows.append(('Qwen3-VL: students\' pictures at the teachers\' shards (in the OPD row)',
                 plan.vision_routed_bytes))
  if plan.opd_signal_bytes:
    rows.append((f'OPD teacher signal at the student (opd.signal={w.opd_signal})',
                 plan.opd_signal_bytes))
  if plan.teacher_bytes:
    rows.append(('OPD teacher pass transient (estimate)', plan.teacher_bytes))
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
  if host_memory:
    devices, host_bytes = host_memory
    need = plan.host_peak(devices)
    base = ' (the KL reference\'s base model shards included)' if w.reference else ''
    lines += ['', f'host RAM (CPU devices share it): {devices} x {gib(plan.peak)} per device'
              f'{base} = {gib(need)}']
    lines += (host_warnings(plan, devices, host_bytes)
              or [f'fits: {gib(need)} of {gib(host_bytes)} host RAM'])
  return '\n'.join(lines)


def reference_words(w: Workload) -> str:
  """The plan's row of the base model's params: on the devices all run only as the k3 KL
  term's reference."""
  if w.reference:
    return 'KL reference: the base model params (grpo.kl_coef > 0)'
  return 'KL reference: none (grpo.kl_coef = 0: the base params are freed after set-up)'


def _params_per_branch(plan: MemoryPlan) -> int:
  """The decoder's count, or a Qwen3-VL model's with its tower (from the planned leaves)."""
  if plan.vl_model is None:
    return plan.model.num_params()
  return sum(int(np.prod(leaf.shape)) for leaf in plan.leaves
             if leaf.group == 'params') // plan.workload.num_branches


def _chunk_words(w: Workload) -> str:
  if w.logits_chunk is None:
    return 'all T positions at once (grpo.logits_chunk off)'
  return f'{w.logits_chunk} positions at a time (grpo.logits_chunk)'


def _pack_words(pack) -> str:
  return f'{pack.patches} patches in {pack.rows} x {pack.length} attention rows'


def per_device_bytes_of_array(x: jax.Array) -> int:
  """Bytes of the largest addressable shard of a concrete array (checks a plan against reality)."""
  return max(int(np.prod(s.data.shape)) * x.dtype.itemsize for s in x.addressable_shards)


def compiled_grpo_step_temp_bytes(model: Qwen3 | Qwen3VL, rows: int, seq: int,
                                  step_config: StepConfig, patches: int = 0,
                                  row_length: int = 0) -> int:
  """Temporary bytes XLA allocates for one compiled GRPO step of `model` (one branch, one
  device, `rows` x `seq` tokens; a Qwen3-VL model's batch with a pack of `patches` patches in
  patches / row_length attention rows of `row_length` (default: one row of the whole pack);
  compiled only, nothing run): the measurement the estimate's formulas are checked against
  (tests/test_plan.py, benchmarks/attention_memory.py)."""
  graphdef, params = nnx.split(model)
  mesh = mesh_lib.make_mesh({'branch': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  adamw = make_optimizer({'learning_rate': 1e-3})
  state = abstract_branch_state(params, 1, adamw)
  shardings = branch_state_shardings(state, mesh)
  s = lambda dtype: jax.ShapeDtypeStruct((1, rows, seq), dtype)
  vision = None
  if isinstance(model, Qwen3VL):
    shape = lambda *tail: jax.ShapeDtypeStruct((1,) + tail, jnp.int32)
    length = row_length or patches
    pack = PatchPack(jax.ShapeDtypeStruct((1, patches, model.config.vision.patch_dim),
                                          jnp.float32), shape(patches, 4),
                     jax.ShapeDtypeStruct((1, patches, 4), jnp.float32), shape(patches, 2),
                     shape(patches), shape(patches // length, length))
    vision = VisionBatch(pack, shape(rows, seq), shape(rows, 3, seq))
  batch = RolloutBatch(s(jnp.int32), s(bool), s(bool), s(jnp.float32), s(jnp.float32), vision)
  step = make_grpo_step(graphdef, adamw, mesh, step_config, shardings)
  return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
