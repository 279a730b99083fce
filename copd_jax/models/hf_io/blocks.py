"""One block of a parameter read from only the bytes of the Hugging Face tensors that hold it.

`load_params_sharded` (read.py) places every parameter one distinct device block at a time; on
several hosts each process needs only its own devices' blocks (e.g. its 'fsdp' rows of the
embedding). A block of ours maps to one rectangular slice of each HF tensor, because our layout
is the HF tensor, perhaps transposed, with at most one axis cut in two (`format.TensorLayout`):
`hf_slice` computes that slice and `from_hf_slice` turns what was read into the block, and
`read_block` reads it (safetensors' `get_slice`, memory-mapped locally; ranged reads remotely),
layer by layer for a layer-stacked parameter. Only the layers in the block are read, and a
tensor that no block asks for is never opened. The block equals the same block of the whole
tensor converted with the mapping's `to_ours` bit for bit (elementwise casts only).
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from copd_jax.models.hf_io.format import TensorLayout

Index = tuple[slice, ...]


class SliceReader(Protocol):
  """What `read_block` reads from (read.TensorReader)."""

  def read(self, name: str, index: Index) -> np.ndarray: ...


def hf_shape(layout: TensorLayout, our_shape: Sequence[int]) -> tuple[int, ...]:
  """The HF tensor shape that maps to `our_shape` under `layout`."""
  shape = list(our_shape)
  if layout.split is not None:
    a = layout.split
    shape[a:a + 2] = [shape[a] * shape[a + 1]]
  return tuple(reversed(shape)) if layout.transposed else tuple(shape)


def hf_slice(layout: TensorLayout, our_shape: Sequence[int], index: Index) -> Index:
  """The slice of the HF tensor that holds our block `index` (step-1 slices of `our_shape`;
  along a split axis the whole inner axis is read, `from_hf_slice` keeps the asked part)."""
  index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, our_shape))
  merged = list(index)
  if layout.split is not None:
    a, inner = layout.split, our_shape[layout.split + 1]
    merged[a:a + 2] = [slice(index[a].start * inner, index[a].stop * inner)]
  return tuple(reversed(merged)) if layout.transposed else tuple(merged)


def from_hf_slice(layout: TensorLayout, our_shape: Sequence[int], index: Index,
                  read: np.ndarray) -> np.ndarray:
  """Our block `index` from `read`, the HF tensor's `hf_slice(layout, our_shape, index)`."""
  index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, our_shape))
  x = read.T if layout.transposed else read
  if layout.split is not None:
    a = layout.split
    outer = index[a].stop - index[a].start
    x = x.reshape(x.shape[:a] + (outer, our_shape[a + 1]) + x.shape[a + 1:])
    x = x[(slice(None),) * (a + 1) + (index[a + 1],)]
  return x


def read_block(reader: SliceReader, names: Sequence[str], layout: TensorLayout,
               shape: Sequence[int], index: Index, stacked: bool,
               convert: Callable[[np.ndarray, str], np.ndarray]) -> np.ndarray:
  """Block `index` of a parameter of `shape`: from HF tensor names[0] (stacked False), or, for
  a layer-stacked parameter [L, ...], from names[layer] for each layer in the block's first
  slice. `convert(read, name)` checks and casts what was read (e.g. to the parameter dtype)."""
  if not stacked:
    piece = reader.read(names[0], hf_slice(layout, shape, index))
    return convert(from_hf_slice(layout, shape, index, piece), names[0])
  layers = range(*index[0].indices(shape[0]))
  inner_shape, inner = tuple(shape[1:]), tuple(index[1:])
  where = hf_slice(layout, inner_shape, inner)
  out = None
  for j, layer in enumerate(layers):
    piece = convert(from_hf_slice(layout, inner_shape, inner,
                                  reader.read(names[layer], where)), names[layer])
    if out is None:
      out = np.empty((len(layers),) + piece.shape, piece.dtype)
    out[j] = piece
    del piece
  if out is None:   # an empty block (no layer): nothing to read
    raise ValueError(f'block {index} of a {tuple(shape)} parameter holds no layer')
  return out
