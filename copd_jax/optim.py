"""The optax optimizer from a config mapping: AdamW with a learning-rate schedule and clipping
by global gradient norm.

Config fields (all optional except learning_rate), errors name `config.optimizer.<field>`:
  learning_rate    peak learning rate (float > 0)
  schedule         'constant' | 'cosine' | 'linear' (default 'constant'); each starts with a
                   linear warmup from 0 over warmup_steps, then stays / decays to
                   end_lr_ratio * learning_rate at decay_steps (total steps, warmup included)
  warmup_steps     int >= 0 (default 0)
  decay_steps      int > warmup_steps; required for 'cosine' and 'linear'
  end_lr_ratio     final lr / peak lr for decaying schedules (default 0.0)
  weight_decay     decoupled weight decay (default 0.0); not applied to norm scales
  b1, b2, eps      Adam moments (defaults 0.9, 0.999, 1e-8)
  max_grad_norm    clip gradients to this global norm before Adam; null or 0 disables (default 1.0)
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import optax
from flax import nnx

from copd_jax.errors import ConfigError

SCHEDULES = ('constant', 'cosine', 'linear')
FIELDS = ('learning_rate', 'schedule', 'warmup_steps', 'decay_steps', 'end_lr_ratio',
          'weight_decay', 'b1', 'b2', 'eps', 'max_grad_norm')


class OptimizerConfigError(ConfigError):
  pass


def _as_dict(config: Any) -> dict[str, Any]:
  if hasattr(config, 'to_dict'):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config, Mapping):
    raise OptimizerConfigError(f'config.optimizer: expected a mapping, got {type(config).__name__}')
  unknown = sorted(set(config) - set(FIELDS))
  if unknown:
    raise OptimizerConfigError(f'config.optimizer.{unknown[0]}: unknown field; known fields are '
                               f'{FIELDS}')
  return dict(config)


def _number(cfg: Mapping[str, Any], name: str, default: Any, *, minimum: float | None = None,
            integer: bool = False, positive: bool = False) -> Any:
  value = cfg.get(name, default)
  kind = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
    expected = 'an integer' if integer else 'a finite number'
    raise OptimizerConfigError(f'config.optimizer.{name}: expected {expected}, got {value!r}')
  if positive and value <= 0:
    raise OptimizerConfigError(f'config.optimizer.{name}: must be > 0, got {value!r}')
  if minimum is not None and value < minimum:
    raise OptimizerConfigError(f'config.optimizer.{name}: must be >= {minimum}, got {value!r}')
  return value


def make_schedule(config: Any) -> optax.Schedule:
  """step -> learning rate, from the fields documented in this module."""
  cfg = _as_dict(config)
  if 'learning_rate' not in cfg:
    raise OptimizerConfigError('config.optimizer.learning_rate: required')
  lr = float(_number(cfg, 'learning_rate', None, positive=True))
  kind = cfg.get('schedule', 'constant')
  if kind not in SCHEDULES:
    raise OptimizerConfigError(f'config.optimizer.schedule: unknown schedule {kind!r}; choose one '
                               f'of {SCHEDULES}')
  warmup = _number(cfg, 'warmup_steps', 0, minimum=0, integer=True)
  end_ratio = float(_number(cfg, 'end_lr_ratio', 0.0, minimum=0.0))
  if kind == 'constant':
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                 optax.constant_schedule(lr)], [warmup])
  if cfg.get('decay_steps') is None:
    raise OptimizerConfigError(f"config.optimizer.decay_steps: required for schedule {kind!r}")
  decay = _number(cfg, 'decay_steps', None, integer=True)
  if decay <= warmup:
    raise OptimizerConfigError(f'config.optimizer.decay_steps: must exceed warmup_steps '
                               f'({warmup}), got {decay}')
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay, end_value=end_ratio * lr)
  decay_part = optax.linear_schedule(lr, end_ratio * lr, decay - warmup)
  if warmup == 0:
    return decay_part
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay_part], [warmup])


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """clip_by_global_norm (unless disabled) followed by AdamW with the configured schedule."""
  cfg = _as_dict(config)
  schedule = make_schedule(cfg)
  weight_decay = float(_number(cfg, 'weight_decay', 0.0, minimum=0.0))
  b1 = float(_number(cfg, 'b1', 0.9, minimum=0.0))
  b2 = float(_number(cfg, 'b2', 0.999, minimum=0.0))
  for name, value in (('b1', b1), ('b2', b2)):
    if value >= 1.0:
      raise OptimizerConfigError(f'config.optimizer.{name}: must be < 1, got {value}')
  eps = float(_number(cfg, 'eps', 1e-8, positive=True))
  max_norm = cfg.get('max_grad_norm', 1.0)
  if max_norm is not None:
    max_norm = float(_number(cfg, 'max_grad_norm', 1.0, minimum=0.0))
  adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                      mask=_matrices_only)
  if not max_norm:
    return adamw
  return optax.chain(optax.clip_by_global_norm(max_norm), adamw)


def _matrices_only(params):
  """True for weight matrices; False for norm scales (logical axis 'norm', or any leaf of
  ndim < 2 without logical-axis metadata), which are not decayed."""
  def decays(x) -> bool:
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get('logical_axes')
      if axes is not None:
        return 'norm' not in axes
      x = x[...]
    return x.ndim >= 2
  return jax.tree.map(decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
