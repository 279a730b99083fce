"""`python -m copd_jax plan --config FILE --devices N [--device-memory-gb G] [--cpu]
[--host-memory-gb G] [--layouts] [--patches-per-prompt N] [--config.a.b=v ...]`

Per-device memory of a run config on an N-device mesh, from shapes only (nothing is allocated):
parameters, optimizer state, gradients, the sampler's parameter copy and KV cache, activation
estimates, and each state leaf's PartitionSpec (formulas: copd_jax/memory_estimate.py); then the
disk space of the run's checkpoints under its retention settings (copd_jax/retention.py). It
first prints the layout the config's mesh resolves to on N devices (chosen for -1 sizes,
copd_jax.mesh.LAYOUT_RULE); --layouts adds every valid layout with its per-device peaks
(copd_jax/layout_plan.py). Data files
and model.hf_path need not exist: without a config.json the architecture is model.preset.
Prompts are padded to --prompt-tokens; without it, to the bucket `train` pads the run's prompts
to (`run_prompts`: the config's domains loaded and encoded as `train` does, data.max_prompt_tokens
applied, the built-in synthetic_vision pictures rendered, file rows' images and videos
checked), and where the data or the model's tokenizer cannot be read here (a path that does not
exist yet, a preset without a folder) to the bucket of data.max_prompt_tokens, else 256 tokens;
its `prompts:` line says which.
A Qwen3-VL model adds its vision tower and pictures (copd_jax/vision_memory.py) for prompts of
--patches-per-prompt patches each (in --frames-per-prompt frames; default one). Without it the
pictures are the run's own, as `train`'s memory check takes them (memory_check.largest_pictures:
the most patches a row's pictures have after transformers' processors, in frames as large as
the largest frame, a video's frame being one temporal patch), prepared with the model's
processors (model.source 'toy_vl', or a local Qwen3-VL folder at model.hf_path). Where they
cannot be read (as above, or videos without torchvision), the plan falls back to the most a
padded prompt can carry, and its `pictures:` line says which.
With --cpu (or --host-memory-gb) the N devices are CPU devices of one host: they share its RAM,
so the plan adds up their peaks (with grpo.kl_coef > 0, each holding its shard of the base
model, the KL reference) and compares the sum with --host-memory-gb, default this machine's
MemTotal.

The plan runs on N CPU devices (--xla_force_host_platform_device_count); per-device bytes do not
depend on the platform. XLA reads that flag once, when jax starts, so when this process's jax
already runs with another device count the command re-runs itself in a fresh interpreter.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

ACCEPTS_EXTRA = True  # --config.a.b=value overrides

_CHILD_ENV = 'COPD_JAX_PLAN_CHILD'
_DEVICE_FLAG = '--xla_force_host_platform_device_count'
# Largest --devices: above the biggest TPU slices (8,960 chips); each is a CPU host device here.
MAX_DEVICES = 10_240
# Prompt length planned for when neither --prompt-tokens, the run's data nor
# data.max_prompt_tokens says.
DEFAULT_PROMPT_TOKENS = 256


def add_arguments(parser) -> None:
  parser.add_argument('--config', required=True, help='config file (configs/*.py)')
  parser.add_argument('--devices', type=int, required=True, help='number of devices N')
  parser.add_argument('--device-memory-gb', type=float, default=None,
                      help='memory of one device in GiB; warns when a phase will not fit')
  parser.add_argument('--cpu', action='store_true',
                      help="plan for CPU devices of one host: count the host RAM they share")
  parser.add_argument('--host-memory-gb', type=float, default=None,
                      help="RAM of that host in GiB (implies --cpu; default: this machine's)")
  parser.add_argument('--prompt-tokens', type=int, default=None,
                      help='padded prompt length (a sampler bucket: a power of two); default: '
                           'the bucket train pads the run\'s prompts to when its data and '
                           'tokenizer are readable here, else that of data.max_prompt_tokens '
                           'when set, else 256')
  parser.add_argument('--patches-per-prompt', type=int, default=None,
                      help='Qwen3-VL: patches of one prompt\'s images and video frames (an '
                           'H x W image is H/16 x W/16 of them, a video of T frames T/2 x that); '
                           'default: the largest of the run\'s data (as train\'s memory check), '
                           'else 4 x the prompt tokens, the most a padded prompt can carry')
  parser.add_argument('--frames-per-prompt', type=int, default=None,
                      help='Qwen3-VL: the --patches-per-prompt patches in this many frames of '
                           'equal size, each attending on its own (a video: its frames / 2 '
                           'temporal patches); default 1, the largest attention they can need')
  parser.add_argument('--no-leaves', action='store_true', help='omit the per-leaf table')
  parser.add_argument('--layouts', action='store_true',
                      help='also list every valid (branch, fsdp, tensor) layout with its '
                           'per-device peaks')


def cpu_env(num_devices: int, env: dict[str, str]) -> dict[str, str]:
  """`env` with JAX on CPU and exactly `num_devices` host devices."""
  flags = re.sub(rf'{_DEVICE_FLAG}=\S+', '', env.get('XLA_FLAGS', '')).strip()
  out = dict(env)
  out['XLA_FLAGS'] = f'{flags} {_DEVICE_FLAG}={num_devices}'.strip()
  out['JAX_PLATFORMS'] = 'cpu'
  return out


def _argv(args) -> list[str]:
  argv = ['plan', '--config', args.config, '--devices', str(args.devices)]
  if args.prompt_tokens is not None:
    argv += ['--prompt-tokens', str(args.prompt_tokens)]
  if args.device_memory_gb is not None:
    argv += ['--device-memory-gb', str(args.device_memory_gb)]
  if args.cpu:
    argv.append('--cpu')
  if args.host_memory_gb is not None:
    argv += ['--host-memory-gb', str(args.host_memory_gb)]
  if args.patches_per_prompt is not None:
    argv += ['--patches-per-prompt', str(args.patches_per_prompt)]
  if args.frames_per_prompt is not None:
    argv += ['--frames-per-prompt', str(args.frames_per_prompt)]
  if args.no_leaves:
    argv.append('--no-leaves')
  if args.layouts:
    argv.append('--layouts')
  return argv + list(args.extra)


def run(args) -> int:
  from copd_jax.memory_plan import PlanError
  bad = [a for a in args.extra if not a.startswith('--config.')]
  if bad:
    raise PlanError(f'unrecognized arguments: {" ".join(bad)} (overrides look like '
                    '--config.section.field=value)')
  if not 1 <= args.devices <= MAX_DEVICES:
    raise PlanError(f'--devices must be an integer in [1, {MAX_DEVICES:,}], got {args.devices:,} '
                    '(the plan starts that many CPU host devices: about 1 GiB of memory and a '
                    'minute per 8,192)')
  if args.patches_per_prompt is not None and args.patches_per_prompt < 1:
    raise PlanError(f'--patches-per-prompt must be a positive integer, got '
                    f'{args.patches_per_prompt}')
  if args.frames_per_prompt is not None:
    if args.patches_per_prompt is None:
      raise PlanError('--frames-per-prompt needs --patches-per-prompt (the patches it splits)')
    if not 1 <= args.frames_per_prompt <= args.patches_per_prompt:
      raise PlanError(f'--frames-per-prompt must be an integer in [1, --patches-per-prompt = '
                      f'{args.patches_per_prompt}], got {args.frames_per_prompt}')
  if 'jax' not in sys.modules:
    os.environ.update(cpu_env(args.devices, dict(os.environ)))
  import jax
  if jax.default_backend() != 'cpu' or jax.device_count() != args.devices:
    if os.environ.get(_CHILD_ENV):
      raise PlanError(f'could not start JAX with {args.devices} CPU devices '
                      f'(got {jax.device_count()} on {jax.default_backend()})')
    env = cpu_env(args.devices, {**os.environ, _CHILD_ENV: '1'})
    return subprocess.run([sys.executable, '-m', 'copd_jax'] + _argv(args), env=env).returncode

  # Imported here, not at the top: they import jax, which must start after XLA_FLAGS is set.
  from copd_jax.config import load_config
  from copd_jax.memory_plan import (GIB, format_plan, host_memory_bytes, make_plan,
                                    model_config_of)
  from copd_jax.models.qwen3_vl import Qwen3VLConfig
  from copd_jax import mesh as mesh_lib
  config = load_config(args.config, args.extra, check_files=False)
  for line in mesh_lib.layout_lines(config, args.devices):
    print(f'layout: {line}')
  architecture, _ = model_config_of(config)
  vl = isinstance(architecture, Qwen3VLConfig)
  prompts, problem = None, ''
  if args.prompt_tokens is None or (vl and args.patches_per_prompt is None):
    prompts, problem = run_prompts(config)
  prompt_tokens, words = planned_prompt_tokens(config, args, prompts, problem)
  print(f'prompts: {words}')
  pictures = None
  if vl:
    pictures, words = planned_pictures(config, args, architecture, prompt_tokens, prompts,
                                       problem)
    print(f'pictures: {words}')
  plan = make_plan(config, jax.devices(), prompt_tokens, pictures)
  memory = args.device_memory_gb * GIB if args.device_memory_gb else None
  host = None
  if args.cpu or args.host_memory_gb is not None:
    host_bytes = args.host_memory_gb * GIB if args.host_memory_gb else host_memory_bytes()
    if not host_bytes:
      raise PlanError('--cpu: cannot read this machine\'s RAM (/proc/meminfo); pass '
                      '--host-memory-gb')
    host = (args.devices, host_bytes)
  print(format_plan(plan, memory, leaves=not args.no_leaves, host_memory=host))
  if args.layouts:
    from copd_jax.layout_plan import format_layouts, layout_rows
    print('\n' + format_layouts(layout_rows(config, jax.devices(), prompt_tokens,
                                             plan.architecture, pictures)))
  from copd_jax.retention import disk_plan, format_disk_plan
  state_bytes = sum(leaf.total_bytes for leaf in plan.leaves)
  print('\n' + format_disk_plan(disk_plan(config, state_bytes), config.checkpoint))
  return 0


def run_prompts(config):
  """((the run's PromptEncoder, its examples), '') as `train` prepares them: its domains loaded
  (run_setup.load_domains) and encoded (run_setup.prompt_encoder: data.max_prompt_tokens
  applied, every prompt checked, the encoder's length fixed to the bucket of the longest one,
  which train pads to and its memory check plans for); (None, why not) where the data or the
  model's tokenizer / processors cannot be read here (a path that does not exist yet, a preset
  without a folder, videos without torchvision)."""
  from copd_jax import run_setup
  from copd_jax.errors import UserInputError
  model = config.model
  if model.source == 'hf' and not os.path.isdir(model.hf_path):
    return None, (f'model.hf_path {model.hf_path!r} is not a local folder, whose tokenizer '
                  'would encode them')
  try:
    domains = run_setup.load_domains(config)
    encoder, domains = run_setup.prompt_encoder(config, domains, log=lambda _: None)
  except UserInputError as e:
    return None, str(e)
  return (encoder, [e for split in domains.values() for part in split for e in part]), ''


def planned_prompt_tokens(config, args, prompts, problem: str) -> tuple[int, str]:
  """(the padded prompt length the plan takes, the `prompts:` line saying where it comes from):
  --prompt-tokens, else the bucket train pads the run's prompts to (`run_prompts`), else the
  bucket of data.max_prompt_tokens, else DEFAULT_PROMPT_TOKENS."""
  from copd_jax.rollouts import bucket_length
  if args.prompt_tokens is not None:
    return args.prompt_tokens, f'{args.prompt_tokens} tokens (--prompt-tokens)'
  if prompts is not None:
    n = prompts[0].length
    return n, (f'{n} tokens, the bucket of the run\'s longest prompt as train pads it '
               '(--prompt-tokens sets another)')
  limit = config.data.max_prompt_tokens
  n = bucket_length(limit) if limit else DEFAULT_PROMPT_TOKENS
  source = f'the bucket of data.max_prompt_tokens={limit}' if limit else 'a default'
  return n, (f'{n} tokens, {source}: the run\'s prompts are unknown here ({problem}); '
             '--prompt-tokens sets another')


def planned_pictures(config, args, vl, prompt_tokens: int, prompts, problem: str):
  """(the pictures per prompt a Qwen3-VL plan takes, the `pictures:` line saying where they come
  from): the flags', else the largest of the run's prompts (`run_prompts`) as train's memory
  check takes them (memory_check.largest_pictures), else the most a padded prompt can carry."""
  from copd_jax import memory_check, vision_memory as vm
  from copd_jax.memory_estimate import prompt_bound
  if args.patches_per_prompt is not None:
    frames = args.frames_per_prompt or 1
    pictures = vm.PromptFrames(args.patches_per_prompt, -(-args.patches_per_prompt // frames))
    flags = ' / --frames-per-prompt' if args.frames_per_prompt else ''
    return pictures, f'{vm.picture_words(pictures)} per prompt (--patches-per-prompt{flags})'
  if prompts is not None:
    pictures = memory_check.largest_pictures(*prompts)
    if not pictures.patches:
      return pictures, 'none in the run\'s data (text rows only; --patches-per-prompt plans some)'
    return pictures, (f'{vm.picture_words(pictures)} per prompt, the largest of the run\'s data '
                      'as train\'s memory check takes them (--patches-per-prompt sets others)')
  bound = prompt_bound(vl, prompt_tokens)
  return bound, (f'{bound} patches per prompt in one frame, the most a padded prompt of '
                 f'{prompt_tokens} tokens can carry: the run\'s pictures are unknown here '
                 f'({problem}); --patches-per-prompt sets them')
