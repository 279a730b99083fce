"""The W&B logger with the real `wandb` package in offline mode: a tiny run's offline folder
holds every logged step with the values of metrics.jsonl. wandb is not a dependency, so this
runs only where it is importable (skipped in CI); e.g.
`pip install --target DIR wandb`, then `PYTHONPATH=DIR pytest -m slow tests/test_wandb_offline.py`.
"""
import glob
import json
import os
import struct
import subprocess
import sys

import pytest

from tests.test_driver import ROOT, train_command

wandb = pytest.importorskip('wandb')

# The .wandb transaction log: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB
# blocks of chunks (crc32 4 bytes, length 2, type 1: 1 full, 2 first, 3 middle, 4 last), a
# block's last < 7 bytes zero padding (the LevelDB log format wandb's core writes).
HEADER, BLOCK, CHUNK_HEADER = 7, 32768, 7


def wandb_records(path: str) -> list[bytes]:
  """The serialised Record protos of a .wandb file, in order."""
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B', path
  records, partial, at = [], b'', HEADER
  while at + CHUNK_HEADER <= len(data):
    left_in_block = BLOCK - at % BLOCK
    if left_in_block < CHUNK_HEADER:
      at += left_in_block
      continue
    length, kind = struct.unpack('<HB', data[at + 4:at + 7])
    if length == 0 and kind == 0:
      break   # zero tail: the end
    body = data[at + 7:at + 7 + length]
    at += CHUNK_HEADER + length
    partial = body if kind in (1, 2) else partial + body
    if kind in (1, 4):
      records.append(partial)
      partial = b''
  return records


def offline_history(run_dir: str) -> dict[int, dict[str, float]]:
  """{step: {key: value}} of the history records of an offline run folder."""
  from wandb.proto import wandb_internal_pb2
  (path,) = glob.glob(os.path.join(run_dir, 'run-*.wandb'))
  history = {}
  for raw in wandb_records(path):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(raw)
    if record.WhichOneof('record_type') == 'history':
      items = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
      history[items.pop('_step')] = {k: v for k, v in items.items() if not k.startswith('_')}
  return history


@pytest.mark.slow   # a tiny train in a fresh interpreter: about a minute on 2 cores
def test_an_offline_run_holds_the_logged_metrics(tmp_path):
  from copd_jax.metrics import read_metrics
  from copd_jax.tag_names import tag_namer
  workdir = tmp_path / 'run'
  packages = os.path.dirname(os.path.dirname(wandb.__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, packages]), WANDB_MODE='offline',
             WANDB_SILENT='true', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(train_command(workdir, '--config.metrics.wandb=True',
                                        '--stop-after=2'), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  (run_dir,) = glob.glob(str(workdir / 'wandb' / 'offline-run-*'))
  history = offline_history(run_dir)
  tag = tag_namer(['b0_count', 'b1_sort'])
  logged = read_metrics(str(workdir))
  assert sorted(history) == [r['step'] for r in logged] == [0, 1]
  for record in logged:
    sent = history[record['step']]
    want = {tag(k): v for k, v in record.items() if k != 'step'}
    assert sent.keys() == want.keys()
    for key, value in want.items():
      assert sent[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key
