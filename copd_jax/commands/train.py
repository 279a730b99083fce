"""`python -m copd_jax train --config FILE --workdir DIR [--config.a.b=value ...]`

Runs the experiment in the config file (or resumes it from DIR's newest checkpoint): the base
model, N cycles of GRPO and mutual OPD over K branches, the merge, and the evaluation table.
The run holds DIR's lock while it runs (a second `train` on DIR is refused), refuses a DIR that
holds another run's files unless --overwrite, and refuses to resume on data files that changed
since the newest checkpoint unless --accept-changed-data (copd_jax/workdir_claim.py).
"""
from __future__ import annotations

from copd_jax.config import ConfigError, check_config, read_config

ACCEPTS_EXTRA = True  # --config.a.b=value overrides


def add_arguments(parser) -> None:
  parser.add_argument('--config', required=True, help='config file (configs/*.py)')
  parser.add_argument('--workdir', required=True, help='output folder; resumes if it has checkpoints')
  parser.add_argument('--no-progress', action='store_true', help='no progress bar')
  parser.add_argument('--stop-after', type=int, default=None,
                      help='stop after this many global steps (the run resumes later)')
  parser.add_argument('--overwrite', action='store_true',
                      help='start in a non-empty --workdir that holds no checkpoint of this run '
                           '(its metrics.jsonl is replaced)')
  parser.add_argument('--accept-changed-data', action='store_true',
                      help='resume even though a data file changed since the newest checkpoint '
                           '(logged as a warning)')


def load_run_config(path: str, overrides=()):
  """The validated config of a run, after asking jax for one CPU device per core that the
  config's meshes can use (copd_jax.host_devices; a no-op on GPU / TPU hosts). The device count
  must be set before jax starts its backends, i.e. before validation's first device query."""
  from copd_jax import host_devices  # imports jax: kept out of `train --help`
  config = read_config(path, overrides)
  host_devices.configure_for_config(config)
  check_config(config, path)
  return config


def run(args, hooks=()) -> int:
  """hooks: copd_jax.hooks.Hook objects for the run (tests and the fault harness)."""
  bad = [a for a in args.extra if not a.startswith('--config.')]
  if bad:
    raise ConfigError(f'unrecognized arguments: {" ".join(bad)} (overrides look like '
                      '--config.section.field=value)')
  from copd_jax import distributed
  distributed.maybe_initialize()  # multi-host: before anything asks jax about devices
  config = load_run_config(args.config, args.extra)  # all checks before any compute
  from copd_jax.driver import train  # heavy imports after the config is known to be good
  from copd_jax.workdir_claim import claim
  with claim(args.workdir, config, overwrite=args.overwrite,
             accept_changed_data=args.accept_changed_data, primary=distributed.is_primary()):
    train(config, args.workdir, progress=not args.no_progress, stop_after=args.stop_after,
          hooks=hooks)
  return 0
