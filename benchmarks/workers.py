"""A benchmark worker subprocess driven line by line: the orchestrator writes `run <rep>`, the
worker answers one JSON line. Ours and the peer's (Tunix, in its own venv) run this way so both
are timed alternately from one command."""
from __future__ import annotations

import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Worker:
  def __init__(self, name: str, argv: list[str]):
    self.name = name
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env.setdefault('JAX_PLATFORMS', 'cpu')
    self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                 text=True)

  def read(self) -> dict:
    while True:
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError(f'{self.name} worker exited (code {self.proc.wait()})')
      if line.startswith('{'):
        return json.loads(line)

  def run(self, rep: int) -> dict:
    self.proc.stdin.write(f'run {rep}\n')
    self.proc.stdin.flush()
    return self.read()

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def write_json(path: str, data) -> None:
  """A benchmark's result summary as JSON (--json); nothing when path is empty."""
  if path:
    with open(path, 'w') as f:
      json.dump(data, f, indent=2)
