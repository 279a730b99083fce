"""Run configs: loading a config file, `--config.a.b=value` overrides, and validation.

A config file is a Python module with `get_config() -> ml_collections.ConfigDict` (see configs/).
Everything is checked here, before any compute: a wrong field name, a value of the wrong type or
an impossible value fails with one line that names the field and what is allowed.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import traceback
from typing import Any, Iterable

import ml_collections

from copd_jax.errors import UserInputError

AGGREGATIONS = ('seq-mean-token-mean', 'token-mean', 'seq-mean-token-sum-norm')
TOPOLOGIES = ('pairwise', 'hub_and_spoke', 'full', 'edges', 'none')
DTYPES = ('float32', 'bfloat16')
REWARD_KINDS = ('exact', 'math')
MERGE_METHODS = ('mean', 'task_arithmetic', 'ties', 'dare', 'none')


class ConfigError(UserInputError):
  pass


def load_config(path: str, overrides: Iterable[str] = (), check_files: bool = True
                ) -> ml_collections.ConfigDict:
  """Loads `path`'s get_config(), applies `--config.x.y=v` overrides, validates, returns it locked.
  check_files=False skips the checks that data files and model.hf_path exist (`plan`)."""
  config = read_config(path, overrides)
  validate(config, check_files=check_files)
  return config


def read_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`load_config` without the validation (which asks jax for its devices): for callers that
  must act on the config before jax starts (the train command sets the CPU device count)."""
  if not os.path.isfile(path):
    raise ConfigError(f'--config {path}: file not found')
  spec = importlib.util.spec_from_file_location(f'_copd_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: say where
    raise ConfigError(f'--config {path}: cannot be loaded ({type(e).__name__}: {e})') from None
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config {path}: defines no get_config()')
  try:
    config = module.get_config()
  except Exception as e:  # a field the schema lacks, a value of the wrong type for a field, ...
    raise ConfigError(f'--config {_where(e, path)}: get_config() failed ({type(e).__name__}: '
                      f'{_first_sentence(e)})') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config {path}: get_config() must return an ml_collections.ConfigDict, '
                      f'got {type(config).__name__}')
  config.lock()
  apply_overrides(config, overrides)
  return config


def _where(error: Exception, path: str) -> str:
  """'file:line' of the innermost frame of `error` in a config file (`path` or a file it imports
  from its folder, such as configs/base.py), else `path`."""
  folder = os.path.dirname(os.path.abspath(path))
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.dirname(os.path.abspath(f.filename)) == folder]
  return f'{frames[-1].filename}:{frames[-1].lineno}' if frames else path


def _first_sentence(error: Exception) -> str:
  """The first line of an error message, up to ml_collections' list of every existing field."""
  text = str(error).strip().strip('\'"')
  return text.splitlines()[0].split(' Other fields present')[0] if text else ''


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Each override is `--config.a.b=value` (or `config.a.b=value`); the value's type follows the
  field's current type. Unknown fields and unparsable values raise ConfigError."""
  for raw in overrides:
    item = raw[2:] if raw.startswith('--') else raw
    if not item.startswith('config.') or '=' not in item:
      raise ConfigError(f'{raw}: overrides look like --config.section.field=value')
    dotted, value = item[len('config.'):].split('=', 1)
    parent, name = _resolve_parent(config, dotted, raw)
    current = parent[name]
    try:
      parsed = _parse_like(current, value)
    except (ValueError, SyntaxError):
      raise ConfigError(f'{raw}: config.{dotted} expects {type(current).__name__}, '
                        f'got {value!r}') from None
    with parent.unlocked():
      parent[name] = parsed


def _resolve_parent(config, dotted: str, raw: str):
  parts = dotted.split('.')
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(parts[:i]) or '<top level>'
      known = ', '.join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ''
      raise ConfigError(f'{raw}: unknown field config.{".".join(parts[:i + 1])} '
                        f'(fields of {where}: {known})')
    if i < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise ConfigError(f'{raw}: config.{dotted} is a section; override one of its fields')
  return node, parts[-1]


def _parse_like(current: Any, value: str) -> Any:
  if isinstance(current, bool):
    lowered = value.lower()
    if lowered in ('true', '1', 'yes'):
      return True
    if lowered in ('false', '0', 'no'):
      return False
    raise ValueError(value)
  if isinstance(current, int):
    return int(value)
  if isinstance(current, float):
    return float(value)
  if isinstance(current, str):
    return value
  if isinstance(current, (tuple, list)):
    parsed = ast.literal_eval(value) if value.strip()[:1] in '([' else tuple(
        _auto(v) for v in value.split(',') if v.strip())
    if not isinstance(parsed, (tuple, list)):
      parsed = (parsed,)
    return tuple(parsed)
  return _auto(value)


def _auto(value: str) -> Any:
  try:
    return ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    return value.strip()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'config.{field}: {message}')


def _positive_int(config, field: str, allow_zero: bool = False) -> None:
  value = _get(config, field)
  ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
  _check(ok, field, f'must be a {"non-negative" if allow_zero else "positive"} integer, got {value!r}')


def _real(config, field: str, low: float | None = None, high: float | None = None, *,
          low_open: bool = False, high_open: bool = False) -> None:
  """A finite int or float in [low, high]; low_open / high_open exclude that end. Also catches
  a string or NaN written in a config file, which `>` would let through or crash on."""
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if low is not None and high is not None:
    where = f' in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
  elif low is not None:
    where = f' {">" if low_open else ">="} {low:g}'
  else:
    where = ''
  _check(ok, field, f'must be a finite number{where}, got {value!r}')


def _typed(config, field: str, kind: type) -> None:
  value = _get(config, field)
  _check(isinstance(value, kind), field, f'must be a {kind.__name__}, got {value!r}')


def _one_of(config, field: str, allowed: tuple) -> None:
  value = _get(config, field)
  _check(value in allowed, field, f'must be one of {", ".join(map(str, allowed))}; got {value!r}')


def _get(config, field: str):
  node = config
  for part in field.split('.'):
    node = node[part]
  return node


def branch_domains(config) -> list[list[str]]:
  """Per branch, the domain names it trains on ('a+b' in config.branches means mixed data)."""
  return [[d.strip() for d in spec.split('+')] for spec in config.branches]


def parse_edges(text: str, field: str) -> list[tuple[int, int]]:
  """'0<-1, 2<-0' -> [(0, 1), (2, 0)] as (student, teacher) pairs."""
  edges = []
  for item in (e.strip() for e in text.split(',')):
    if not item:
      continue
    parts = item.split('<-')
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
      raise ConfigError(f"config.{field}: {item!r} is not an edge 'student<-teacher' like '0<-1'")
    edges.append((int(parts[0]), int(parts[1])))
  return edges


def parse_indices(text: str, field: str) -> list[int]:
  items = [t.strip() for t in text.split(',') if t.strip()]
  if not all(t.isdigit() for t in items):
    raise ConfigError(f"config.{field}: expected comma-separated branch indices like '1,2', "
                      f'got {text!r}')
  return [int(t) for t in items]


def topology_from_config(config):
  """The run's copd_jax.topology.Topology (no edges for K = 1 or topology 'none')."""
  from copd_jax.topology import make_topology
  K = len(config.branches)
  kind = config.copd.topology
  if K == 1 or kind == 'none':
    return make_topology('edges', K, edges=(), field='config.copd')
  edges = parse_edges(config.copd.edges, 'copd.edges') if kind == 'edges' else None
  return make_topology(kind, K, hub=config.copd.hub, edges=edges,
                       drop_edges=parse_edges(config.copd.drop_edges, 'copd.drop_edges'),
                       field='config.copd')


def validate(config: ml_collections.ConfigDict, check_files: bool = True) -> None:
  """All static checks of a run config. Raises ConfigError naming the first bad field.
  check_files=False skips the existence checks of data files and model.hf_path."""
  _check(isinstance(config.branches, (tuple, list)) and len(config.branches) >= 1 and
         all(isinstance(b, str) for b in config.branches), 'branches',
         f'must be a non-empty tuple of domain names, got {config.branches!r}')
  for k, names in enumerate(branch_domains(config)):
    for name in names:
      _check(name in config.domains, f'branches[{k}]',
             f'domain {name!r} is not defined in config.domains ({", ".join(config.domains)})')
  for name, domain in config.domains.items():
    _one_of(config, f'domains.{name}.source', ('synthetic', 'file'))
    _one_of(config, f'domains.{name}.reward', REWARD_KINDS)
    _typed(config, f'domains.{name}.use_chat_template', bool)
    if domain.source == 'file' and check_files:
      for split in ('train_path', 'eval_path'):
        path = domain[split]
        _check(bool(path) and os.path.isfile(path), f'domains.{name}.{split}',
               f'file not found: {path!r}')
    elif domain.source == 'synthetic':
      _positive_int(config, f'domains.{name}.num_train')
      _positive_int(config, f'domains.{name}.num_eval')

  _one_of(config, 'model.source', ('toy', 'hf'))
  from copd_jax.memory_plan import QWEN3_PRESETS
  _check(config.model.preset in ('',) + tuple(QWEN3_PRESETS), 'model.preset',
         f"must be '' or one of {', '.join(QWEN3_PRESETS)}; got {config.model.preset!r}")
  if config.model.source == 'hf' and check_files:
    path = config.model.hf_path
    _check(bool(path) and os.path.isfile(os.path.join(path, 'config.json')), 'model.hf_path',
           f'no Hugging Face model folder (config.json) at {path!r}')
  _one_of(config, 'model.compute_dtype', DTYPES)
  _one_of(config, 'model.param_dtype', DTYPES)
  for field in ('remat', 'scan_layers'):
    _typed(config, f'model.{field}', bool)
  if config.model.source == 'toy':
    _check_toy_model(config)

  _positive_int(config, 'copd.num_cycles')
  _positive_int(config, 'copd.s_rl', allow_zero=True)
  _positive_int(config, 'copd.s_opd', allow_zero=True)
  _check(config.copd.s_rl + config.copd.s_opd > 0, 'copd.s_rl',
         's_rl and s_opd are both 0: a cycle would do nothing')
  _one_of(config, 'copd.topology', TOPOLOGIES)
  K = len(config.branches)
  if config.copd.s_opd > 0:
    _check(K >= 2 and config.copd.topology != 'none', 'copd.s_opd',
           f'OPD steps need at least 2 branches and a topology (K={K}, '
           f'topology={config.copd.topology!r}); set copd.s_opd=0 for single-branch runs')
  _positive_int(config, 'copd.hub', allow_zero=True)
  _check(0 <= config.copd.hub < K, 'copd.hub', f'must index a branch in [0, {K}), got {config.copd.hub}')
  _real(config, 'copd.beta', 0, low_open=True)
  for field in ('edges', 'drop_edges', 'freeze'):
    _typed(config, f'copd.{field}', str)
  for field in ('edges', 'drop_edges'):
    parse_edges(config.copd[field], f'copd.{field}')
  if config.copd.topology == 'edges':
    _check(bool(parse_edges(config.copd.edges, 'copd.edges')), 'copd.edges',
           "topology 'edges' needs a list like '0<-1,1<-0'")
  topology = topology_from_config(config)
  if config.copd.s_opd > 0:
    _check(bool(topology.edges), 'copd.drop_edges', 'no teaching edge is left for the OPD steps')
  frozen = parse_indices(config.copd.freeze, 'copd.freeze')
  _check(all(0 <= k < K for k in frozen), 'copd.freeze', f'branch indices must be in [0, {K})')
  _check(len(frozen) < K, 'copd.freeze', 'at least one branch must train')
  _one_of(config, 'copd.schedule', ('fixed', 'overlap'))
  if config.copd.schedule == 'overlap':
    _real(config, 'copd.overlap_low', 0, 1, low_open=True)
    _real(config, 'copd.overlap_high', 0, 1, low_open=True)
    _check(0 < config.copd.overlap_low <= config.copd.overlap_high <= 1, 'copd.overlap_low',
           'needs 0 < overlap_low <= overlap_high <= 1')
    _check(config.copd.s_opd > 0, 'copd.schedule', "'overlap' needs OPD steps (s_opd > 0)")
    _positive_int(config, 'copd.probe_every')
  _check(isinstance(config.model.branch_init, (tuple, list)) and
         len(config.model.branch_init) in (0, K), 'model.branch_init',
         f'must be empty or give one path per branch (K={K}; "" = the base)')
  for k, path in enumerate(config.model.branch_init):
    if path and check_files:
      folder = path.rsplit(':', 1)[0] if ':' in path and path.rsplit(':', 1)[1].isdigit() else path
      _check(os.path.isdir(folder), f'model.branch_init[{k}]', f'no such folder: {folder!r}')
  _positive_int(config, 'guard.max_bad_steps')
  _real(config, 'copd.delta_clamp', 0)  # 0 disables the clamp

  _positive_int(config, 'grpo.group_size')
  _check(config.grpo.group_size >= 2, 'grpo.group_size',
         f'GRPO needs at least 2 samples per prompt to form a group, got {config.grpo.group_size}')
  _positive_int(config, 'grpo.prompts_per_step')
  _positive_int(config, 'grpo.micro_batches')
  rows = config.grpo.prompts_per_step * config.grpo.group_size
  _check(rows % config.grpo.micro_batches == 0, 'grpo.micro_batches',
         f'must divide prompts_per_step * group_size = {rows}')
  _real(config, 'grpo.epsilon_low', 0, 1, high_open=True)
  _real(config, 'grpo.epsilon_high', 0)
  _one_of(config, 'grpo.aggregation', AGGREGATIONS)
  _real(config, 'grpo.kl_coef', 0)
  _real(config, 'grpo.entropy_coef')
  _typed(config, 'grpo.std_normalize', bool)
  _positive_int(config, 'grpo.logits_chunk', allow_zero=True)  # 0 = off
  _positive_int(config, 'opd.prompts_per_step')
  _positive_int(config, 'opd.samples_per_prompt')
  distill_rows = config.opd.prompts_per_step * config.opd.samples_per_prompt
  _check(distill_rows % config.grpo.micro_batches == 0, 'grpo.micro_batches',
         f'must also divide the OPD rows opd.prompts_per_step * opd.samples_per_prompt = '
         f'{distill_rows} (teachers score them in the same micro-batches)')

  _positive_int(config, 'sampling.max_new_tokens')
  _real(config, 'sampling.temperature', 0, low_open=True)
  _real(config, 'sampling.top_p', 0, 1, low_open=True)
  _positive_int(config, 'sampling.top_k', allow_zero=True)

  from copd_jax.optim import make_optimizer
  make_optimizer(config.optimizer)  # raises naming config.optimizer.<field>
  for field, value in config.optimizer.items():  # make_optimizer lets NaN through
    if isinstance(value, float):
      _real(config, f'optimizer.{field}')

  _positive_int(config, 'cpu_devices', allow_zero=True)
  _typed(config, 'shard_params_over_fsdp', bool)
  import jax
  from copd_jax import mesh as mesh_lib
  mesh_shape = mesh_lib.resolve_mesh_shape(config.mesh, jax.device_count())
  _check(K % mesh_shape[0] == 0, 'mesh.branch',
         f'{mesh_shape[0]} does not divide the number of branches K={K}')
  if any(config.mesh_sampling.values()):  # all 0: sampling uses config.mesh
    try:
      sampling_shape = mesh_lib.resolve_mesh_shape(config.mesh_sampling, jax.device_count())
    except mesh_lib.MeshConfigError as e:
      raise ConfigError(str(e).replace('config.mesh', 'config.mesh_sampling', 1)) from None
    _check(K % sampling_shape[0] == 0, 'mesh_sampling.branch',
           f'{sampling_shape[0]} does not divide the number of branches K={K}')

  _positive_int(config, 'eval.num_examples')
  _positive_int(config, 'eval.samples_k')
  _positive_int(config, 'metrics.log_every')
  _positive_int(config, 'metrics.overlap_top_k')
  _positive_int(config, 'checkpoint.every_steps')
  _positive_int(config, 'checkpoint.keep_last')
  _positive_int(config, 'seed', allow_zero=True)
  _one_of(config, 'merge.method', MERGE_METHODS)
  _real(config, 'merge.lam')
  if config.merge.method in ('ties', 'dare'):
    _real(config, 'merge.density', 0, 1, low_open=True)


def _check_toy_model(config) -> None:
  """The built-in model's architecture (model.toy) and its warm start, checked here because
  they are first used after the data are loaded."""
  for field in ('hidden_size', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
                'intermediate_size'):
    _positive_int(config, f'model.toy.{field}')
  toy = config.model.toy
  _check(toy.num_heads % toy.num_kv_heads == 0, 'model.toy.num_heads',
         f'must be a multiple of num_kv_heads ({toy.num_kv_heads}), got {toy.num_heads}')
  _check(toy.head_dim % 2 == 0, 'model.toy.head_dim',
         f'must be even (rotary embeddings), got {toy.head_dim}')
  _positive_int(config, 'warmstart.steps')
  _positive_int(config, 'warmstart.batch_size')
  _real(config, 'warmstart.learning_rate', 0, low_open=True)


# Sections that change what is trained: a resume must match them (logging, checkpointing,
# evaluation, merge and mesh may change between runs).
TRAINING_SECTIONS = ('branches', 'domains', 'model', 'warmstart', 'seed', 'grpo', 'opd', 'copd',
                     'sampling', 'optimizer')
# Fields inside those sections that change memory, not the maths (results equal up to float
# rounding): a resume may change them, e.g. to get past an out-of-memory error.
MEMORY_ONLY_FIELDS = ('config.grpo.logits_chunk', 'config.grpo.micro_batches')


def resume_differences(saved: dict, current: dict, sections: Iterable[str] = TRAINING_SECTIONS
                       ) -> tuple[list[str], list[str]]:
  """(changed, added) dotted fields of `current` against the config saved in a checkpoint,
  within `sections`. changed: fields whose value differs or that the checkpoint has and the
  config lacks; added: fields the checkpoint's code did not have yet (it ran with their then
  built-in behaviour, which the caller may accept with a warning)."""
  changed, added = [], []

  def walk(old, new, where):
    if isinstance(old, dict) and isinstance(new, dict):
      for key in sorted(set(old) | set(new), key=str):
        name = f'{where}.{key}'
        if key not in new:
          changed.append(name)
        elif key not in old:
          added.append(name)
        else:
          walk(old[key], new[key], name)
    elif _plain(old) != _plain(new):
      changed.append(where)

  for section in sections:
    if section not in saved:
      added.append(f'config.{section}')
    else:
      walk(saved[section], current.get(section), f'config.{section}')
  free = lambda names: [n for n in names if n not in MEMORY_ONLY_FIELDS]
  return free(changed), free(added)


def _plain(value: Any) -> Any:
  """JSON-comparable form (tuples as lists, as a checkpoint's JSON stores them)."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  return value

