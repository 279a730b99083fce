"""copd_jax.distributed on one host (launch detection, per-process batch rows, global batch
assembly, host <-> global arrays, barriers, remote paths) and scripts/tpu_vm.sh's dry run for a
v5e-16 slice (4 workers). Several real processes: tests/test_multiprocess.py."""
import os
import shlex
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from copd_jax import distributed as dist
from copd_jax import mesh as mesh_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- start-up

def test_launch_spec_detects_multihost_launches():
  assert dist.launch_spec({}) is None
  assert dist.launch_spec({'JAX_PROCESS_COUNT': '1'}) is None
  assert dist.launch_spec({'COPD_JAX_MULTIHOST': '0'}) is None
  # Cloud TPU: JAX finds coordinator and ids itself.
  assert dist.launch_spec({'COPD_JAX_MULTIHOST': 'true'}).kwargs() == {}
  assert dist.launch_spec({}, multihost=True).kwargs() == {}
  env = {'COORDINATOR_ADDRESS': '10.0.0.2:8476', 'JAX_PROCESS_COUNT': '4', 'PROCESS_ID': '3'}
  assert dist.launch_spec(env).kwargs() == {'coordinator_address': '10.0.0.2:8476',
                                            'num_processes': 4, 'process_id': 3}
  assert dist.launch_spec(env, multihost=False) is None
  assert dist.launch_spec({'JAX_NUM_PROCESSES': '2'}).kwargs() == {'num_processes': 2}


def test_launch_spec_errors_name_the_variable():
  with pytest.raises(dist.DistributedConfigError, match='JAX_PROCESS_COUNT=.two.: expected'):
    dist.launch_spec({'JAX_PROCESS_COUNT': 'two'})
  with pytest.raises(dist.DistributedConfigError, match='JAX_PROCESS_ID=4: must be smaller'):
    dist.launch_spec({'JAX_PROCESS_COUNT': '4', 'JAX_PROCESS_ID': '4'})


def test_maybe_initialize_is_a_noop_on_one_host_and_passes_the_spec_otherwise(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert dist.maybe_initialize(env={}) is False
  assert calls == [] and not jax.distributed.is_initialized()
  env = {'JAX_COORDINATOR_ADDRESS': 'host0:1234', 'JAX_PROCESS_COUNT': '2', 'JAX_PROCESS_ID': '0'}
  assert dist.maybe_initialize(env=env) is True
  assert calls == [{'coordinator_address': 'host0:1234', 'num_processes': 2, 'process_id': 0}]
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: True)
  assert dist.maybe_initialize(env=env) is True and len(calls) == 1   # not twice


def test_primary_logger_logs_on_process_zero_only(monkeypatch):
  lines = []
  log = dist.primary_logger(lines.append)
  log('hello')
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  log('from process 1')
  assert lines == ['hello'] and not dist.is_primary()


# ----------------------------------------------------------------------------- batch rows

def test_process_rows_two_hosts_one_branch_each():
  ids = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(2, 4, 1)   # branch=2, fsdp=4
  assert dist.process_rows(ids, 0, 4, 16) == (slice(0, 2), slice(0, 16))
  assert dist.process_rows(ids, 1, 4, 16) == (slice(2, 4), slice(0, 16))


def test_process_rows_two_hosts_splitting_the_rows_of_every_branch():
  ids = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 8, 1)   # branch=1, fsdp=8
  assert dist.process_rows(ids, 0, 3, 16) == (slice(0, 3), slice(0, 8))
  assert dist.process_rows(ids, 1, 3, 16) == (slice(0, 3), slice(8, 16))
  # 6 rows are not split over fsdp=8 (replicated): both hosts feed all of them.
  assert dist.process_rows(ids, 1, 3, 6) == (slice(0, 3), slice(0, 6))


def test_process_rows_four_hosts_tile_the_batch_exactly_once():
  ids = np.array([0, 0, 1, 1, 2, 2, 3, 3]).reshape(2, 2, 2)   # tensor pairs on one host
  K, B = 4, 8
  cover = np.zeros((K, B), int)
  for p in range(4):
    k, b = dist.process_rows(ids, p, K, B)
    cover[k, b] += 1
  assert dist.process_rows(ids, 3, K, B) == (slice(2, 4), slice(4, 8))
  assert (cover == 1).all()


def test_process_rows_rejects_scattered_devices():
  ids = np.array([0, 1, 1, 0]).reshape(2, 2, 1)
  with pytest.raises(ValueError, match='one rectangle'):
    dist.process_rows(ids, 0, 2, 4)
  with pytest.raises(ValueError, match='holds no device'):
    dist.process_rows(ids, 2, 2, 4)


def _cover(shares, K, B):
  cover = np.zeros((K, B), int)
  for k, b in shares.values():
    cover[k, b] += 1
  return cover


def test_process_shares_split_rows_that_several_processes_hold():
  ids = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(1, 8, 1)   # branch=1, fsdp=8
  # OPD's M = 4 rows are not split over fsdp=8 (replicated): each process takes half of them.
  assert dist.process_shares(ids, 2, 4) == {0: (slice(0, 2), slice(0, 2)),
                                            1: (slice(0, 2), slice(2, 4))}
  # 16 rows split over fsdp: the shares are the rows each process's devices hold.
  assert dist.process_shares(ids, 2, 16) == {p: dist.process_rows(ids, p, 2, 16) for p in (0, 1)}
  # One branch per process: nothing shared.
  ids = ids.reshape(2, 4, 1)
  assert dist.process_shares(ids, 2, 6) == {0: (slice(0, 1), slice(0, 6)),
                                            1: (slice(1, 2), slice(0, 6))}


@pytest.mark.parametrize('layout,K,B', [((1, 1, 8), 2, 6), ((1, 1, 8), 3, 2), ((2, 2, 2), 4, 5),
                                        ((1, 8, 1), 2, 4), ((1, 2, 4), 2, 8)])
def test_process_shares_cover_every_row_exactly_once(layout, K, B):
  for processes in (2, 4, 8):
    ids = np.repeat(np.arange(processes), 8 // processes).reshape(layout)
    shares = dist.process_shares(ids, K, B)
    assert sorted(shares) == list(range(processes))
    assert (_cover(shares, K, B) == 1).all(), (layout, processes, shares)
    for p, (k, b) in shares.items():   # within the rows the process's devices hold
      feed_k, feed_b = dist.process_rows(ids, p, K, B)
      assert feed_k.start <= k.start <= k.stop <= feed_k.stop
      assert feed_b.start <= b.start <= b.stop <= feed_b.stop
  # More processes than rows: some take none.
  ids = np.repeat(np.arange(4), 2).reshape(1, 1, 8)
  assert [b.stop - b.start for _, b in dist.process_shares(ids, 3, 2).values()] == [0, 1, 0, 1]


def test_process_shares_keep_rows_that_overlap_unevenly():
  # Process 1 holds devices of both branches, 0 and 2 of one each: each keeps all its rows.
  ids = np.array([0, 0, 1, 1, 2, 2]).reshape(2, 1, 3)
  assert dist.process_shares(ids, 2, 4) == {p: dist.process_rows(ids, p, 2, 4) for p in (0, 1, 2)}


def test_assemble_rows_puts_each_process_block_at_its_share():
  ids = np.repeat(np.arange(4), 2).reshape(1, 2, 4)   # processes share fsdp blocks in pairs
  K, B = 3, 6
  full = np.arange(K * B * 2, dtype=np.float32).reshape(K, B, 2)
  shares = dist.process_shares(ids, K, B)
  height = max(k.stop - k.start for k, _ in shares.values())
  width = max(b.stop - b.start for _, b in shares.values())
  blocks = {}
  for p, (k, b) in shares.items():   # padded with garbage beyond the share, as gathered
    block = np.full((height, width, 2), -1.0, np.float32)
    block[:k.stop - k.start, :b.stop - b.start] = full[k, b]
    blocks[p] = block
  np.testing.assert_array_equal(dist.assemble_rows(blocks, shares, K, B), full)
  del blocks[3]
  with pytest.raises(ValueError, match='no process'):
    dist.assemble_rows(blocks, shares, K, B)


def test_global_batch_on_one_host_is_the_sharded_global_array():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  assert dist.local_rows(mesh, 2, 8) == (slice(0, 2), slice(0, 8))
  tokens = np.arange(2 * 8 * 3, dtype=np.int32).reshape(2, 8, 3)
  valid = tokens % 2 == 0
  out = dist.global_batch_tree((tokens, valid), mesh, 2, 8)
  for x, ref in zip(out, (tokens, valid)):
    np.testing.assert_array_equal(np.asarray(x), ref)
    assert x.sharding.spec == P('branch', 'fsdp', None)
  odd = dist.global_batch(np.zeros((2, 6), np.float32), mesh, (2, 6))   # 6 rows: replicated
  assert odd.sharding.spec == P('branch', None)


# ----------------------------------------------------------------------------- host <-> global

def test_host_to_global_places_every_block_of_the_host_array():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 2, 'tensor': 2}, num_branches=2)
  host = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  sharding = NamedSharding(mesh, P('branch', 'fsdp'))
  x = dist.host_to_global(host, sharding)
  assert x.sharding == sharding and x.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(x), host)
  for shard in x.addressable_shards:   # each device holds exactly its block
    np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
  assert {tuple(s.data.shape) for s in x.addressable_shards} == {(1, 2, 3)}


def test_global_keys_are_the_same_keys_sharded_on_branch():
  mesh = mesh_lib.make_mesh({'branch': 4, 'fsdp': 2, 'tensor': 1}, num_branches=4)
  keys = jax.random.split(jax.random.key(3), 4)
  out = dist.global_keys(keys, NamedSharding(mesh, P('branch')))
  assert jax.dtypes.issubdtype(out.dtype, jax.dtypes.prng_key) and out.shape == (4,)
  assert out.sharding.spec[0] == 'branch'
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(out)),
                                np.asarray(jax.random.key_data(keys)))
  # Draws from them equal draws from the original keys.
  np.testing.assert_array_equal(np.asarray(jax.vmap(jax.random.normal)(out)),
                                np.asarray(jax.vmap(jax.random.normal)(keys)))


def test_to_host_returns_numpy_global_values():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  a = jax.device_put(np.arange(16.0).reshape(2, 8), NamedSharding(mesh, P('branch', 'fsdp')))
  tree = {'a': a, 'b': (jnp.ones(3, jnp.int32), True)}
  out = dist.to_host(tree)
  assert isinstance(out['a'], np.ndarray) and isinstance(out['b'][0], np.ndarray)
  np.testing.assert_array_equal(out['a'], np.arange(16.0).reshape(2, 8))
  np.testing.assert_array_equal(out['b'][0], [1, 1, 1])


@pytest.mark.parametrize('spec', [P('branch', 'fsdp'), P('branch'), P()])
def test_local_block_copies_exactly_the_rows_asked_for_from_the_shards(spec):
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  host = np.arange(2 * 8 * 3, dtype=np.int32).reshape(2, 8, 3)
  x = jax.device_put(host, NamedSharding(mesh, spec))
  for rows in ((slice(0, 2), slice(0, 8)), (slice(1, 2), slice(2, 6)), (slice(0, 1), slice(7, 8))):
    block = dist.local_block(x, rows)
    assert block.dtype == host.dtype
    np.testing.assert_array_equal(block, host[rows])
  assert dist.all_rows(2, 8) == (slice(0, 2), slice(0, 8))


def test_local_block_takes_leading_axes_and_host_arrays():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  host = np.arange(3 * 2 * 4 * 5, dtype=np.float32).reshape(3, 2, 4, 5)   # [R, K, M, T]
  x = jax.device_put(host, NamedSharding(mesh, P(None, 'branch')))
  rows = (slice(0, 3), slice(1, 2), slice(1, 3))
  np.testing.assert_array_equal(dist.local_block(x, rows), host[rows])
  np.testing.assert_array_equal(dist.local_block(host, rows), host[rows])


def test_sum_over_processes_on_one_process_is_the_value():
  x = np.array([[0.1, 3.0], [2.5, 1.0]])
  np.testing.assert_array_equal(dist.sum_over_processes(x), x)


def test_gather_rows_on_one_process_returns_the_rows_as_numpy():
  mesh = mesh_lib.make_mesh({'branch': 2, 'fsdp': 4, 'tensor': 1}, num_branches=2)
  rewards, lengths = np.ones((2, 8), np.float32), np.arange(16).reshape(2, 8)
  out = dist.gather_rows((rewards, lengths), mesh, 2, 8)
  assert all(isinstance(x, np.ndarray) for x in out)
  np.testing.assert_array_equal(out[1], lengths)


def test_barrier_and_primary_first_on_one_process():
  calls = []
  dist.barrier('nothing to wait for')
  assert dist.primary_first(lambda: calls.append('x') or 7, 'once') == 7
  assert calls == ['x'] and not dist.is_multiprocess()


def test_primary_first_runs_on_process_zero_before_the_others(monkeypatch):
  events = []
  monkeypatch.setattr(dist, 'is_multiprocess', lambda: True)
  monkeypatch.setattr(dist, 'barrier', lambda name: events.append(f'barrier:{name}'))
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  assert dist.primary_first(lambda: events.append('work') or 'p0', 'w') == 'p0'
  assert events == ['work', 'barrier:w']
  events.clear()
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert dist.primary_first(lambda: events.append('work') or 'p1', 'w') == 'p1'
  assert events == ['barrier:w', 'work']


# ----------------------------------------------------------------------------- TPU VM script

def _dry_run(*args):
  return subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'tpu_vm.sh'), '--dry-run', *args],
                        capture_output=True, text=True, cwd=ROOT)


def test_tpu_vm_dry_run_for_v5e_16_prints_the_command_sequence():
  result = _dry_run('--name', 'copd-v5e', '--zone', 'us-west4-a', '--accelerator-type',
                    'v5litepod-16', '--project', 'proj', '--config',
                    'configs/qwen3_0p6b_math_code.py', '--workdir', 'gs://bucket/runs/0p6b',
                    '--', '--config.copd.num_cycles=2')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith('# v5litepod-16: 16 chips on 4 worker(s); runtime '
                             'v2-alpha-tpuv5-lite; jax[tpu]==0.10.2')
  commands = [shlex.split(line) for line in lines[1:]]   # every line is valid shell
  where = ['--zone=us-west4-a', '--project=proj']
  assert commands[0] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'copd-v5e', *where,
                         '--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite']
  assert commands[1][:2] == ['tar', '-czf'] and '--exclude=.venv' in commands[1]
  assert commands[2] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '/tmp/copd_jax-copd-v5e.tgz',
                         'copd-v5e:~/copd_jax.tgz', *where, '--worker=all']
  ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'copd-v5e', *where]
  install, train, tail = commands[3:6]
  assert install[:-1] == ssh + ['--worker=all']
  assert 'pip install -q -r requirements.txt "jax[tpu]==0.10.2"' in install[-1]
  assert train[:-1] == ssh + ['--worker=all']
  assert train[-1] == ('--command=cd ~/copd_jax && COPD_JAX_MULTIHOST=1 nohup python3 -m copd_jax '
                       'train --config configs/qwen3_0p6b_math_code.py --workdir '
                       'gs://bucket/runs/0p6b --config.copd.num_cycles=2 > '
                       '~/copd_jax_train.log 2>&1 < /dev/null &')
  assert tail == ssh + ['--worker=0', '--command=tail -n +1 -f ~/copd_jax_train.log']
  assert len(commands) == 6 and result.stderr == ''


def test_tpu_vm_single_host_and_bad_arguments():
  result = _dry_run('--name', 'one', '--zone', 'z', '--accelerator-type', 'v5litepod-8',
                    '--config', 'configs/toy_copd.py', '--workdir', 'runs/toy', '--skip-create')
  assert result.returncode == 0, result.stderr
  assert '8 chips on 1 worker(s)' in result.stdout
  assert 'tpu-vm create' not in result.stdout and 'COPD_JAX_MULTIHOST' not in result.stdout
  missing = _dry_run('--name', 'x', '--zone', 'z', '--config', 'configs/toy_copd.py',
                     '--workdir', 'w')
  assert missing.returncode == 2 and '--accelerator-type is required' in missing.stderr
  local = _dry_run('--name', 'x', '--zone', 'z', '--accelerator-type', 'v4-32', '--config',
                   'configs/toy_copd.py', '--workdir', 'runs/x')
  assert '16 chips on 4 worker(s)' in local.stdout and 'is not gs://' in local.stderr
