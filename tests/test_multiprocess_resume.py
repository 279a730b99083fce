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
from tests.test_multiprocess import ROOT, _command, _env, _free_port, run_processes

TWO_CYCLES = ['--config.copd.num_cycles=2']
KILL_AFTER_STEP = 1


def start_processes(workdir, num_processes: int, extra, log_dir) -> list[subprocess.Popen]:
  """The run's processes, started as run_processes starts them, output to log files."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    env = _env(8 // num_processes, JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_PROCESS_COUNT=str(num_processes), JAX_PROCESS_ID=str(i))
    out = open(log_dir / f'killed_process{i}.log', 'w')
    procs.append(subprocess.Popen(_command(workdir, extra), cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT))
    out.close()
  return procs


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
  run_processes(reference, 2, TWO_CYCLES)
  workdir = tmp_path / 'killed'
  procs = start_processes(workdir, 2, TWO_CYCLES, tmp_path)
  kill_after_checkpoint(procs, workdir, KILL_AFTER_STEP)
  assert all(p.returncode == -signal.SIGKILL for p in procs)
  assert not runs.finished(str(workdir))
  killed_at = runs.committed_steps(str(workdir))
  outputs = run_processes(workdir, 2, TWO_CYCLES)
  assert f'resumed from step {killed_at[-1]}' in outputs[0], outputs[0][-3000:]
  assert runs.compare_runs(str(workdir), str(reference)) == []
  # No temporary checkpoint folder of the interrupted save is left behind.
  assert not [n for n in os.listdir(workdir / 'checkpoints') if not n.isdigit()
              and 'tmp' in n]
