"""Is a config complete? A config file's get_config() may build its ConfigDict by hand and leave
out sections or fields of the schema (copd_jax/configs/base.py); the run would then fail deep in
the set-up with an AttributeError. `check_complete` names the first missing field at load.
"""
from __future__ import annotations

from typing import Iterator

import ml_collections

from copd_jax.errors import ConfigError


def _missing(schema, config, where: str) -> Iterator[str]:
  """Dotted names of the fields of `schema` that `config` lacks, depth first."""
  for name, expected in schema.items():
    field = f'{where}.{name}'
    if name not in config:
      yield field
    elif isinstance(expected, ml_collections.ConfigDict) and name != 'domains':
      value = config[name]
      if isinstance(value, ml_collections.ConfigDict):
        yield from _missing(expected, value, field)


def missing_fields(config: ml_collections.ConfigDict) -> list[str]:
  """Every schema field `config` lacks, 'config.section.field'; each domain entry is compared
  with a domain of the schema (configs.base.synthetic_domain)."""
  from copd_jax.configs.base import base_config, synthetic_domain
  missing = list(_missing(base_config(), config, 'config'))
  domains = config.get('domains')
  if isinstance(domains, ml_collections.ConfigDict):
    for name, domain in domains.items():
      if isinstance(domain, ml_collections.ConfigDict):
        missing += _missing(synthetic_domain(), domain, f'config.domains.{name}')
  return missing


def check_complete(config: ml_collections.ConfigDict, path: str) -> None:
  """Refuses a config that lacks fields of the schema, naming the first and counting the rest."""
  missing = missing_fields(config)
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise ConfigError(f'--config {path}: get_config() returned a config without {missing[0]}'
                      f'{more}; start from copd_jax.configs.base.base_config() and change '
                      'fields on it')
