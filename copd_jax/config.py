"""Run configs: loading a config file, `--config.a.b=value` overrides, and comparing a resumed
run's config with its checkpoint's.

A config file is a Python module with `get_config() -> ml_collections.ConfigDict` (see configs/).
Everything is checked at load, before any compute (copd_jax.config_checks): a wrong field name,
a value of the wrong type or an impossible value fails with one line that names the field and
what is allowed.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import traceback
from typing import Any, Iterable

import ml_collections

from copd_jax import user_rewards
from copd_jax.config_checks import validate
from copd_jax.config_schema import check_complete
from copd_jax.errors import ConfigError, UserInputError

_PACKAGED_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def load_config(path: str, overrides: Iterable[str] = (), check_files: bool = True
                ) -> ml_collections.ConfigDict:
  """Loads `path`'s get_config(), applies `--config.x.y=v` overrides, validates, returns it locked.
  check_files=False skips the checks that data files and model.hf_path exist (`plan`)."""
  config = read_config(path, overrides)
  check_config(config, path, check_files=check_files)
  return config


def check_config(config: ml_collections.ConfigDict, path: str, check_files: bool = True) -> None:
  """Every check of a read config (`path` is its file: user reward modules may sit beside it).
  The mesh checks ask jax for its devices: on a CPU host, set the device count first."""
  validate(config, check_files=check_files)
  if check_files:
    check_reward_functions(config, path)


def read_config(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`load_config` without the checks (which ask jax for its devices): for callers that must act
  on the config before jax starts (the train command sets the CPU device count)."""
  if not os.path.isfile(path):
    raise ConfigError(f'--config {path}: file not found')
  spec = importlib.util.spec_from_file_location(f'_copd_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SystemExit as e:
    raise ConfigError(f'--config {_where(e, path)}: the config file called sys.exit({e.code!r}) '
                      'while loading; it must define get_config() and return') from None
  except Exception as e:  # a broken config file: say where
    raise ConfigError(f'--config {path}: cannot be loaded ({type(e).__name__}: {e})') from None
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'--config {path}: defines no get_config()')
  try:
    config = module.get_config()
  except SystemExit as e:
    raise ConfigError(f'--config {_where(e, path)}: get_config() called sys.exit({e.code!r}); it '
                      'must return the config') from None
  except Exception as e:  # a field the schema lacks, a value of the wrong type for a field, ...
    raise ConfigError(f'--config {_where(e, path)}: get_config() failed ({type(e).__name__}: '
                      f'{_first_sentence(e)})') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config {path}: get_config() must return an ml_collections.ConfigDict, '
                      f'got {type(config).__name__}')
  check_complete(config, path)
  config.lock()
  apply_overrides(config, overrides)
  return config


def _where(error: Exception, path: str) -> str:
  """'file:line' of the innermost frame of `error` in a config file (`path`, a file it imports
  from its folder, or the packaged copd_jax/configs/base.py), else `path`."""
  folders = {os.path.dirname(os.path.abspath(path)), _PACKAGED_CONFIGS}
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if os.path.dirname(os.path.abspath(f.filename)) in folders]
  return f'{frames[-1].filename}:{frames[-1].lineno}' if frames else path


def check_reward_functions(config, config_path: str) -> None:
  """Imports every domain's user reward function ('package.module:function') now, with the
  config file's folder and the current directory on sys.path, so a bad name stops the run
  here with one line naming the field (copd_jax/user_rewards.py)."""
  names = [n for n, d in config.domains.items() if user_rewards.is_function_spec(d.reward)]
  if not names:
    return
  user_rewards.add_search_path([os.path.dirname(os.path.abspath(config_path)), os.getcwd()])
  for name in names:
    try:
      user_rewards.resolve(config.domains[name].reward)
    except UserInputError as e:
      raise ConfigError(f'config.domains.{name}.reward: {e}') from None


def _first_sentence(error: Exception) -> str:
  """The first line of an error message, up to ml_collections' list of every existing field."""
  text = str(error).strip().strip('\'"')
  return text.splitlines()[0].split(' Other fields present')[0] if text else ''


# Fields that take a number or a word (grpo.logits_chunk: 'auto' or a count): an override is
# read as a Python literal where it is one (16, 0), else kept as text ('auto').
NUMBER_OR_WORD_FIELDS = ('grpo.logits_chunk',)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Each override is `--config.a.b=value` (or `config.a.b=value`); the value's type follows the
  field's current type (NUMBER_OR_WORD_FIELDS: a literal, else text). Unknown fields and
  unparsable values raise ConfigError."""
  for raw in overrides:
    item = raw[2:] if raw.startswith('--') else raw
    if not item.startswith('config.') or '=' not in item:
      raise ConfigError(f'{raw}: overrides look like --config.section.field=value')
    dotted, value = item[len('config.'):].split('=', 1)
    parent, name = _resolve_parent(config, dotted, raw)
    current = parent[name]
    try:
      parsed = _auto(value) if dotted in NUMBER_OR_WORD_FIELDS else _parse_like(current, value)
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


# Sections that change what is trained: a resume must match them, except MEMORY_ONLY_FIELDS and
# SCHEDULE_FIELD (logging, checkpointing, evaluation, merge and mesh may change between runs).
TRAINING_SECTIONS = ('branches', 'domains', 'data', 'model', 'warmstart', 'seed', 'grpo', 'opd',
                     'copd', 'sampling', 'optimizer')
# Fields inside those sections that change memory, not the maths (results equal up to float
# rounding): a resume may change them, e.g. to get past an out-of-memory error.
MEMORY_ONLY_FIELDS = ('config.grpo.logits_chunk', 'config.grpo.micro_batches',
                      'config.sampling.decoder', 'config.sampling.kv_token_budget',
                      'config.sampling.prefill_prompts', 'config.sampling.prefill_chunk')
# The schedule's length: a resume may change it (train longer, or stop earlier than planned but
# not before the steps already trained; run_setup.check_schedule_change). Every other field of
# the training sections keeps its saved value: the steps already taken were computed with it.
SCHEDULE_FIELD = 'config.copd.num_cycles'
# Fields that moved to another section (old dotted path -> new one): a checkpoint written before
# the move is compared as if it had them in their new place.
MOVED_FIELDS = {'copd.beta': 'opd.beta', 'copd.delta_clamp': 'opd.delta_clamp'}


def with_moved_fields(saved: dict) -> dict:
  """A copy of a checkpoint's saved config with its MOVED_FIELDS in their current sections."""
  out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
  for old, new in MOVED_FIELDS.items():
    (old_section, old_name), (new_section, new_name) = old.split('.'), new.split('.')
    if not isinstance(out.get(old_section), dict) or old_name not in out[old_section]:
      continue
    value = out[old_section].pop(old_name)
    if isinstance(out.get(new_section), dict):
      out[new_section].setdefault(new_name, value)
  return out


def resume_differences(saved: dict, current: dict, sections: Iterable[str] = TRAINING_SECTIONS
                       ) -> tuple[list[str], list[str]]:
  """(changed, added) dotted fields of `current` against the config saved in a checkpoint,
  within `sections`. changed: fields whose value differs or that the checkpoint has and the
  config lacks; added: fields the checkpoint's code did not have yet (it ran with their then
  built-in behaviour, which the caller may accept with a warning). Fields of `saved` in
  MOVED_FIELDS are compared at their new place."""
  saved = with_moved_fields(saved)
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

