"""Run configs: loading a config file, `--config.a.b=value` overrides, and validation.

A config file is a Python module with `get_config() -> ml_collections.ConfigDict` (see configs/).
Everything is checked here, before any compute: a wrong field name, a value of the wrong type or
an impossible value fails with one line that names the field and what is allowed.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable

import ml_collections

from copd_jax.errors import UserInputError

AGGREGATIONS = ('seq-mean-token-mean', 'token-mean', 'seq-mean-token-sum-norm')
TOPOLOGIES = ('pairwise', 'hub_and_spoke', 'full', 'none')
DTYPES = ('float32', 'bfloat16')
REWARD_KINDS = ('exact', 'math')


class ConfigError(UserInputError):
  pass


def load_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path`'s get_config(), applies `--config.x.y=v` overrides, validates, returns it locked."""
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
  config = module.get_config()
  config.lock()
  apply_overrides(config, overrides)
  validate(config)
  return config


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


def validate(config: ml_collections.ConfigDict) -> None:
  """All static checks of a run config. Raises ConfigError naming the first bad field."""
  _check(isinstance(config.branches, (tuple, list)) and len(config.branches) >= 1, 'branches',
         f'must be a non-empty tuple of domain names, got {config.branches!r}')
  for k, names in enumerate(branch_domains(config)):
    for name in names:
      _check(name in config.domains, f'branches[{k}]',
             f'domain {name!r} is not defined in config.domains ({", ".join(config.domains)})')
  for name, domain in config.domains.items():
    _one_of(config, f'domains.{name}.source', ('synthetic', 'file'))
    _one_of(config, f'domains.{name}.reward', REWARD_KINDS)
    if domain.source == 'file':
      for split in ('train_path', 'eval_path'):
        path = domain[split]
        _check(bool(path) and os.path.isfile(path), f'domains.{name}.{split}',
               f'file not found: {path!r}')
    else:
      _positive_int(config, f'domains.{name}.num_train')
      _positive_int(config, f'domains.{name}.num_eval')

  _one_of(config, 'model.source', ('toy', 'hf'))
  if config.model.source == 'hf':
    path = config.model.hf_path
    _check(bool(path) and os.path.isfile(os.path.join(path, 'config.json')), 'model.hf_path',
           f'no Hugging Face model folder (config.json) at {path!r}')
  _one_of(config, 'model.compute_dtype', DTYPES)
  _one_of(config, 'model.param_dtype', DTYPES)

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
  _check(0 <= config.copd.hub < K, 'copd.hub', f'must index a branch in [0, {K}), got {config.copd.hub}')
  _check(config.copd.beta > 0, 'copd.beta', f'must be > 0, got {config.copd.beta}')
  _check(config.copd.delta_clamp >= 0, 'copd.delta_clamp', 'must be >= 0 (0 disables the clamp)')

  _positive_int(config, 'grpo.group_size')
  _check(config.grpo.group_size >= 2, 'grpo.group_size',
         f'GRPO needs at least 2 samples per prompt to form a group, got {config.grpo.group_size}')
  _positive_int(config, 'grpo.prompts_per_step')
  _positive_int(config, 'grpo.micro_batches')
  rows = config.grpo.prompts_per_step * config.grpo.group_size
  _check(rows % config.grpo.micro_batches == 0, 'grpo.micro_batches',
         f'must divide prompts_per_step * group_size = {rows}')
  _check(0 <= config.grpo.epsilon_low < 1, 'grpo.epsilon_low', 'must be in [0, 1)')
  _check(config.grpo.epsilon_high >= 0, 'grpo.epsilon_high', 'must be >= 0')
  _one_of(config, 'grpo.aggregation', AGGREGATIONS)
  _check(config.grpo.kl_coef >= 0, 'grpo.kl_coef', 'must be >= 0')
  _positive_int(config, 'opd.prompts_per_step')
  _positive_int(config, 'opd.samples_per_prompt')

  _positive_int(config, 'sampling.max_new_tokens')
  _check(config.sampling.temperature > 0, 'sampling.temperature', 'must be > 0')
  _check(0 < config.sampling.top_p <= 1, 'sampling.top_p', 'must be in (0, 1]')
  _positive_int(config, 'sampling.top_k', allow_zero=True)

  from copd_jax.optim import make_optimizer
  make_optimizer(config.optimizer)  # raises naming config.optimizer.<field>

  import jax
  from copd_jax import mesh as mesh_lib
  mesh_shape = mesh_lib.resolve_mesh_shape(config.mesh, jax.device_count())
  _check(K % mesh_shape[0] == 0, 'mesh.branch',
         f'{mesh_shape[0]} does not divide the number of branches K={K}')

  _positive_int(config, 'eval.num_examples')
  _positive_int(config, 'eval.samples_k')
  _positive_int(config, 'metrics.log_every')
  _positive_int(config, 'metrics.overlap_top_k')
  _positive_int(config, 'checkpoint.every_steps')
  _positive_int(config, 'checkpoint.keep_last')
  _positive_int(config, 'seed', allow_zero=True)
