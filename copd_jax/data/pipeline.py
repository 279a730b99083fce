"""Grain pipelines of prompts: per-branch shuffled, repeated, batched streams of `Example`s.

A branch's stream is `MapDataset.source(examples).shuffle(seed_k).repeat().batch(B)`: every
epoch is a fresh permutation (grain folds the epoch into the shuffle seed), batches may span an
epoch boundary, and the whole stream is a pure function of (examples, B, seed_k). The iterator
state is grain's own dict of ints, so the loader's state is plain JSON.

With `mix_domains=True` a branch's examples are grouped by `Example.domain` and the groups are
interleaved with equal weight (`MapDataset.mix`), whatever their sizes: the mixed-data baseline
is one branch over the union of all domains.
"""
from __future__ import annotations

import hashlib
from typing import Any, Sequence

import grain

from copd_jax.data.domain import Example
from copd_jax.errors import UserInputError

# Synchronous reads: elements are tiny Python objects and order must not depend on threads.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def derive_seed(seed: int, *keys: Any) -> int:
  """A 32-bit seed from a base seed and keys; unrelated streams for different keys (grain's
  per-epoch seed is seed + epoch, so consecutive integer seeds would share permutations)."""
  text = '/'.join(str(k) for k in (seed, *keys))
  return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], 'little')


def _batch_list(items: Sequence[Example]) -> list[Example]:
  return list(items)


def example_stream(examples: Sequence[Example], seed: int) -> grain.MapDataset:
  """Infinite stream: a new permutation of `examples` each epoch."""
  if not examples:
    raise UserInputError('a prompt stream needs at least one example')
  return grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat()


def mixed_stream(examples: Sequence[Example], seed: int,
                 weights: dict[str, float] | None = None) -> grain.MapDataset:
  """Infinite stream interleaving the domains of `examples` (uniform unless `weights` maps
  each domain name to a positive weight); each domain is shuffled with its own seed."""
  groups: dict[str, list[Example]] = {}
  for ex in examples:
    groups.setdefault(ex.domain, []).append(ex)
  if not groups:
    raise UserInputError('a mixed prompt stream needs at least one example')
  names = sorted(groups)
  if len(names) == 1:
    return example_stream(groups[names[0]], derive_seed(seed, names[0]))
  if weights is None:
    proportions = [1.0] * len(names)
  else:
    missing = [n for n in names if n not in weights]
    if missing:
      raise UserInputError(f'mixture weights lack domain(s) {", ".join(missing)}')
    proportions = [float(weights[n]) for n in names]
    if any(p <= 0 for p in proportions):
      raise UserInputError(f'mixture weights must be positive, got {weights}')
  streams = [example_stream(groups[n], derive_seed(seed, n)) for n in names]
  return grain.MapDataset.mix(streams, weights=proportions)


def batched_stream(examples: Sequence[Example], batch_size: int, seed: int,
                   mix_domains: bool = False) -> grain.MapDataset:
  """Infinite stream of batches (lists of `batch_size` Examples)."""
  if batch_size < 1:
    raise UserInputError(f'batch_size must be >= 1, got {batch_size}')
  stream = mixed_stream(examples, seed) if mix_domains else example_stream(examples, seed)
  # The stream is infinite, so there is no remainder to keep. drop_remainder=True makes grain
  # size it as len // batch_size; without it grain takes ceil(len / batch_size) in floats,
  # which for batch_size 1 rounds sys.maxsize up past what len() may return (OverflowError at
  # loader set-up). The batches themselves are the same either way.
  return stream.batch(batch_size, drop_remainder=True, batch_fn=_batch_list)


class BranchPromptLoader:
  """K independent prompt streams, one per branch; `next()` returns a [K][B] nested list.

  Branch k draws from `domains_per_branch[k]` with seed `derive_seed(seed, 'branch', k)`.
  `get_state()` is JSON-serialisable; `set_state()` checks that it belongs to a loader with the
  same branch count, batch size, seed and data sizes, then resumes exactly where it left off.
  """

  def __init__(self, domains_per_branch: Sequence[Sequence[Example]], batch_size: int, seed: int,
               mix_domains: bool = False, sources: Sequence[str] = ()):
    """sources: per branch, where its examples come from (data files, 'synthetic'), for the
    message of a resume whose data sizes changed."""
    if not domains_per_branch:
      raise UserInputError('BranchPromptLoader needs at least one branch')
    for k, examples in enumerate(domains_per_branch):
      if not examples:
        raise UserInputError(f'branch {k} has no training examples')
    self.batch_size = batch_size
    self.seed = seed
    self.mix_domains = mix_domains
    self.sizes = [len(examples) for examples in domains_per_branch]
    self.sources = list(sources)
    self._datasets = [
        batched_stream(examples, batch_size, derive_seed(seed, 'branch', k), mix_domains)
        for k, examples in enumerate(domains_per_branch)]
    self._iterators = [iter(ds.to_iter_dataset(_READ_OPTIONS)) for ds in self._datasets]

  @property
  def num_branches(self) -> int:
    return len(self._iterators)

  def next(self) -> list[list[Example]]:
    """One batch per branch: [K][B] Examples."""
    return [next(it) for it in self._iterators]

  def __iter__(self):
    return self

  def __next__(self) -> list[list[Example]]:
    return self.next()

  def _fingerprint(self) -> dict[str, Any]:
    return {'batch_size': self.batch_size, 'seed': self.seed, 'mix_domains': self.mix_domains,
            'sizes': list(self.sizes)}

  def get_state(self) -> dict[str, Any]:
    """{'branches': [grain iterator state per branch], plus the loader's fingerprint}."""
    return {'branches': [it.get_state() for it in self._iterators], **self._fingerprint()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Resume from `get_state()` output (possibly after a JSON round trip)."""
    mine = self._fingerprint()
    for key, value in mine.items():
      theirs = state.get(key)
      if key == 'sizes' and isinstance(theirs, list) and len(theirs) == len(value):
        changed = [k for k, (a, b) in enumerate(zip(theirs, value)) if a != b]
        if changed:
          k = changed[0]
          source = f' from {self.sources[k]}' if k < len(self.sources) else ''
          # --accept-changed-data cannot help: the saved position is one in a permutation of
          # that many examples.
          raise UserInputError(f'data loader state does not match this run: branch {k} had '
                               f'{theirs[k]:,} training examples at the checkpoint and has '
                               f'{value[k]:,} now{source}; a resume continues the data order '
                               'of the checkpoint, which needs as many examples as then '
                               '(changed rows can be accepted, added or removed ones cannot): '
                               'restore the data or use a new --workdir')
      if theirs != value:
        raise UserInputError(f'data loader state does not match this run: {key} is {theirs!r} '
                             f'in the checkpoint but {value!r} now')
    branches = state.get('branches')
    if not isinstance(branches, list) or len(branches) != self.num_branches:
      raise UserInputError(f'data loader state has {len(branches or [])} branches, the run has '
                           f'{self.num_branches}')
    for it, branch_state in zip(self._iterators, branches):
      it.set_state(dict(branch_state))


def mixed_loader(domains: Sequence[Sequence[Example]], batch_size: int, seed: int,
                 num_branches: int = 1) -> BranchPromptLoader:
  """The mixed-data baseline: each of `num_branches` branches draws uniformly over the union of
  `domains` (equal weight per domain name)."""
  union = [ex for examples in domains for ex in examples]
  return BranchPromptLoader([union] * num_branches, batch_size, seed, mix_domains=True)


def eval_batches(examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
  """Every example once, in order, in batches of `batch_size` (the last may be shorter)."""
  if batch_size < 1:
    raise UserInputError(f'batch_size must be >= 1, got {batch_size}')
  return [list(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
