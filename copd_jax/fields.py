"""Checks of the fields of typed settings objects, and errors that name the config field.

Each settings object (StepConfig, SamplingParams, Qwen3Config, ...) checks its own fields in
`__post_init__` through a `Fields` checker; a bad value raises a `FieldError` naming the object's
field (`StepConfig.opd_beta: ...`). An object built from a run config is built inside
`named_by_config`, which re-raises that error under the config field the value came from
(`config.opd.beta: ...`): one rule per value, and the message says what the user wrote.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping

from copd_jax.errors import ConfigError


class FieldError(ConfigError):
  """A bad value of one field of a settings object; `field` is its name on that object and
  `why` what is allowed (the message is '<owner>.<field>: <why>')."""

  def __init__(self, owner: str, field: str, why: str):
    super().__init__(f'{owner}.{field}: {why}')
    self.field, self.why = field, why


@contextlib.contextmanager
def named_by_config(config_fields: Mapping[str, str]) -> Iterator[None]:
  """Re-raises a FieldError of an object built in this block as the config field its value came
  from: config_fields maps the object's field name to a dotted config path ('opd.beta')."""
  try:
    yield
  except FieldError as e:
    if e.field not in config_fields:
      raise
    raise ConfigError(f'config.{config_fields[e.field]}: {e.why}') from None


@dataclasses.dataclass(frozen=True)
class Fields:
  """Checks of `owner`'s fields; a failed check raises `error(owner, field, why)`."""
  owner: str
  error: type[FieldError] = FieldError

  def fail(self, field: str, why: str) -> None:
    raise self.error(self.owner, field, why)

  def check(self, ok: bool, field: str, why: str) -> None:
    if not ok:
      self.fail(field, why)

  def positive_int(self, field: str, value: Any, allow_zero: bool = False) -> None:
    ok = is_int(value) and (value >= 0 if allow_zero else value > 0)
    self.check(ok, field, f'must be a {"non-negative" if allow_zero else "positive"} integer, '
                          f'got {value!r}')

  def real(self, field: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> None:
    """A finite int or float in [low, high]; low_open / high_open exclude that end. Also
    catches a string or NaN written in a config file, which `>` would let through or crash on."""
    ok = is_real(value)
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
    self.check(ok, field, f'must be a finite number{where}, got {value!r}')

  def typed(self, field: str, value: Any, kind: type) -> None:
    self.check(isinstance(value, kind), field, f'must be a {kind.__name__}, got {value!r}')

  def one_of(self, field: str, value: Any, allowed: tuple) -> None:
    self.check(value in allowed, field,
               f'must be one of {", ".join(map(str, allowed))}; got {value!r}')


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
