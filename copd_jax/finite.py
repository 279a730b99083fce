"""Finiteness of model parameters: no command writes or exports a model holding NaN or inf.

A merge with a NaN or infinite option, or an input whose weights blew up, gives a model that
looks complete but computes NaN everywhere; refusing it by name (the first such tensor) keeps it
from being written, exported or loaded as if it were fine.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from copd_jax import tree_paths


def nonfinite_count(array: Any) -> int:
  """How many entries of a floating-point array are NaN or +-inf (0 for other dtypes)."""
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != 'bfloat16':
    return 0
  return int(array.size - np.count_nonzero(np.isfinite(array.astype(np.float32, copy=False))))


def first_nonfinite(params: Mapping[str, Any]) -> tuple[str, int, int] | None:
  """(dotted tensor name, non-finite entries, size) of the first tensor of a nested dict of
  arrays (sorted key order) holding NaN or inf; None when every tensor is finite."""
  for path, leaf in tree_paths.flatten_paths(params):
    bad = nonfinite_count(leaf)
    if bad:
      return '.'.join(path), bad, int(np.asarray(leaf).size)
  return None


def describe(found: tuple[str, int, int]) -> str:
  """'tensor layers.q_proj has 12 of 4,096 values NaN or inf'."""
  name, bad, size = found
  return f'tensor {name} has {bad:,} of {size:,} values NaN or inf'
