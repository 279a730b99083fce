"""The copd_jax command line: `python -m copd_jax <command> ...` or `copd-jax <command> ...`.

`copd-jax` is the installed command (`pip install .`; pyproject.toml's [project.scripts] names
`main`).

Each command lives in `copd_jax/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`; this file only dispatches (modules are imported lazily so `--help` is fast).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings

from copd_jax import disk_space
from copd_jax.errors import TrainingHalted, UserInputError

COMMANDS = {
    'train': ('copd_jax.commands.train', 'run CoPD (or a baseline) from a config file'),
    'generate': ('copd_jax.commands.generate', 'sample completions from a model or checkpoint'),
    'evaluate': ('copd_jax.commands.evaluate', 'per-domain accuracy of every branch and the merge'),
    'merge': ('copd_jax.commands.merge', 'merge branch checkpoints (mean, task arithmetic, TIES)'),
    'export-hf': ('copd_jax.commands.export_hf', 'write a branch or merged model as a HF folder'),
    'plan': ('copd_jax.commands.plan', 'per-device memory plan of a config on N devices'),
}


def main(argv: list[str] | None = None, **run_options) -> int:
  """run_options go to the command's run(args, ...) (e.g. `hooks` of train, for the fault
  harness); the command line itself has none."""
  argv = sys.argv[1:] if argv is None else argv
  prog = program_name(sys.argv[0])
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
  available = {}
  for name, (module_name, help_text) in COMMANDS.items():
    if importlib.util.find_spec(module_name) is None:
      continue  # a command whose module is not in this build is not offered
    available[name] = module_name
    sub.add_parser(name, help=help_text)
  command = argv[0] if argv and argv[0] in available else None
  if command is None:
    parser.parse_args(argv)  # prints usage / help and exits
    return 2
  module = importlib.import_module(available[command])
  command_parser = argparse.ArgumentParser(prog=f'{prog} {command}',
                                           description=COMMANDS[command][1])
  module.add_arguments(command_parser)
  args, extra = command_parser.parse_known_args(argv[1:])
  args.extra = extra
  if extra and not getattr(module, 'ACCEPTS_EXTRA', False):
    command_parser.error(f'unrecognized arguments: {" ".join(extra)}')
  previous_hook = sys.unraisablehook
  sys.unraisablehook = _drop_closed_loop_callbacks(previous_hook)
  try:
    with warnings.catch_warnings():
      warnings.showwarning = _one_line_warning
      return int(module.run(args, **run_options) or 0)
  except UserInputError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except TrainingHalted as e:
    print(f'stopped: {e}', file=sys.stderr)
    return 3
  except Exception as e:  # a full disk, in whatever shape its writer raised it; else a bug
    if not disk_space.out_of_space(e):
      raise
    print(f'error: {disk_space.describe(e)}', file=sys.stderr)
    return 2
  finally:
    sys.unraisablehook = previous_hook


# Callbacks TensorStore still schedules on Orbax's event loops after a failed save or restore
# was abandoned (a full disk, a damaged checkpoint the run fell back from): Python reports each
# as an "Exception ignored" traceback although nothing is lost; the one-line message says it all.
_CLOSED_LOOP_ERRORS = ((RuntimeError, 'Event loop is closed'), (OSError, 'handle is closed'))


def _drop_closed_loop_callbacks(previous):
  """sys.unraisablehook that drops those callbacks' errors and passes every other on."""
  def hook(unraisable) -> None:
    error = unraisable.exc_value
    if not any(isinstance(error, kind) and str(error) == text
               for kind, text in _CLOSED_LOOP_ERRORS):
      previous(unraisable)
  return hook


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
  """warnings.showwarning of the commands: `warning: <message>` on one line (the message names
  its file, field or tensor; the source line of the warn call would only add noise)."""
  print(f'warning: {message}', file=file or sys.stderr, flush=True)


def program_name(argv0: str) -> str:
  """'copd-jax' when started by the installed command, else 'python -m copd_jax' (usage lines)."""
  return 'copd-jax' if os.path.basename(argv0).startswith('copd-jax') else 'python -m copd_jax'


if __name__ == '__main__':
  sys.exit(main())
