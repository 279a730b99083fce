"""Run paths that may be remote: storage helpers, stale temporary folders, and checkpoints, the
metrics log, the streaming merge and HF export/import on a fake gs:// bucket.

The fake bucket: etils.epath serves gs:// through fsspec's 'gcs' filesystem, and Orbax writes
gs:// arrays through TensorStore's 'gcs' kvstore. Both are redirected to one local folder
(`fake_gcs`), so the gs:// code paths of copd_jax, epath and Orbax (commit-file atomicity, not
rename) run for real; only the transport is local. The fake keeps local-disk semantics for what
it stores (empty folders exist, a rename is a local rename), which real GCS does not have.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from flax import nnx
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils

from copd_jax import checkpoint as ckpt
from copd_jax import merge as merge_lib
from copd_jax import metrics as metrics_lib
from copd_jax import storage
from copd_jax.commands.export_hf import write_hf_folder
from copd_jax.mesh import make_mesh, state_shardings
from copd_jax.models import hf_io
from copd_jax.models.qwen3 import Qwen3
from copd_jax.models.tokenizer import char_tokenizer
from tests.hf_fixtures import save_hf_model
from tests.test_checkpoint import TINY, abstract, assert_trees_equal, make_state, meta_for


class _FakeGCS(DirFileSystem):
  """gs://bucket/key -> <root>/bucket/key; names come back as 'bucket/key', as gcsfs gives them."""
  protocol = ('gs', 'gcs')

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    return (path[len('gs://'):] if path.startswith('gs://') else path).rstrip('/')


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """The local folder that backs gs:// for the test."""
  root = tmp_path / 'bucket_root'
  root.mkdir()
  fake = _FakeGCS(path=str(root), fs=LocalFileSystem(auto_mkdir=True))
  real_fs = epath_backend.fsspec_backend.fs
  monkeypatch.setattr(epath_backend.fsspec_backend, 'fs',
                      lambda path: fake if os.fspath(path).startswith('gs://') else real_fs(path))

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {'driver': 'file', 'path': os.path.join(str(root), bucket, key)}

  monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', kvstore)
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)
  monkeypatch.chdir(tmp_path)  # a gs:// path mistaken for a local one would land in tmp_path/gs:
  yield root
  assert not (tmp_path / 'gs:').exists()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def test_paths_keep_url_schemes(tmp_path):
  assert storage.resolve('gs://b/run/') == 'gs://b/run'
  assert storage.join('gs://b/run', 'checkpoints', '3') == 'gs://b/run/checkpoints/3'
  assert storage.parent('gs://b/run/merged') == 'gs://b/run'
  assert storage.basename('gs://b/run/merged/') == 'merged'
  assert storage.resolve('rel') == os.path.join(os.getcwd(), 'rel')
  assert storage.is_remote('gs://b') and not storage.is_remote(str(tmp_path))


def test_file_helpers_on_the_fake_bucket(fake_gcs):
  storage.write_text('gs://b/run/a.json', '{"x": 1}')
  assert (fake_gcs / 'b/run/a.json').read_text() == '{"x": 1}'
  assert storage.is_file('gs://b/run/a.json') and storage.is_dir('gs://b/run')
  assert not storage.is_file('gs://b/run') and not storage.exists('gs://b/nope')
  storage.write_text('gs://b/run/a.json', 'new')  # replaced whole
  assert storage.read_text('gs://b/run/a.json') == 'new'
  assert storage.listdir('gs://b/run') == ['a.json']
  storage.rmtree('gs://b/run')
  assert not storage.exists('gs://b/run')


def test_local_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'stamp.json'
  path.write_text('old')
  storage.write_text(str(path), 'new')
  assert path.read_text() == 'new' and os.listdir(tmp_path) == ['stamp.json']


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_stale_tmp_siblings_of_dead_local_processes_are_removed(tmp_path):
  dead, live, host = _dead_pid(), os.getppid(), storage._HOST
  names = {f'.out.tmp-{dead}-{host}': False,   # removed: this host, process gone
           f'.out.tmp-{dead}': False,           # removed: older name without a host
           f'.out.tmp-{live}-{host}': True,     # kept: process alive
           f'.out.tmp-{os.getpid()}-{host}': True,  # kept: this process
           f'.out.tmp-{dead}-otherhost': True,  # kept: another host's (shared file system)
           f'.other.tmp-{dead}': True,          # kept: another output's
           f'out.tmp-{dead}': True,             # kept: not a hidden temporary name
           '.out.tmp-abc': True,                # kept: no PID
           'out': True}
  for name in names:
    (tmp_path / name).mkdir()
  removed = storage.remove_stale_tmp_siblings(str(tmp_path / 'out'))
  gone = sorted(n for n, keep in names.items() if not keep)
  assert sorted(os.path.basename(p) for p in removed) == gone
  assert sorted(os.listdir(tmp_path)) == sorted(n for n, keep in names.items() if keep)


def test_publish_dir_local_cleans_stale_siblings_and_renames(tmp_path):
  out = tmp_path / 'out'
  stale = tmp_path / f'.out.tmp-{_dead_pid()}'
  stale.mkdir()
  seen = []

  def build(folder):
    seen.append(folder)
    os.makedirs(folder)
    open(os.path.join(folder, 'f.txt'), 'w').write('x')

  storage.publish_dir(str(out), build)
  assert seen == [storage.tmp_sibling(str(out))] and seen[0].endswith(f'-{storage._HOST}')
  assert os.listdir(tmp_path) == ['out'] and (out / 'f.txt').read_text() == 'x'
  assert storage.is_complete(str(out))


def test_publish_dir_remote_writes_in_place_with_marker_last(fake_gcs):
  def failing(folder):
    storage.write_text(storage.join(folder, 'part'), 'x')
    raise OSError('upload failed')

  with pytest.raises(OSError):
    storage.publish_dir('gs://b/out', failing)
  assert storage.exists('gs://b/out/part') and not storage.is_complete('gs://b/out')
  storage.publish_dir('gs://b/out', lambda f: storage.write_text(storage.join(f, 'new'), 'y'))
  assert storage.listdir('gs://b/out') == sorted([storage.COMPLETE_MARKER, 'new'])
  assert storage.is_complete('gs://b/out')


# ---------------------------------------------------------------------------------------------
# Run checkpoints, metrics, merge and export on the fake bucket
# ---------------------------------------------------------------------------------------------

def test_run_checkpoint_save_restore_on_remote_workdir(fake_gcs):
  workdir = 'gs://b/run'
  state = make_state(2, seed=1)
  with ckpt.RunCheckpointer(workdir, keep_last=1) as saver:
    assert saver.save(1, state, meta_for(1))
    assert saver.save(2, state, meta_for(2))
    saver.wait()
  step_dir = fake_gcs / 'b/run/checkpoints/2'
  # Orbax's GCS protocol ran (commit file, no rename); keep_last=1 deleted step 1 remotely.
  assert (step_dir / 'commit_success.txt').exists()
  assert not (fake_gcs / 'b/run/checkpoints/1').exists()
  reader = ckpt.RunCheckpointer(workdir, read_only=True)
  restored, meta = reader.restore(abstract(state))
  reader.close()
  assert_trees_equal(restored, state)
  assert meta['step'] == 2 and meta['data_state'] == {'math': '{"index": 3}'}
  assert ckpt.read_meta(ckpt.latest_step_dir(workdir))['step'] == 2
  layer = ckpt.read_leaf(workdir, ('layers', 'q_proj'), branch=1, layer=0)
  q = np.asarray(state.params['layers']['q_proj'].get_value())
  np.testing.assert_array_equal(layer, q[1, 0])


def test_metrics_log_write_and_resume_rewrite_on_remote_workdir(fake_gcs):
  workdir = 'gs://b/run'
  log = metrics_lib.MetricsLog(workdir, tensorboard=False, flush_secs=1e9)
  for step in range(5):
    log.write(step, {'loss': float(step)})
  assert not (fake_gcs / 'b/run/metrics.jsonl').exists()  # buffered: no append on object stores
  log.flush()
  assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [0, 1, 2, 3, 4]
  log.write(5, {'loss': 5.0})
  log.close()
  # Resume from step 3: lines at or after it are dropped, then the run writes them again.
  log = metrics_lib.MetricsLog(workdir, resume_step=3, tensorboard=False, flush_secs=0)
  assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [0, 1, 2]
  log.write(3, {'loss': 30.0})  # flush_secs=0: uploaded at once
  assert metrics_lib.read_metrics(workdir)[-1] == {'step': 3, 'loss': 30.0}
  log.close()
  # A fresh run (no resume) starts a new file.
  metrics_lib.MetricsLog(workdir, tensorboard=False).close()
  assert not (fake_gcs / 'b/run/metrics.jsonl').exists()


def test_streaming_merge_and_hf_export_to_remote_paths(fake_gcs, tmp_path):
  tokenizer_dir = str(tmp_path / 'tok')
  char_tokenizer().save_pretrained(tokenizer_dir)
  state = make_state(2, seed=2)
  with ckpt.RunCheckpointer('gs://b/run') as saver:
    saver.save(0, state, meta_for(0, tokenizer_dir=tokenizer_dir))
  result = merge_lib.merge_checkpoints('gs://b/run', 'mean', out='gs://b/merged')
  merged, meta = ckpt.load_params_checkpoint('gs://b/merged')
  q = np.asarray(state.params['layers']['q_proj'].get_value())
  np.testing.assert_allclose(merged['layers']['q_proj'], q.mean(0), rtol=1e-6)
  assert meta['merge']['inputs'] == ['gs://b/run/checkpoints/0:0', 'gs://b/run/checkpoints/0:1']
  assert sorted(os.listdir(fake_gcs / 'b/merged/tokenizer')) == sorted(os.listdir(tokenizer_dir))
  assert not [n for n in os.listdir(fake_gcs / 'b') if '.tmp-' in n]
  with pytest.raises(merge_lib.MergeError, match='already exists'):
    merge_lib.merge_checkpoints('gs://b/run', 'mean', out='gs://b/merged')

  source = ckpt.open_source('gs://b/merged')
  assert source.tokenizer_dir == 'gs://b/merged/tokenizer'
  write_hf_folder(result.params, TINY, source.tokenizer_dir, 'gs://b/hf')
  hf_dir = fake_gcs / 'b/hf'
  assert (hf_dir / 'config.json').exists() and (hf_dir / 'tokenizer.json').exists()
  back = hf_io.load_params('gs://b/hf')  # ranged reads of the remote safetensors
  np.testing.assert_allclose(back['layers']['q_proj'], q.mean(0), rtol=1e-6)

  # A params checkpoint without its completion marker (an interrupted remote write) is refused.
  os.remove(fake_gcs / 'b/merged' / storage.COMPLETE_MARKER)
  with pytest.raises(ckpt.CheckpointError, match='incomplete params checkpoint'):
    ckpt.open_source('gs://b/merged')


def test_remote_hf_folder_reads_like_local_including_sharded_files(fake_gcs, tmp_path):
  src = tmp_path / 'src'
  save_hf_model('untied_gqa2', src)
  reference = hf_io.load_params(str(src))
  config = hf_io.read_config(str(src))
  hf_io.save_hf_folder(reference, config, 'gs://b/sharded', max_shard_bytes=20_000)
  names = os.listdir(fake_gcs / 'b/sharded')
  assert 'model.safetensors.index.json' in names
  assert sum(n.endswith('.safetensors') for n in names) > 2
  remote = hf_io.load_params('gs://b/sharded')
  jax.tree.map(np.testing.assert_array_equal, remote, reference)
  # Same files as a local export of the same parameters.
  hf_io.save_hf_folder(reference, config, str(tmp_path / 'local'), max_shard_bytes=20_000)
  local_names = sorted(os.listdir(tmp_path / 'local'))
  assert sorted(n for n in names if n != storage.COMPLETE_MARKER) == local_names
  index = json.loads((fake_gcs / 'b/sharded/model.safetensors.index.json').read_text())
  assert index == json.loads((tmp_path / 'local/model.safetensors.index.json').read_text())


def test_remote_hf_folder_loads_block_by_block_like_local(fake_gcs, tmp_path):
  """The sharded load of a gs:// folder: each device block from ranged reads of its slice's
  rows (hf_io/blocks.py), equal to the whole local load."""
  src = tmp_path / 'src'
  save_hf_model('untied_gqa2', src)
  reference = hf_io.load_params(str(src))
  config = hf_io.read_config(str(src))
  hf_io.save_hf_folder(reference, config, 'gs://b/hf', max_shard_bytes=20_000)
  abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
  mesh = make_mesh({'branch': 1, 'fsdp': 4, 'tensor': 2})
  loaded = hf_io.load_params_sharded('gs://b/hf', state_shardings(nnx.state(abstract, nnx.Param),
                                                                  mesh))
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), loaded, reference)
