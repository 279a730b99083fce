"""Static checks of a run config, before any compute.

Each section the code turns into an object is checked by building that object, which checks
its own fields: grpo / opd / sampling.temperature / copd.freeze -> `StepConfig`, sampling ->
`SamplingParams`, optimizer -> the optax optimizer, mesh / mesh_sampling -> the meshes,
copd's topology fields -> `Topology`, model.toy -> the toy model's `Qwen3Config`, merge ->
`MergeRecipe`. What no object owns (data sources, schedule, guard, logging) and the rules that
span sections (batch rows that micro_batches must divide) are checked here. Every error names the config field.
"""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import ml_collections

from copd_jax import mesh as mesh_lib
from copd_jax.answers import EXTRACTIONS
from copd_jax.data.domain import REWARD_KINDS, is_reward_name
from copd_jax.data.prompt_limit import LONG_PROMPT_POLICIES
from copd_jax.data.synthetic_vision import SYNTHETIC_VISION_DOMAINS
from copd_jax.errors import ConfigError, UserInputError
from copd_jax.fields import Fields, is_int
from copd_jax.merge import MergeRecipe
from copd_jax.models import hub
from copd_jax.models.attention import IMPLEMENTATIONS
from copd_jax.models.tokenizer import char_vocab_size
from copd_jax.models.presets import DTYPES, MODEL_PRESETS, toy_model_config
from copd_jax.models.toy_vl import toy_vl_model_config
from copd_jax.optim import make_optimizer
from copd_jax.rollouts import PROMPT_BUCKETS
from copd_jax.sampling import SamplingParams
from copd_jax.sampling.engine import EngineSettings
from copd_jax.step_config import StepConfig
from copd_jax.topology import KINDS, parse_edges, topology_from_config

TOPOLOGIES = KINDS + ('none',)
MERGE_METHODS = ('mean', 'task_arithmetic', 'ties', 'dare', 'none')
WANDB_MISSING = ('config.metrics.wandb: True needs the wandb package (pip install wandb), which '
                 'is not installed; or set config.metrics.wandb=False')

# check.<rule>('section.field', value, ...) raises 'config.section.field: <why>'.
check = Fields('config')
SHORTEST_PROMPT_BUCKET = PROMPT_BUCKETS[0]   # the fewest prompt tokens a sampling call has


def _check_observability(config) -> None:
  """Periodic evaluation, sample logging and the optional W&B logger. wandb is no dependency:
  asking for it without the package stops here, before any compute."""
  check.positive_int('eval.every_steps', config.eval.every_steps, allow_zero=True)
  check.positive_int('metrics.samples_every', config.metrics.samples_every, allow_zero=True)
  check.positive_int('metrics.samples_per_branch', config.metrics.samples_per_branch)
  check.typed('metrics.wandb', config.metrics.wandb, bool)
  check.check(isinstance(config.metrics.wandb_project, str) and config.metrics.wandb_project != '',
              'metrics.wandb_project', f'must be a non-empty string, got '
              f'{config.metrics.wandb_project!r}')
  if config.metrics.wandb and importlib.util.find_spec('wandb') is None:
    raise ConfigError(WANDB_MISSING)


def branch_domains(config) -> list[list[str]]:
  """Per branch, the domain names it trains on ('a+b' in config.branches means mixed data)."""
  return [[d.strip() for d in spec.split('+')] for spec in config.branches]


def validate(config: ml_collections.ConfigDict, check_files: bool = True) -> None:
  """All static checks of a run config. Raises ConfigError naming the first bad field.
  check_files=False skips the existence checks of data files, model.hf_path and branch_init."""
  _check_data(config, check_files)
  _check_model(config, check_files)
  _check_copd(config)
  SamplingParams.from_config(config)
  EngineSettings.from_config(config)
  StepConfig.from_config(config)
  _check_batches(config)
  make_optimizer(config.optimizer)
  check.positive_int('cpu_devices', config.cpu_devices, allow_zero=True)
  check.typed('shard_params_over_fsdp', config.shard_params_over_fsdp, bool)
  mesh_lib.check_mesh_config(config, jax.device_count())
  for field in ('eval.num_examples', 'eval.samples_k', 'metrics.log_every',
                'metrics.overlap_top_k', 'checkpoint.every_steps'):
    check.positive_int(field, _get(config, field))
  check_eval_kv_budget(config, SHORTEST_PROMPT_BUCKET)
  _check_observability(config)
  _check_checkpoint_retention(config)
  check.positive_int('seed', config.seed, allow_zero=True)
  _check_sizes(config, check_files)
  check.one_of('merge.method', config.merge.method, MERGE_METHODS)
  MergeRecipe.from_config(config)


def check_eval_kv_budget(config, prompt_tokens: int) -> None:
  """The evaluation's avg@k calls sample eval.samples_k rows of a prompt as one group, which
  the engine's KV cache (sampling.kv_token_budget, 0 = no limit) must hold at once, as the
  training calls' groups (checked by the memory estimate, copd_jax/memory_estimate.py). At
  config load `prompt_tokens` is the shortest prompt bucket (P is not known yet); `plan` and
  `train`'s memory check call it again with the run's largest bucket."""
  budget, k = config.sampling.kv_token_budget, config.eval.samples_k
  if config.sampling.decoder != 'engine' or not budget:
    return
  cache = prompt_tokens + config.sampling.max_new_tokens
  check.check(budget // cache >= k, 'sampling.kv_token_budget',
              f'{budget} holds fewer than one evaluation group of eval.samples_k={k} rows of '
              f'{cache} tokens (a {prompt_tokens}-token prompt bucket + sampling.max_new_tokens '
              f'{config.sampling.max_new_tokens}); raise it to at least {k * cache} or lower '
              'eval.samples_k')


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def _check_data(config, check_files: bool) -> None:
  check.check(isinstance(config.branches, (tuple, list)) and len(config.branches) >= 1 and
              all(isinstance(b, str) for b in config.branches), 'branches',
              f'must be a non-empty tuple of domain names, got {config.branches!r}')
  for k, names in enumerate(branch_domains(config)):
    for name in names:
      check.check(name in config.domains, f'branches[{k}]',
                  f'domain {name!r} is not defined in config.domains '
                  f'({", ".join(config.domains)})')
  for name, domain in config.domains.items():
    where = f'domains.{name}'
    check.one_of(f'{where}.source', domain.source, ('synthetic', 'synthetic_vision', 'file'))
    _check_domain_prompting(config, name)
    _check_domain_scoring(config, name)
    if domain.source == 'file' and check_files:
      for split in ('train_path', 'eval_path'):
        path = domain[split]
        check.check(bool(path) and os.path.isfile(path), f'{where}.{split}',
                    f'file not found: {path!r}')
    elif domain.source in ('synthetic', 'synthetic_vision'):
      if domain.source == 'synthetic_vision':
        check.check(name in SYNTHETIC_VISION_DOMAINS, f'{where}.source',
                    f"'synthetic_vision' has no domain {name!r}; built-in image / video domains: "
                    f'{", ".join(SYNTHETIC_VISION_DOMAINS)}')
      check.positive_int(f'{where}.num_train', domain.num_train)
      check.positive_int(f'{where}.num_eval', domain.num_eval)
  check.positive_int('data.max_prompt_tokens', config.data.max_prompt_tokens, allow_zero=True)
  check.positive_int('data.max_image_pixels', config.data.max_image_pixels)
  check.one_of('data.long_prompts', config.data.long_prompts, LONG_PROMPT_POLICIES)


def _check_model(config, check_files: bool) -> None:
  model, K = config.model, len(config.branches)
  check.one_of('model.source', model.source, ('toy', 'toy_vl', 'hf'))
  check.check(model.preset in ('',) + tuple(MODEL_PRESETS), 'model.preset',
              f"must be '' or one of {', '.join(MODEL_PRESETS)}; got {model.preset!r}")
  if model.source == 'hf' and check_files:
    _check_model_path(config)
  check.one_of('model.compute_dtype', model.compute_dtype, tuple(DTYPES))
  check.one_of('model.param_dtype', model.param_dtype, tuple(DTYPES))
  for field in ('remat', 'scan_layers', 'freeze_vision'):
    check.typed(f'model.{field}', model[field], bool)
  check.one_of('model.attention', model.attention, IMPLEMENTATIONS)
  check.positive_int('model.attention_block', model.attention_block)
  check.check(isinstance(model.branch_init, (tuple, list)) and
              len(model.branch_init) in (0, K), 'model.branch_init',
              f'must be empty or give one path per branch (K={K}; "" = the base)')
  for k, path in enumerate(model.branch_init):
    if path and check_files:
      folder = path.rsplit(':', 1)[0] if ':' in path and path.rsplit(':', 1)[1].isdigit() else path
      check.check(os.path.isdir(folder), f'model.branch_init[{k}]', f'no such folder: {folder!r}')
  if model.source in ('toy', 'toy_vl'):  # checked now: the toy is first built after the data load
    toy_model_config(model.toy)
    if model.source == 'toy_vl':
      _check_toy_vision(model)
    warm = config.warmstart
    check.positive_int('warmstart.steps', warm.steps)
    check.positive_int('warmstart.batch_size', warm.batch_size)
    check.real('warmstart.learning_rate', warm.learning_rate, 0, low_open=True)
    check.positive_int('warmstart.examples_per_domain', warm.examples_per_domain)
    check.real('warmstart.wrong_share', warm.wrong_share, 0, 1, high_open=True)


def _check_toy_vision(model) -> None:
  """model.toy_vision: the toy Qwen3-VL's architecture (its own checks name the field) and its
  processors' pixel cap."""
  toy_vision = model.toy_vision
  check.positive_int('model.toy_vision.max_image_pixels', toy_vision.max_image_pixels)
  for name in ('deepstack_visual_indexes', 'mrope_section'):
    check.check(isinstance(toy_vision[name], (tuple, list))
                and all(is_int(i) for i in toy_vision[name]), f'model.toy_vision.{name}',
                f'must be a tuple of ints, got {toy_vision[name]!r}')
  toy_vl_model_config(model.toy, toy_vision)


def _check_copd(config) -> None:
  copd, K = config.copd, len(config.branches)
  check.positive_int('copd.num_cycles', copd.num_cycles)
  check.positive_int('copd.s_rl', copd.s_rl, allow_zero=True)
  check.positive_int('copd.s_opd', copd.s_opd, allow_zero=True)
  check.check(copd.s_rl + copd.s_opd > 0, 'copd.s_rl',
              's_rl and s_opd are both 0: a cycle would do nothing')
  check.one_of('copd.topology', copd.topology, TOPOLOGIES)
  if copd.s_opd > 0:
    check.check(K >= 2 and copd.topology != 'none', 'copd.s_opd',
                f'OPD steps need at least 2 branches and a topology (K={K}, '
                f'topology={copd.topology!r}); set copd.s_opd=0 for single-branch runs')
  check.positive_int('copd.hub', copd.hub, allow_zero=True)
  check.check(copd.hub < K, 'copd.hub', f'must index a branch in [0, {K}), got {copd.hub}')
  for field in ('edges', 'drop_edges', 'freeze'):
    check.typed(f'copd.{field}', copd[field], str)
  for field in ('edges', 'drop_edges'):
    parse_edges(copd[field], f'copd.{field}')
  if copd.topology == 'edges':
    check.check(bool(parse_edges(copd.edges, 'copd.edges')), 'copd.edges',
                "topology 'edges' needs a list like '0<-1,1<-0'")
  topology = topology_from_config(config)
  if copd.s_opd > 0:
    check.check(bool(topology.edges), 'copd.drop_edges',
                'no teaching edge is left for the OPD steps')
  check.one_of('copd.schedule', copd.schedule, ('fixed', 'overlap'))
  if copd.schedule == 'overlap':
    check.real('copd.overlap_low', copd.overlap_low, 0, 1, low_open=True)
    check.real('copd.overlap_high', copd.overlap_high, 0, 1, low_open=True)
    check.check(copd.overlap_low <= copd.overlap_high, 'copd.overlap_low',
                'needs 0 < overlap_low <= overlap_high <= 1')
    check.check(copd.s_opd > 0, 'copd.schedule', "'overlap' needs OPD steps (s_opd > 0)")
    check.positive_int('copd.probe_every', copd.probe_every)
  check.positive_int('guard.max_bad_steps', config.guard.max_bad_steps)


def _check_batches(config) -> None:
  """Batch shapes (StepConfig has checked group_size and micro_batches are positive)."""
  grpo, opd = config.grpo, config.opd
  check.check(grpo.group_size >= 2, 'grpo.group_size',
              f'GRPO needs at least 2 samples per prompt to form a group, got {grpo.group_size}')
  check.positive_int('grpo.prompts_per_step', grpo.prompts_per_step)
  check.typed('grpo.std_normalize', grpo.std_normalize, bool)
  rows = grpo.prompts_per_step * grpo.group_size
  check.check(rows % grpo.micro_batches == 0, 'grpo.micro_batches',
              f'must divide prompts_per_step * group_size = {rows}')
  check.positive_int('opd.prompts_per_step', opd.prompts_per_step)
  check.positive_int('opd.samples_per_prompt', opd.samples_per_prompt)
  distill_rows = opd.prompts_per_step * opd.samples_per_prompt
  check.check(distill_rows % grpo.micro_batches == 0, 'grpo.micro_batches',
              f'must also divide the OPD rows opd.prompts_per_step * opd.samples_per_prompt = '
              f'{distill_rows} (teachers score them in the same micro-batches)')


def _check_domain_prompting(config, name: str) -> None:
  """domains.<name>: use_chat_template, system_prompt, enable_thinking, image_field,
  video_field, video_fps."""
  domain, where = config.domains[name], f'domains.{name}'
  check.typed(f'{where}.use_chat_template', domain.use_chat_template, bool)
  check.typed(f'{where}.system_prompt', domain.system_prompt, str)
  check.typed(f'{where}.enable_thinking', domain.enable_thinking, bool)
  check.typed(f'{where}.image_field', domain.image_field, str)
  check.typed(f'{where}.video_field', domain.video_field, str)
  check.real(f'{where}.video_fps', domain.video_fps, 0, low_open=True)
  check.check(domain.use_chat_template or not domain.system_prompt, f'{where}.system_prompt',
              'needs use_chat_template=True (the system prompt is a turn of the chat template)')


def _check_domain_scoring(config, name: str) -> None:
  """domains.<name>: reward (a built-in kind or 'package.module:function', whose import
  load_config checks), answer_extraction, reward_timeout_s."""
  domain, where = config.domains[name], f'domains.{name}'
  check.check(is_reward_name(domain.reward), f'{where}.reward',
              f"must be one of {', '.join(REWARD_KINDS)} or 'package.module:function'; "
              f'got {domain.reward!r}')
  check.one_of(f'{where}.answer_extraction', domain.answer_extraction, EXTRACTIONS)
  check.real(f'{where}.reward_timeout_s', domain.reward_timeout_s, 0, low_open=True)


def _check_model_path(config) -> None:
  """model.hf_path: a local Hugging Face folder, or a Hub id fetched (or found in the cache)
  now, so a missing model stops the run before any compute (copd_jax/models/hub.py)."""
  path = config.model.hf_path
  try:
    local = hub.local_model_path(path) if path else path
  except UserInputError as e:
    raise ConfigError(f'config.model.hf_path: {e}') from None
  check.check(bool(local) and os.path.isfile(os.path.join(local, 'config.json')), 'model.hf_path',
              f'no Hugging Face model folder (config.json) at {path!r}')
  _check_hf_tokenizer(local)


def _check_hf_tokenizer(folder: str) -> None:
  """The model folder must hold a tokenizer `transformers` can build without network or
  custom code: tokenizer.json, or vocab.json with merges.txt, or a SentencePiece
  tokenizer.model (tokenizer_config.json alone names a class but holds no vocabulary)."""
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  alone = '; tokenizer_config.json alone holds no vocabulary' if has('tokenizer_config.json') \
      else ''
  check.check(has('tokenizer.json') or (has('vocab.json') and has('merges.txt'))
              or has('tokenizer.model'), 'model.hf_path',
              f'no tokenizer in {folder!r} (expected tokenizer.json, or vocab.json and merges.txt'
              f'{alone})')


# Seeds are offset per domain and per OPD round and must stay within uint32 (JAX, Grain, numpy).
MAX_SEED = 2**31 - 1


def _model_vocab_size(config, check_files: bool) -> int | None:
  """The model's vocabulary size, known before any compute (None: not known yet)."""
  if config.model.source in ('toy', 'toy_vl'):
    return char_vocab_size()
  if not check_files:
    return None
  try:
    with open(os.path.join(hub.local_model_path(config.model.hf_path), 'config.json')) as f:
      size = json.load(f).get('vocab_size')
  except (OSError, ValueError, AttributeError, UserInputError):
    return None   # reported with its file and field when the model is read
  return size if isinstance(size, int) else None


def _check_sizes(config, check_files: bool) -> None:
  """Values that pass their type checks but would fail mid-run: a seed past uint32 (after the
  workdir is made), a top-k overlap wider than the vocabulary (after checkpoint 0)."""
  check.check(config.seed <= MAX_SEED, 'seed', f'must be at most {MAX_SEED:,}, got {config.seed}')
  vocab = _model_vocab_size(config, check_files)
  check.check(vocab is None or config.metrics.overlap_top_k <= vocab, 'metrics.overlap_top_k',
              f"must be at most the model's vocabulary size {vocab}, got "
              f'{config.metrics.overlap_top_k}')


def _check_checkpoint_retention(config) -> None:
  """checkpoint.keep_last (>= 1: the newest checkpoint is what a resume needs) and
  checkpoint.keep_phase_ends (phase-end checkpoints kept besides them; -1 = all)."""
  check.positive_int('checkpoint.keep_last', config.checkpoint.keep_last)
  value = config.checkpoint.keep_phase_ends
  check.check(isinstance(value, int) and not isinstance(value, bool) and value >= -1,
              'checkpoint.keep_phase_ends',
              f'must be a non-negative integer, or -1 to keep every phase end, got {value!r}')
