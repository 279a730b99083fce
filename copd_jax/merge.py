"""Merging co-evolved branches into one model, theta* = Merge(theta_0, theta_1..theta_K)
(paper Algorithm 1 line 20; method names follow mergekit).

Leaf functions take `thetas` [K, ...] (the K models' values of one tensor, float32) and, where
the method needs it, `base` [...] (theta_0); task vectors are tau_k = theta_k - theta_0.

`merge_checkpoints` streams: for every tensor (every layer of a layer-stacked tensor, and for
element-wise methods every 16 MiB block of it) it reads that slice from each input, merges it
and stores it in the output tree, so peak memory is about one model (the output) plus Orbax's
write buffers, independent of K (see BENCHMARKS.md, "Merge"). TIES ranks magnitudes per tensor
per layer, which is mergekit's granularity (one HF tensor at a time); DARE's random mask depends
on the seed, the tensor name and the block layout.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import zlib
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from copd_jax import checkpoint as ckpt
from copd_jax import finite, storage
from copd_jax.errors import UserInputError
from copd_jax.fields import FieldError, Fields, named_by_config
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3Config

METHODS = ('mean', 'weighted', 'task_arithmetic', 'ties', 'dare')
NEEDS_BASE = frozenset({'task_arithmetic', 'ties', 'dare'})
DEFAULT_BLOCK_BYTES = 16 * 2**20  # per model and block, for element-wise methods


class MergeError(UserInputError):
  """Merge inputs or options that do not fit together; the message names what differs."""


# ---------------------------------------------------------------------------------------------
# Leaf functions
# ---------------------------------------------------------------------------------------------

def mean(thetas: np.ndarray, base: np.ndarray | None = None) -> np.ndarray:
  """The paper's parameter averaging: mean over the K models, [K, ...] -> [...]."""
  del base
  return thetas.mean(axis=0)


def normalise_weights(weights: Sequence[float], num_models: int) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.shape != (num_models,):
    raise MergeError(f'--weights: got {w.size} weights for {num_models} models')
  if np.any(w < 0) or not w.sum() > 0:
    raise MergeError(f'--weights: must be non-negative with a positive sum, got {list(weights)}')
  return w / w.sum()


def weighted(thetas: np.ndarray, weights: Sequence[float],
             base: np.ndarray | None = None) -> np.ndarray:
  """sum_k w_k theta_k with weights normalised to sum to 1."""
  del base
  w = normalise_weights(weights, thetas.shape[0]).astype(thetas.dtype)
  return np.tensordot(w, thetas, axes=1)


def task_arithmetic(thetas: np.ndarray, base: np.ndarray, lam: float = 1.0) -> np.ndarray:
  """theta_0 + lam * sum_k tau_k / K; lam = 1 is the plain mean."""
  return base + lam * (thetas - base).mean(axis=0)


def trim_top_magnitude(tau: np.ndarray, density: float) -> np.ndarray:
  """Keeps, per task vector tau[k], its int(density * size) largest-magnitude entries."""
  flat = tau.reshape(tau.shape[0], -1)
  keep = int(density * flat.shape[1])
  out = np.zeros_like(flat)
  if keep >= flat.shape[1]:
    return tau.copy()
  if keep > 0:
    idx = np.argpartition(-np.abs(flat), keep - 1, axis=1)[:, :keep]
    np.put_along_axis(out, idx, np.take_along_axis(flat, idx, axis=1), axis=1)
  return out.reshape(tau.shape)


def ties(thetas: np.ndarray, base: np.ndarray, density: float = 0.2,
         lam: float = 1.0) -> np.ndarray:
  """TIES-merging: trim each tau_k to its top-`density` magnitudes, elect the sign of the summed
  trimmed values per entry, average the entries that agree with it (disjoint mean; 0 where
  none do), and add lam times the result to theta_0."""
  trimmed = trim_top_magnitude(thetas - base, density)
  sign = np.sign(trimmed.sum(axis=0))
  agree = (np.sign(trimmed) == sign) & (trimmed != 0)
  count = agree.sum(axis=0)
  merged = np.where(agree, trimmed, 0).sum(axis=0) / np.maximum(count, 1)
  return base + lam * merged.astype(base.dtype)


def dare(thetas: np.ndarray, base: np.ndarray, density: float = 0.2, lam: float = 1.0,
         rng: np.random.Generator | None = None) -> np.ndarray:
  """DARE (mergekit's dare_linear): drop each task-vector entry with probability 1 - density,
  rescale the survivors by 1 / density, then task arithmetic."""
  rng = rng if rng is not None else np.random.default_rng(0)
  tau = thetas - base
  keep = rng.random(tau.shape) < density
  return base + lam * (np.where(keep, tau, 0) / density).mean(axis=0).astype(base.dtype)


# The command-line flag of each MergeRecipe field (`merge` and `export-hf` name flags).
RECIPE_FLAGS = {'method': '--method', 'weights': '--weights', 'lam': '--lambda',
                'density': '--density', 'seed': '--seed'}
# The run config field of each (a run's final merge: config.merge).
RECIPE_CONFIG_FIELDS = {'method': 'merge.method', 'lam': 'merge.lam',
                        'density': 'merge.density'}
# Largest |lambda| accepted: a task vector scaled further is no longer a merge of the inputs.
MAX_ABS_LAMBDA = 100.0


class RecipeFieldError(FieldError, MergeError):
  """A bad MergeRecipe field, named by its command-line flag ('--lambda: ...')."""

  def __init__(self, owner: str, field: str, why: str):
    super().__init__(owner, field, why)
    self.args = (f'{RECIPE_FLAGS.get(field, field)}: {why}',)


@dataclasses.dataclass(frozen=True)
class MergeRecipe:
  """Which method with which options; `weights` for 'weighted', `lam` for task arithmetic, TIES
  and DARE, `density` for TIES and DARE, `seed` for DARE's random drop. Every value is checked
  here once: non-finite or out-of-range numbers would write an all-NaN or meaningless model."""
  method: str = 'mean'
  weights: tuple[float, ...] | None = None
  lam: float = 1.0
  density: float = 0.2
  seed: int = 0

  def __post_init__(self):
    check = Fields('MergeRecipe', RecipeFieldError)
    check.check(self.method in METHODS, 'method',
                f'unknown method {self.method!r}; choose from {", ".join(METHODS)}')
    check.check(self.method != 'weighted' or bool(self.weights), 'weights',
                'required for --method weighted')
    check.check(not self.weights or self.method == 'weighted', 'weights',
                f'only used by --method weighted (got --method {self.method})')
    check.real('lam', self.lam, -MAX_ABS_LAMBDA, MAX_ABS_LAMBDA)
    check.real('density', self.density, 0, 1, low_open=True)
    check.check(self.weights is None or all(map(math.isfinite, self.weights)), 'weights',
                f'must be finite numbers, got {list(self.weights or ())}')
    check.check(isinstance(self.seed, int) and 0 <= self.seed < 2**63, 'seed',
                f'must be an integer in [0, 2^63), got {self.seed}')

  @classmethod
  def from_config(cls, config) -> 'MergeRecipe | None':
    """The final merge of a run from config.merge (None for method 'none'); a bad value names
    its config field."""
    m = config.merge
    with named_by_config(RECIPE_CONFIG_FIELDS):
      if m.method == 'none':
        Fields('MergeRecipe', RecipeFieldError).real('lam', m.lam)
        return None
      return cls(m.method, None, m.lam, m.density)

  def as_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {'method': self.method}
    if self.method == 'weighted':
      out['weights'] = list(self.weights)
    if self.method in NEEDS_BASE:
      out['lambda'] = self.lam
    if self.method in ('ties', 'dare'):
      out['density'] = self.density
    if self.method == 'dare':
      out['seed'] = self.seed
    return out


def merge_tensor(recipe: MergeRecipe, thetas: np.ndarray, base: np.ndarray | None = None,
                 name: str = '') -> np.ndarray:
  """Applies `recipe` to one tensor's [K, ...] values (float32); `name` seeds DARE per tensor."""
  m = recipe.method
  if m == 'mean':
    return mean(thetas)
  if m == 'weighted':
    return weighted(thetas, recipe.weights)
  if base is None:
    raise MergeError(f'--base: required for --method {m}')
  if m == 'task_arithmetic':
    return task_arithmetic(thetas, base, recipe.lam)
  if m == 'ties':
    return ties(thetas, base, recipe.density, recipe.lam)
  rng = np.random.default_rng([recipe.seed, zlib.crc32(name.encode())])
  return dare(thetas, base, recipe.density, recipe.lam, rng)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MergeModel:
  """One model to merge: a source and, for a run checkpoint, the branch."""
  source: ckpt.ParamsSource
  branch: int | None
  label: str


def parse_input(spec: str) -> tuple[str, int | None]:
  """'PATH' or 'PATH:BRANCH' -> (path, branch or None)."""
  head, sep, tail = spec.rpartition(':')
  if sep and tail.isdigit() and head:
    return head, int(tail)
  return spec, None


def resolve_models(inputs: str | Sequence[str]) -> list[MergeModel]:
  """A workdir/checkpoint path (all its branches) or a list of PATH[:BRANCH] specs."""
  specs = [inputs] if isinstance(inputs, str) else list(inputs)
  models = []
  for spec in specs:
    path, branch = parse_input(spec)
    source = ckpt.open_source(path)
    if source.kind == 'run':
      branches = range(source.num_branches) if branch is None else [branch]
      for b in branches:
        if not 0 <= b < source.num_branches:
          raise MergeError(f'{spec}: branch {b} is out of range (the checkpoint has '
                           f'{source.num_branches} branches)')
        models.append(MergeModel(source, b, f'{source.path}:{b}'))
    else:
      if branch not in (None, 0):
        raise MergeError(f'{spec}: a single model ({source.kind} checkpoint) has no branch '
                         f'{branch}')
      models.append(MergeModel(source, None, source.path))
  if len(models) < 2 and not isinstance(inputs, str):
    raise MergeError(f'--inputs: need at least two models to merge, got {len(models)}')
  if not models:
    raise MergeError('no models to merge')
  return models


def _tokenizer_digest(folder: str) -> dict[str, str]:
  if not storage.is_dir(folder):
    raise MergeError(f'tokenizer_dir {folder}: does not exist')
  digest = {}
  for name in hf_io.TOKENIZER_FILES:
    path = storage.join(folder, name)
    if storage.is_file(path):
      digest[name] = hashlib.sha256(storage.read_bytes(path)).hexdigest()
  return digest


def check_compatible(models: Sequence[MergeModel], base: ckpt.ParamsSource | None = None) -> None:
  """Raises MergeError naming the first difference in architecture (model_config), tensor set
  or shapes, or tokenizer files between the models (and the base)."""
  entries = [(m.label, m.source) for m in models]
  if base is not None:
    entries.append((f'base {base.path}', base))
  ref_label, ref = entries[0]
  ref_config = dataclasses.asdict(ref.model_config)
  ref_paths = dict(ckpt.flatten_paths(ref.shapes))
  for label, source in entries[1:]:
    config = dataclasses.asdict(source.model_config)
    for field, value in ref_config.items():
      if config[field] != value:
        raise MergeError(f'merge inputs differ: model_config.{field} is {value!r} in {ref_label} '
                         f'but {config[field]!r} in {label}')
    paths = dict(ckpt.flatten_paths(source.shapes))
    for path in sorted(set(ref_paths) ^ set(paths)):
      where, other = (ref_label, label) if path in ref_paths else (label, ref_label)
      raise MergeError(f'merge inputs differ: tensor {".".join(path)} is in {where} '
                       f'but not in {other}')
    for path, shape in ref_paths.items():
      if paths[path] != shape:
        raise MergeError(f'merge inputs differ: tensor {".".join(path)} has shape {shape} in '
                         f'{ref_label} but {paths[path]} in {label}')
  tokenizers = [(label, s.tokenizer_dir) for label, s in entries if s.tokenizer_dir]
  if tokenizers:
    ref_label, ref_dir = tokenizers[0]
    ref_digest = _tokenizer_digest(ref_dir)
    for label, folder in tokenizers[1:]:
      digest = _tokenizer_digest(folder)
      for name in sorted(set(ref_digest) | set(digest)):
        if ref_digest.get(name) != digest.get(name):
          raise MergeError(f'merge inputs differ: tokenizer file {name} of {ref_label} '
                           f'({ref_dir}) and {label} ({folder}) are not the same')


def default_base(models: Sequence[MergeModel]) -> str | None:
  """The base_params recorded in the run checkpoints' meta, when they all name the same one."""
  bases = {m.source.meta.get(ckpt.META_BASE_PARAMS) for m in models}
  return bases.pop() if len(bases) == 1 else None


# ---------------------------------------------------------------------------------------------
# Streaming merge
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MergeResult:
  params: dict[str, Any]        # pure-dict tree of the merged model (host arrays)
  model_config: Any             # Qwen3Config, or Qwen3VLConfig for a Qwen3-VL model
  tokenizer_dir: str | None
  meta: dict[str, Any]          # what the params-only checkpoint's meta holds


def _blocks(unit_shape: tuple[int, ...], method: str,
            block_bytes: int) -> list[tuple[slice, ...] | None]:
  """Index tuples splitting one tensor along its largest axis (the axis Orbax chunks) into
  blocks of at most block_bytes of float32 per model; one block for TIES, whose trimming ranks
  the whole tensor."""
  if method == 'ties' or len(unit_shape) < 2:
    return [None]
  axis = int(np.argmax(unit_shape))
  step = max(1, block_bytes // (4 * math.prod(unit_shape) // unit_shape[axis]))
  if step >= unit_shape[axis]:
    return [None]
  lead = (slice(None),) * axis
  return [lead + (slice(i, min(i + step, unit_shape[axis])),)
          for i in range(0, unit_shape[axis], step)]


def merge_models(models: Sequence[MergeModel], recipe: MergeRecipe,
                 base: ckpt.ParamsSource | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False
                 ) -> dict[str, Any]:
  """Merged pure-dict params (jax arrays on the host CPU), read and merged one tensor (one
  layer of it, or one block of it for element-wise methods) at a time. progress: a tqdm bar
  over the tensors."""
  first = models[0].source
  out: dict[str, Any] = {}
  for path, shape in tqdm(list(ckpt.flatten_paths(first.shapes)), desc='merge', unit='tensor',
                          disable=not progress, dynamic_ncols=True):
    dtype = np.dtype(ckpt.get_path(first.dtypes, path))
    leaf = np.empty(shape, dtype)
    layers = range(shape[0]) if path[0] == 'layers' else [None]
    for layer in layers:
      unit = leaf if layer is None else leaf[layer]
      for block in _blocks(unit.shape, recipe.method, block_bytes):
        target = unit if block is None else unit[block]
        thetas = np.empty((len(models),) + target.shape, np.float32)
        for k, m in enumerate(models):
          thetas[k] = m.source.read(path, m.branch, layer, block)
        base_value = (base.read(path, None, layer, block).astype(np.float32)
                      if base is not None else None)
        name = '.'.join(path) + ('' if layer is None else f'.{layer}') + (
            '' if block is None else f'.{block[-1].start}')
        target[...] = merge_tensor(recipe, thetas, base_value, name)
        del thetas, base_value
    ckpt.set_path(out, path, _on_host(leaf))
    del leaf
  return out


def _on_host(x: np.ndarray):
  """x as a jax array on the host CPU: Orbax writes those with about half the transient memory
  of numpy arrays. Falls back to numpy where no CPU backend is enabled."""
  try:
    cpu = jax.local_devices(backend='cpu')[0]   # this process's own (merging may run on one)
  except RuntimeError:
    return x
  return jax.device_put(x, cpu)


def merge_checkpoints(inputs: str | Sequence[str], method: str = 'mean', *,
                      base: str | None = None, weights: Sequence[float] | None = None,
                      lam: float = 1.0, density: float = 0.2, seed: int = 0,
                      out: str | None = None, overwrite: bool = False,
                      progress: bool = False) -> MergeResult:
  """Merges the models named by `inputs` (a run workdir or checkpoint: all its branches; or a
  list of PATH[:BRANCH]) and, with `out`, writes a params-only checkpoint there. Any path may be
  local or remote (gs://...).

  base: theta_0 (HF folder or params-only checkpoint) for task_arithmetic / ties / dare;
  defaults to the base_params recorded in the run's meta."""
  recipe = MergeRecipe(method, tuple(weights) if weights else None, lam, density, seed)
  if out is not None and storage.exists(out) and not overwrite:
    raise MergeError(f'--out {out}: already exists (remove it or choose another --out)')
  models = resolve_models(inputs)
  if recipe.method == 'weighted':
    normalise_weights(recipe.weights, len(models))
  if base is None and recipe.method in NEEDS_BASE:
    base = default_base(models)
    if base is None:
      raise MergeError(f'--base: required for --method {recipe.method} (the inputs record no '
                       'common base_params)')
  base_source = ckpt.open_source(base) if base is not None and recipe.method in NEEDS_BASE else None
  if base_source is not None and base_source.kind == 'run':
    raise MergeError(f'--base {base}: must be a HF folder or params-only checkpoint, not a run')
  check_compatible(models, base_source)
  params = merge_models(models, recipe, base_source, progress=progress)
  bad = finite.first_nonfinite(params)
  if bad is not None:
    raise MergeError(f'merged model: {finite.describe(bad)} (from the inputs '
                     f'{", ".join(m.label for m in models)}); nothing written')
  first = models[0].source
  meta = {'kind': 'merged', ckpt.META_MODEL_CONFIG: dataclasses.asdict(first.model_config),
          ckpt.META_TOKENIZER_DIR: first.tokenizer_dir,
          ckpt.META_BASE_PARAMS: base_source.path if base_source else None,
          'merge': {**recipe.as_dict(), 'inputs': [m.label for m in models]}}
  if out is not None:
    ckpt.save_params_checkpoint(out, params, meta, tokenizer_dir=first.tokenizer_dir,
                                overwrite=overwrite, output_of='merge')
  return MergeResult(params, first.model_config, first.tokenizer_dir, meta)
