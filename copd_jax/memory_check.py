"""Before the first step, `train` checks that the run fits the memory it can use, and otherwise
stops with one line that says what to change, instead of being killed mid-step with nothing on
screen.

The estimate is the one `plan` prints (copd_jax/memory_estimate.py) for the loaded model, the
run's mesh and its largest prompt bucket (that of its longest prompt: batches are padded to
their own, copd_jax/prompt_buckets.py). A Qwen3-VL model is planned whole, as `plan` plans it:
the vision tower's parameters, Adam moments and gradients (no gradients under
model.freeze_vision), its activations, the deepstack additions and the pictures
(copd_jax/vision_memory.py), every prompt with as many patches as the run's most, in frames as
large as its largest (`largest_pictures`; `plan` takes the same from the config's data). What
it is compared with:
  CPU devices   they share this host's RAM: what the run still has to allocate, the sum of
                this process's devices' peaks (MemoryPlan.host_peak; with grpo.kl_coef > 0
                each with its shard of the base model, the KL reference, read after the check
                straight into its shardings, copd_jax/start_params.py), against MemAvailable
                of /proc/meminfo
  GPU / TPU     one device's peak against the smallest `bytes_limit` of this process's devices
                (`Device.memory_stats()`); not checked where a backend reports none
The estimate leaves out the compiled programs and XLA's fusion temporaries, so passing the check
is no guarantee; failing it means the formulas' terms alone do not fit. Measured on issue 17.3's
run (9.8M parameters, V = 151,936, 2 CPU devices, defaults): the compiled OPD step's temporary
memory is within 3% of the estimate, but the process peaked at 7.8 GiB RSS against a 4.1 GiB
host estimate (the Python / XLA runtime, compiled programs and allocator slack are not in the
formulas), so leave headroom. COPD_JAX_NO_MEMORY_CHECK=1 skips the check (an estimate that is
too high for a setting: report it).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import jax

from copd_jax.errors import UserInputError
from copd_jax.memory_estimate import GIB, MemoryPlan, estimate, phase_fixes, phase_peaks
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.vision_memory import PromptFrames, grid_frames, largest_frames, picture_words

SKIP_ENV = 'COPD_JAX_NO_MEMORY_CHECK'


class MemoryCheckError(UserInputError):
  pass


def _meminfo_kib(path: str, field: str) -> float | None:
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(field + ':'):
          return float(line.split()[1])
  except OSError:
    return None
  return None


def available_host_bytes(meminfo: str = '/proc/meminfo') -> float | None:
  """RAM the run can still allocate: MemAvailable (None off Linux)."""
  free = _meminfo_kib(meminfo, 'MemAvailable')
  return None if free is None else free * 1024


def device_limit_bytes(devices: Sequence[jax.Device]) -> float | None:
  """The smallest memory limit among `devices` (None where a backend reports none)."""
  limits = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:   # backends without memory stats raise or return None
      stats = None
    if not stats or 'bytes_limit' not in stats:
      return None
    limits.append(stats['bytes_limit'])
  return float(min(limits)) if limits else None


def shortfall(plan: MemoryPlan, available: float, host_devices: int = 0) -> str | None:
  """The one-line refusal when the plan does not fit `available` bytes, else None.
  host_devices > 0: that many CPU devices share `available` host RAM the run has yet to
  allocate (with the KL reference, their base shards, loaded after the check); 0: `available`
  is one device's memory."""
  peaks = phase_peaks(plan)
  phase = max(peaks, key=peaks.get)
  if host_devices:
    need = host_devices * peaks[phase]
    base = ', KL reference included' if plan.reference_bytes else ''
    where = (f'more host RAM ({host_devices} CPU device(s) x {peaks[phase] / GIB:.2f} GiB'
             f'{base}) than the {available / GIB:.2f} GiB available (MemAvailable)')
  else:
    need = plan.peak
    where = f'per device, more than the {available / GIB:.2f} GiB a device has'
  if need <= available:
    return None
  fixes = phase_fixes(plan, shared_host=bool(host_devices))[phase]
  return (f'the run would not fit: {phase} needs about {need / GIB:.2f} GiB {where}; try '
          f'{", ".join(fixes)} (`plan` shows every term; {SKIP_ENV}=1 skips this check)')


def largest_pictures(encoder, examples: Sequence) -> PromptFrames:
  """The pictures the memory estimate plans every prompt with: the most patches (images and
  video frames) one of `examples` carries as `encoder` (rollouts.PromptEncoder) prepared it, in
  frames of the largest frame one has (an image, or one temporal patch of a video:
  vision_memory.largest_frames); (0, 0) when none has pictures or the encoder has no vision."""
  if encoder.vision is None:
    return PromptFrames(0, 0)
  pictures = (encoder.pictures(e) for e in examples if e.images or e.video)
  return largest_frames(grid_frames([*p.image_grids, *p.video_grids])
                        for p in pictures if p is not None)


def check_run_fits(config, devices: Sequence[jax.Device], encoder, examples: Sequence,
                   model_config: Qwen3Config | Qwen3VLConfig,
                   log: Callable[[str], None] = print, env: Mapping[str, str] = os.environ
                   ) -> None:
  """`check_fits` for a run: its prompts padded to the encoder's largest bucket; a Qwen3-VL
  `model_config` planned with its tower and every prompt carrying the most patches one of the
  run's `examples` has."""
  pictures = None
  if isinstance(model_config, Qwen3VLConfig):
    pictures = largest_pictures(encoder, examples)
  check_fits(config, devices, encoder.length, model_config, log, env, pictures)


def check_fits(config, devices: Sequence[jax.Device], prompt_tokens: int,
               model_config: Qwen3Config | Qwen3VLConfig, log: Callable[[str], None] = print,
               env: Mapping[str, str] = os.environ,
               patches_per_prompt: int | PromptFrames | None = None) -> None:
  """Raises MemoryCheckError (one line, what to change) when the run's estimate exceeds the
  memory this process can use; logs the comparison otherwise. `devices`: the training mesh's;
  patches_per_prompt: a Qwen3-VL model's pictures per prompt (`estimate`)."""
  if env.get(SKIP_ENV):
    log(f'memory check skipped ({SKIP_ENV} is set)')
    return
  plan = estimate(config, devices, prompt_tokens, model_config,
                  patches_per_prompt=patches_per_prompt)
  here = [d for d in devices if d.process_index == jax.process_index()]
  on_cpu = all(d.platform == 'cpu' for d in here)
  available = available_host_bytes() if on_cpu else device_limit_bytes(here)
  if available is None:
    log('memory check: this backend reports no memory size; not checked (see `plan`)')
    return
  message = shortfall(plan, available, len(here) if on_cpu else 0)
  if message:
    raise MemoryCheckError(message)
  pictures = ''
  if plan.pictures is not None:
    pictures = (f'; Qwen3-VL with its vision tower, '
                f'{picture_words(plan.pictures.prompt)} per prompt')
  if on_cpu:
    log(f'memory: the run adds about {plan.host_peak(len(here)) / GIB:.2f} GiB at its peak '
        f'(estimate{", KL reference included" if plan.reference_bytes else ""}) '
        f'of the {available / GIB:.2f} GiB of host RAM available '
        f'(grpo.logits_chunk: {plan.workload.logits_chunk or "off"}{pictures})')
  else:
    log(f'memory: estimated peak {plan.peak / GIB:.2f} GiB of the {available / GIB:.2f} GiB a '
        f'device has (grpo.logits_chunk: {plan.workload.logits_chunk or "off"}{pictures})')
