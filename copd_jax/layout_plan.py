"""`plan --layouts`: every valid (branch, fsdp, tensor) layout of a config's K on N devices
(copd_jax.mesh.candidate_layouts) with its per-device peaks, so a user can compare them and pin
one in config.mesh; the layout the config's mesh resolves to is marked.

Each row is the memory plan (copd_jax/memory_estimate.py) of the config with config.mesh set to
that layout; the sampling layout stays what the config says (config.mesh_sampling, or the row's
layout when that is unset).
"""
from __future__ import annotations

from typing import Sequence

import jax

from copd_jax import mesh as mesh_lib
from copd_jax.memory_estimate import GIB, estimate
from copd_jax.models.qwen3 import Qwen3Config
from copd_jax.models.qwen3_vl import Qwen3VLConfig
from copd_jax.vision_memory import PromptFrames


def with_layout(config, shape: Sequence[int]):
  """A copy of `config` whose config.mesh is the layout `shape`."""
  out = config.copy_and_resolve_references()
  out.mesh.update(dict(zip(mesh_lib.MESH_AXES, (int(s) for s in shape))))
  return out


def layout_rows(config, devices: Sequence[jax.Device], prompt_tokens: int,
                model_config: Qwen3Config | Qwen3VLConfig,
                patches_per_prompt: int | PromptFrames | None = None
                ) -> list[tuple[tuple[int, ...], dict[str, float], bool]]:
  """(layout, {phase: per-device peak bytes}, chosen) for every candidate layout
  (patches_per_prompt: a Qwen3-VL model's pictures, as `memory_estimate.estimate` takes them)."""
  K = len(config.branches)
  chosen = mesh_lib.branch_mesh_shape(config.mesh, len(devices), K)
  rows = []
  for shape in mesh_lib.candidate_layouts(len(devices), K):
    plan = estimate(with_layout(config, shape), devices, prompt_tokens, model_config,
                    patches_per_prompt=patches_per_prompt)
    peaks = {'training': plan.train_peak, 'sampling': plan.sampling_peak,
             'probe': plan.probe_peak, 'peak': plan.peak}
    rows.append((tuple(shape), peaks, tuple(shape) == tuple(chosen)))
  return rows


def format_layouts(rows) -> str:
  """The markdown table `plan --layouts` prints (GiB per device)."""
  lines = ['candidate layouts (per-device GiB; set config.mesh.branch / fsdp / tensor to pick '
           'one):', '| branch | fsdp | tensor | training | sampling | probe | peak | |',
           '|---:|---:|---:|---:|---:|---:|---:|---|']
  for shape, peaks, chosen in rows:
    cells = ' | '.join(f'{peaks[k] / GIB:.3f}' for k in ('training', 'sampling', 'probe', 'peak'))
    lines.append(f'| {shape[0]} | {shape[1]} | {shape[2]} | {cells} | '
                 f'{"chosen" if chosen else ""} |')
  return '\n'.join(lines)
