"""Run checkpoints: a run's (state pytree, meta dict) per step in `<workdir>/checkpoints/`, saved
asynchronously, restored with a digest check, older ones kept or deleted by the retention rule
(copd_jax/retention.py), unreadable ones set aside."""
from __future__ import annotations

import dataclasses
import datetime
import warnings
from typing import Any, Callable, Mapping, Sequence

import orbax.checkpoint as ocp
from etils import epath

from copd_jax import digests, disk_space, storage
from copd_jax.checkpoint.layout import (CHECKPOINTS_SUBDIR, DIGESTS, META, PARAMS, STATE,
                                        UNREADABLE_SUBDIR, CheckpointError, DigestMismatch,
                                        check_json, first_line, chunked_save_args, read_meta)
from copd_jax.retention import preserved_steps

@dataclasses.dataclass
class _RunPreservation:
  """Orbax preservation policy: the newest `keep_marked` checkpoints marked kept (saved with
  keep=True, or whose step satisfies keep_fn; -1 = all of them), plus the newest `keep_last`
  of the others. A marked checkpoint beyond `keep_marked` counts as an ordinary one, so the
  newest checkpoint always survives and at most keep_last + keep_marked stay on disk."""
  keep_last: int
  kept: set[int]
  keep_fn: Callable[[int], bool] | None = None
  keep_marked: int = -1

  def is_kept(self, step: int) -> bool:
    return step in self.kept or bool(self.keep_fn and self.keep_fn(step))

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    steps = [c.step for c in checkpoints]
    keep = preserved_steps(steps, self.is_kept, self.keep_last, self.keep_marked)
    return [s in keep for s in steps]


class RunCheckpointer:
  """Saves and restores a run's (state pytree, meta dict) in `<workdir>/checkpoints`.

  Saves are asynchronous by default (device-to-host copy blocks; writing runs in the
  background; call `wait()` before reading the files, `close()` at the end). Old checkpoints
  are deleted only after a newer one is committed.
  """

  def __init__(self, workdir: str, *, keep_last: int = 3, save_interval_steps: int = 1,
               keep_fn: Callable[[int], bool] | None = None, keep_marked: int = -1,
               async_save: bool = True, read_only: bool = False):
    """keep_last: how many of the newest ordinary checkpoints stay; keep_marked: how many of the
    newest checkpoints saved with keep=True (or keep_fn) stay besides them (-1 = all; the run
    passes config.checkpoint.keep_phase_ends, its phase ends being the marked ones)."""
    if keep_last < 1:
      raise ValueError(f'keep_last must be >= 1, got {keep_last}')
    if keep_marked < -1:
      raise ValueError(f'keep_marked must be >= 0, or -1 for all, got {keep_marked}')
    self.workdir = storage.resolve(workdir)
    self.directory = storage.join(self.workdir, CHECKPOINTS_SUBDIR)
    self.read_only = read_only
    self._policy = _RunPreservation(keep_last, set(), keep_fn, keep_marked)
    policies = ocp.checkpoint_managers
    # Saves land on multiples of the interval (or when forced / kept, or on preemption).
    save_policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_interval_steps),
                                          policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy, preservation_policy=self._policy,
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)
    if read_only and not storage.is_dir(self.directory):
      raise CheckpointError(f'{self.directory}: no checkpoints directory')
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()})
    for step in self._manager.all_steps():
      if self._marked_keep(step):
        self._policy.kept.add(step)

  def _marked_keep(self, step: int) -> bool:
    try:
      return bool((self._manager.metadata(step).custom_metadata or {}).get('keep'))
    except Exception:  # an unreadable step is not kept; restore() reports it
      return False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def kept_steps(self) -> list[int]:
    return sorted(s for s in self.all_steps() if self._policy.is_kept(s))

  def save(self, step: int, state: Any, meta: Mapping[str, Any], *, force: bool = False,
           keep: bool = False) -> bool:
    """Starts saving `state` and `meta` at `step`; returns False (writing nothing) when the save
    interval skips this step or a checkpoint at or after `step` exists. keep=True (or keep_fn)
    saves regardless of the interval and exempts the checkpoint from keep_last while it is
    among the newest `keep_marked` marked ones."""
    check_json(meta)
    keep = keep or self._policy.is_kept(step)
    if keep:
      self._policy.kept.add(step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      return False
    if latest is not None and not storage.is_remote(self.directory) and (
        force or keep or self._manager.should_save(step)):
      self._manager.wait_until_finished()  # the previous save's bytes count as used
      # The newest checkpoint's size on disk (compressed as this one will be) is the estimate.
      disk_space.check_room_for_checkpoint(
          self.directory, disk_space.folder_bytes(self._step_dir(latest)), step)
    meta = {**meta, DIGESTS: digests.tree_digests(state, per_branch=_is_params_leaf)}
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state, chunked_save_args(state)),
                                 META: ocp.args.JsonSave(meta)})
    return bool(self._manager.save(step, args=args, force=force or keep,
                                   custom_metadata={'keep': keep}))

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of `step`, or of the newest checkpoint that reads back completely.

    abstract_state: the target pytree of jax.ShapeDtypeStruct (with `.sharding` for device
    placement) or arrays. Unreadable newer checkpoints are reported with a warning and moved to
    `<workdir>/checkpoints_unreadable/` (unless read-only) so the resumed run can save those
    steps again.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'{self.directory}: no checkpoint to restore')
    failed: list[tuple[int, Exception]] = []
    for s in steps:
      args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                   META: ocp.args.JsonRestore()})
      try:
        restored = self._manager.restore(s, args=args)
        _verify_digests(restored[META], restored[STATE])
      except Exception as e:  # a damaged step raises whatever its reader hits; fall back
        if step is not None:
          raise CheckpointError(f'{self._step_dir(s)}: cannot restore ({type(e).__name__}: '
                                f'{first_line(e)})') from e
        failed.append((s, e))
        continue
      moved = self._set_aside([f for f, _ in failed]) if failed and not self.read_only else {}
      for f, e in failed:  # one line per damaged step, said once the fallback has worked
        warnings.warn(f'{self._step_dir(f)}: unreadable checkpoint ({type(e).__name__}: '
                      f'{first_line(e)}); falling back to step {s}'
                      + (f'; moved it to {moved[f]}' if f in moved else ''), stacklevel=2)
      return restored[STATE], dict(restored[META])
    newest, error = failed[0]
    raise CheckpointError(f'{self.directory}: no checkpoint restores; newest (step {newest}) '
                          f'failed with {type(error).__name__}: {first_line(error)}') from error

  def restore_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory}: no checkpoint')
    return read_meta(self._step_dir(step))

  def _step_dir(self, step: int) -> str:
    return str(ocp.step.build_step_path(epath.Path(self.directory),
                                        ocp.step.standard_name_format(), step))

  def _set_aside(self, steps: Sequence[int]) -> dict[int, str]:
    """Moves these steps to checkpoints_unreadable/; returns where each went."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = storage.join(self.workdir, UNREADABLE_SUBDIR)
    storage.makedirs(target)
    moved = {}
    for s in steps:
      moved[s] = storage.join(target, f'{s}-{stamp}')
      storage.move(self._step_dir(s), moved[s])
    self._manager.reload()
    return moved

  def wait(self) -> None:
    """Blocks until every started save is committed to disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> 'RunCheckpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _is_params_leaf(name: str) -> bool:
  """Leaves of the state's 'params' field, read one branch at a time by ParamsSource."""
  return name.split('/', 1)[0] == PARAMS


def _verify_digests(meta: Mapping[str, Any], state: Any) -> None:
  """Raises DigestMismatch when a restored array differs from the digest saved with it
  (checkpoints written before digests existed are not checked)."""
  saved = meta.get(DIGESTS)
  if not saved:
    return
  bad = digests.mismatches(saved, state)
  if len(bad) == 1:
    raise DigestMismatch(f'array {bad[0]} differs from the digest saved with it (corrupted on '
                         'disk)')
  if bad:
    raise DigestMismatch(f'arrays {bad[0]} and {len(bad) - 1} more differ from the digests '
                         'saved with them (corrupted on disk)')
