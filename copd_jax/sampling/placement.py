"""Where the sampler's inputs live on a ('branch', 'fsdp', 'tensor') mesh.

Parameters are placed by SAMPLING_RULES: stacked on 'branch', 'tensor' sharding of heads / mlp /
vocab as in training, but replicated over 'fsdp' so a decode step never gathers weights; the
batch is split over 'fsdp' instead (data parallel) when it divides it. On CPU hosts every device
of a shard reads one shared copy of the weights (`cpu_sharing`), and the decoder's per-layer
matmul weights enter the program as views of that copy (`unstacked_layers`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from copd_jax import cpu_sharing, mesh as mesh_lib

# Parameter shardings while sampling on a mesh: the training rules without 'fsdp' on the embed
# dimension, so weights are gathered once per call (not once per decode step) and the batch is
# split over 'fsdp' instead (data parallel); 'tensor' sharding of heads / mlp / vocab stays.
SAMPLING_RULES = mesh_lib.REPLICATED_OVER_FSDP_RULES


def unstacked_layers(params, layer_axis: int) -> list[dict[str, jax.Array]] | None:
  """On CPU, the decoder's per-layer matmul weights as views of `params` ([..., layers, ...] ->
  one dict per layer), for the 'layerwise' program to read as inputs: slicing them inside it
  would give every device its own copy, while views keep replicas shared (`cpu_sharing`). None
  elsewhere; the program then slices them itself."""
  # The matmul weights: norm scales are small, and slicing them in the program costs nothing.
  decoder = params['text'] if 'text' in params else params   # a Qwen3-VL model's decoder
  names = [name for name in decoder['layers'].keys() if 'norm' not in name]
  split = cpu_sharing.unstack([decoder['layers'][name][...] for name in names], layer_axis)
  if split is None:
    return None
  return [dict(zip(names, layer)) for layer in zip(*split)]


def batch_axis(mesh: Mesh, batch: int) -> str | None:
  """'fsdp' when it divides the batch (rows are then split over it), else None (replicated)."""
  return 'fsdp' if batch % mesh.shape['fsdp'] == 0 else None


def mesh_group_size(mesh: Mesh, batch: int, group_size: int) -> int:
  """The group size a sampling mesh runs: prompts [K, B, P] are split over 'fsdp' when it divides
  B (else replicated), and every 'fsdp' shard must hold whole groups, so groups that would
  straddle shards are cut to the largest divisor of group_size that fits a shard (rows of a
  group of G identical rows form groups of any divisor of G). Decode stays data parallel;
  only the prefill sharing shrinks."""
  if batch_axis(mesh, batch) is None:
    return group_size
  shard = batch // mesh.shape['fsdp']
  return max(g for g in range(1, group_size + 1) if group_size % g == 0 and shard % g == 0)


class PlacedWeights(NamedTuple):
  """Branch-stacked params as `generate_branches` reads them (`place_weights`): sampling several
  times from the same weights places them once."""
  params: Any            # nnx.State, every leaf [K, ...], on the mesh by SAMPLING_RULES
  layers: Any            # `unstacked_layers(params)`: per-layer views on CPU, else None
  mesh: Mesh | None


def place_weights(stacked_params, mesh: Mesh | None = None) -> PlacedWeights:
  """stacked_params (every leaf [K, ...]) placed for `generate_branches` on `mesh`: stacked on
  'branch', replicated over 'fsdp' (on CPU as one buffer per shard, `cpu_sharing`). Placing is
  cheap next to a sampler call, but not free: callers that sample several times from the same
  weights place them once."""
  if isinstance(stacked_params, PlacedWeights):
    if stacked_params.mesh != mesh:
      raise ValueError('PlacedWeights were placed for another mesh than the one given')
    return stacked_params
  if mesh is not None:
    stacked_params = cpu_sharing.put(stacked_params, mesh_lib.state_shardings(
        stacked_params, mesh, SAMPLING_RULES, branch_stacked=True))
  return PlacedWeights(stacked_params, unstacked_layers(stacked_params, layer_axis=1), mesh)


def place_prompts(mesh: Mesh, prompt_tokens, prompt_valid, keys):
  """Prompts [K, B, P] and keys [K] on `mesh`: K split over 'branch' (which must divide it), B
  over 'fsdp' when it divides B (`batch_axis`)."""
  K, B = prompt_tokens.shape[:2]
  if K % mesh.shape['branch']:
    raise mesh_lib.MeshConfigError(f'mesh axis branch={mesh.shape["branch"]} does not divide '
                                   f'the number of branches K={K}')
  prompts = NamedSharding(mesh, P('branch', batch_axis(mesh, B), None))
  return (jax.device_put(prompt_tokens, prompts), jax.device_put(prompt_valid, prompts),
          jax.device_put(keys, mesh_lib.branch_sharded(mesh, keys.ndim)))
