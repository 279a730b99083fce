"""Key paths into nested dicts of arrays (the pure-dict parameter layout of `nnx.to_pure_dict`):
one definition of walking, reading and setting them, shared by checkpoints, the HF reader, the
merge and the NaN / inf checks."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence


def flatten_paths(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], Any]]:
  """(key path, leaf) pairs of a nested dict, in sorted key order."""
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, Mapping):
      yield from flatten_paths(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
  """Sets tree[path[0]][path[1]]... = value, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def get_path(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree
