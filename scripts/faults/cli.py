"""Running the copd_jax command line for a fault case: in this process (stderr captured, with an
optional tripwire where real work would begin) or in a fresh interpreter."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Iterator, Sequence, TypeVar

from scripts.faults.report import without_folders

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_CONFIG = os.path.join(ROOT, 'configs', 'toy_copd.py')
# In-process cases run on 8 host devices (as under tests/conftest.py); with 8 devices the toy
# config's K=2 branches need fsdp=4 to leave branch=2 on the mesh.
IN_PROCESS_DEVICES = 8
BASE_OVERRIDES = ('--config.mesh.fsdp=4',)


class ComputeStarted(Exception):
  """Raised by a tripwire where the run would begin its first real work."""


@contextlib.contextmanager
def tripwire(target: str):
  """Replaces the function `target` ('copd_jax.module.attribute') by one raising ComputeStarted."""
  module_name, attribute = target.rsplit('.', 1)
  module = importlib.import_module(module_name)
  original = getattr(module, attribute)

  def tripped(*args, **kwargs):
    raise ComputeStarted(f'{target} was called')

  setattr(module, attribute, tripped)
  try:
    yield
  finally:
    setattr(module, attribute, original)


def is_logging_noise(line: str) -> bool:
  """absl / Orbax log lines (e.g. 'WARNING:absl:... read only'), not the program's message."""
  return line.startswith(('WARNING:absl:', 'INFO:absl:', 'W0', 'I0')) or not line.strip()


@dataclasses.dataclass
class CliResult:
  code: int | str           # exit status, or 'compute started' / an exception name
  stderr: str

  @property
  def lines(self) -> list[str]:
    """stderr without absl / Orbax logging lines."""
    return [l for l in self.stderr.splitlines() if not is_logging_noise(l)]

  @property
  def errors(self) -> list[str]:
    return [l for l in self.lines if l.startswith('error:')]

  @property
  def message(self) -> str:
    """The first `error:` line, else the last line."""
    return (self.errors or self.lines[-1:] or [''])[0]

  @property
  def one_error_line(self) -> bool:
    """Exit status 2 and stderr is exactly one `error: ...` line."""
    return self.code == 2 and len(self.lines) == 1 and self.message.startswith('error: ')


def run_cli(argv: Sequence[str]) -> CliResult:
  """`python -m copd_jax ARGV` in this process: (exit status, stderr)."""
  from copd_jax.__main__ import main
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      code = main(list(argv))
    except SystemExit as e:
      if not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
      code = e.code if isinstance(e.code, int) else 1
    except ComputeStarted:
      code = 'compute started'
    except Exception as e:  # a traceback in real life
      print(f'{type(e).__name__}: {e}', file=sys.stderr)
      code = f'crash ({type(e).__name__})'
  return CliResult(code, err.getvalue())


def module_command(argv: Sequence[str]) -> list[str]:
  """The command line of `python -m copd_jax ARGV` with this interpreter."""
  return [sys.executable, '-m', 'copd_jax', *argv]


def cli_subprocess(argv: Sequence[str], env: dict[str, str]) -> tuple[int, str]:
  """`python -m copd_jax ARGV` in a fresh interpreter: (exit status, its first `error:` line,
  else its first stderr line, else its first stdout line)."""
  result = subprocess.run(module_command(argv), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  cli = CliResult(result.returncode, result.stderr)
  return result.returncode, (cli.errors or cli.lines or result.stdout.strip().splitlines()
                             or [''])[0]


def fresh_workdir(folder: str) -> str:
  """`folder`/workdir, not existing (removed if it did)."""
  workdir = os.path.join(folder, 'workdir')
  shutil.rmtree(workdir, ignore_errors=True)
  return workdir


@dataclasses.dataclass
class InputOutcome:
  """What a bad config or data file did."""
  label: str
  result: CliResult
  workdir_created: bool
  workdir_entries: list[str]
  ok: bool


Case = TypeVar('Case')


def try_in_temp_folders(cases: Sequence[Case], attempt: Callable[[Case, str], InputOutcome],
                        folder: str) -> Iterator[tuple[int, Case, InputOutcome, str]]:
  """Each case tried in its own temporary folder inside `folder`: (1-based number, case,
  outcome, its message with the temporary folder's path removed)."""
  for i, case in enumerate(cases, 1):
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
      outcome = attempt(case, tmp)
      message = without_folders(outcome.result.message, tmp)
    yield i, case, outcome, message
