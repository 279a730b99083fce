"""Resume after SIGKILL of every process of a multi-process run (slow).

The tiny driver run of tests/test_multiprocess.py, two cycles (4 steps, a checkpoint after each),
as 2 processes x 4 CPU devices on a (branch=2, fsdp=4) mesh: once uninterrupted, and once killed
with SIGKILL in both processes as soon as the checkpoint of step 1 is committed (the save of
step 2 may be under way), then started again with the same command. The resumed run must end
equal to the uninterrupted one: same process layout, so the same collectives in the same order,
and every random draw derives from (seed, step); the comparison is bit for bit
(scripts/faults/runs.compare_runs: every branch's final parameters, the merged model,
metrics.jsonl without timings, eval.json).
"""
import os
import signal
import subprocess
import time

import pytest

from scripts.faults import runs
from tests.test_multiprocess import ROOT, _command, _env, _free_port

TWO_CYCLES = ['--config.copd.num_cycles=2']
KILL_AFTER_STEP = 1


def start_processes(workdir, num_processes: int, extra, log_dir, name: str
                    ) -> list[subprocess.Popen]:
  """The run's processes, started as tests/test_multiprocess.py starts them, each writing its
  output to log_dir/<name>_process<i>.log."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    env = _env(8 // num_processes, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_PROCESS_COUNT=str(num_processes), JAX_PROCESS_ID=str(i))
    out = open(log_dir / f'{name}_process{i}.log', 'w')
    procs.append(subprocess.Popen(_command(workdir, extra), cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT))
    out.close()
  return procs


def run_to_end(workdir, extra, log_dir, name: str, timeout_s: float = 3600) -> str:
  """The run on 2 processes to its end (each must exit 0); process 0's output. A long timeout:
  on a busy 2-core machine one such run has taken over 15 minutes."""
  procs = start_processes(workdir, 2, extra, log_dir, name)
  try:
    for p in procs:
      p.wait(timeout=timeout_s)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    out = (log_dir / f'{name}_process{i}.log').read_text()
    assert p.returncode == 0, f'process {i} failed:\n{out[-4000:]}'
  return (log_dir / f'{name}_process0.log').read_text()


def kill_after_checkpoint(procs, workdir, step: int, timeout_s: float = 900) -> None:
  """SIGKILLs every process once checkpoint `step` is committed; fails if the run ends first."""
  deadline = time.monotonic() + timeout_s
  try:
    while step not in runs.committed_steps(str(workdir)):
      assert all(p.poll() is None for p in procs), 'a process ended before the kill'
      assert time.monotonic() < deadline, f'no checkpoint {step} after {timeout_s} s'
      time.sleep(0.02)
  finally:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in procs:
      p.wait()


@pytest.mark.slow
def test_sigkill_of_every_process_then_resume_equals_an_uninterrupted_run(tmp_path):
  reference = tmp_path / 'uninterrupted'
  run_to_end(reference, TWO_CYCLES, tmp_path, 'uninterrupted')
  workdir = tmp_path / 'killed'
  procs = start_processes(workdir, 2, TWO_CYCLES, tmp_path, 'killed')
  kill_after_checkpoint(procs, workdir, KILL_AFTER_STEP)
  assert all(p.returncode == -signal.SIGKILL for p in procs)
  assert not runs.finished(str(workdir))
  killed_at = runs.committed_steps(str(workdir))
  output = run_to_end(workdir, TWO_CYCLES, tmp_path, 'resumed')
  assert f'resumed from step {killed_at[-1]}' in output, output[-3000:]
  assert runs.compare_runs(str(workdir), str(reference)) == []
  # No temporary checkpoint folder of the interrupted save is left behind.
  assert not [n for n in os.listdir(workdir / 'checkpoints') if not n.isdigit()
              and 'tmp' in n]
