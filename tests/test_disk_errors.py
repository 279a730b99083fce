"""Writes the file system refuses (issue 21, point 8), without root: a workdir that cannot be
written is refused with one line; a full disk in any of its shapes is recognised and said in one
line; a folder whose build fails leaves no `.NAME.tmp-*` sibling. scripts/faults/disks.py runs
the real thing (a read-only mount, small tmpfs disks) when it is root."""
import errno
import logging
import os

import pytest

from copd_jax import disk_space, storage, workdir_claim
from copd_jax.configs.base import base_config


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  def read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, 'Read-only file system', str(path))
  monkeypatch.setattr(storage, 'makedirs', read_only)
  with pytest.raises(workdir_claim.WorkdirNotWritable,
                     match=r'cannot write there \(Read-only file system: .*/w\)'):
    with workdir_claim.claim(str(tmp_path / 'w'), base_config()):
      pass
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('error', [
    OSError(errno.ENOSPC, 'No space left on device', '/d/run/base/model.safetensors'),
    RuntimeError('Error while serializing: I/O error: No space left on device (os error 28)'),
    ValueError('RESOURCE_EXHAUSTED: Error writing local file "/d/run/checkpoints/2.orbax-'
               "checkpoint-tmp/x\": Failed to write: No space left on device [os_error_code='28']"),
])
def test_a_full_disk_is_recognised_in_its_shapes(error):
  assert disk_space.out_of_space(error)
  wrapped = RuntimeError('save failed')
  wrapped.__cause__ = error
  assert disk_space.out_of_space(wrapped)
  assert disk_space.describe(wrapped).startswith('no space left on device')
  assert '\n' not in disk_space.describe(wrapped)


def test_other_errors_are_not_a_full_disk():
  assert not disk_space.out_of_space(OSError(errno.EACCES, 'Permission denied'))
  assert not disk_space.out_of_space(ValueError('shape mismatch'))


def test_describe_names_the_file_it_could_not_write_and_the_free_space(tmp_path, monkeypatch):
  import collections
  import shutil
  usage = collections.namedtuple('usage', 'total used free')
  asked = []
  monkeypatch.setattr(shutil, 'disk_usage',
                      lambda path: asked.append(path) or usage(4 << 20, 4 << 20, 1 << 19))
  missing = str(tmp_path / 'run' / 'checkpoints' / '0.orbax-checkpoint-tmp' / 'x')
  error = OSError(errno.ENOSPC, 'No space left on device', missing)
  assert disk_space.describe(error).startswith(
      f'no space left on device writing {missing} (0.5 MiB free of 4.0 MiB on its file '
      'system); ')
  assert asked == [str(tmp_path)]   # the nearest folder that exists


def test_orbax_copies_of_a_full_disk_are_not_logged(caplog):
  logger = logging.getLogger('absl')
  with caplog.at_level(logging.ERROR, logger='absl'):
    logger.error('_SignalingThread.run() raised: RESOURCE_EXHAUSTED ... No space left on device')
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError:
      logger.exception('Failed to run 4 Handler Commit operations')
    logger.error('another error')
  assert [r.getMessage() for r in caplog.records] == ['another error']


def test_a_failed_build_leaves_no_temporary_sibling(tmp_path):
  def build(folder):
    os.makedirs(folder)
    (open(os.path.join(folder, 'part'), 'w')).close()
    raise OSError(errno.ENOSPC, 'No space left on device')
  with pytest.raises(OSError):
    storage.publish_dir(str(tmp_path / 'base'), build)
  assert os.listdir(tmp_path) == []


def test_a_save_that_would_not_fit_stops_the_run_before_it_starts(tmp_path, monkeypatch):
  import collections
  import shutil
  from copd_jax import checkpoint as ckpt
  from tests.test_checkpoint import make_state, meta_for
  state = make_state()
  saver = ckpt.RunCheckpointer(str(tmp_path))
  assert saver.save(0, state, meta_for(0))   # the first save has no estimate: never checked
  saver.wait()
  size = disk_space.folder_bytes(os.path.join(str(tmp_path), 'checkpoints', '0'))
  usage = collections.namedtuple('usage', 'total used free')
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(0, 0, size))
  with pytest.raises(disk_space.NotEnoughSpace, match=r'the checkpoint of step 1 needs about '
                                                      r'.*; stopped before saving it'):
    saver.save(1, state, meta_for(1))
  assert saver.all_steps() == [0] and not [n for n in os.listdir(tmp_path / 'checkpoints')
                                           if n != '0']
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage(0, 0, 10 * size))
  assert saver.save(1, state, meta_for(1))
  saver.wait()
  assert saver.all_steps() == [0, 1]
  saver.close()


def test_closed_loop_callbacks_are_dropped_and_other_unraisables_passed_on():
  import types
  from copd_jax.__main__ import _drop_closed_loop_callbacks
  seen = []
  hook = _drop_closed_loop_callbacks(seen.append)
  for error in (RuntimeError('Event loop is closed'), OSError('handle is closed'),
                RuntimeError('something else'), ValueError('Event loop is closed')):
    hook(types.SimpleNamespace(exc_value=error))
  assert [str(u.exc_value) for u in seen] == ['something else', 'Event loop is closed']
  assert isinstance(seen[1].exc_value, ValueError)


def test_a_full_disk_while_appending_keeps_the_lines_before_and_names_the_file(tmp_path,
                                                                               monkeypatch):
  from copd_jax import log_files
  path = str(tmp_path / 'metrics.jsonl')
  log_files.append_whole(path, b'{"step": 0}\n')
  real_write = os.write

  def half_then_full(fd, data):   # the disk takes 5 bytes, then refuses
    real_write(fd, data[:5])
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(os, 'write', half_then_full)
  with pytest.raises(OSError) as info:
    log_files.append_whole(path, b'{"step": 1}\n')
  assert info.value.errno == errno.ENOSPC and info.value.filename == path
  assert disk_space.describe(info.value).startswith(f'no space left on device writing {path} (')
  with open(path, 'rb') as f:
    assert f.read() == b'{"step": 0}\n'   # no torn line


def test_a_full_disk_in_the_tensorboard_thread_is_raised_in_the_run_naming_the_file(tmp_path):
  from copd_jax.metrics import MetricsLog
  log = MetricsLog(str(tmp_path), flush_secs=0)
  log.write(0, {'x': 1.0})
  log.flush()
  events = log._events

  class Full:
    def write(self, data):
      raise OSError(errno.ENOSPC, 'No space left on device')
    flush = close = lambda self: None
  events._inner = Full()
  events.write(b'record')   # what the writer thread does: kept, not raised there
  assert isinstance(events.error, OSError)
  with pytest.raises(OSError) as info:
    log.write(1, {'x': 2.0})
  assert info.value.filename == events.path and '/tensorboard/events.out' in events.path
  with open(tmp_path / 'metrics.jsonl') as f:
    assert [l for l in f.read().splitlines()] == ['{"step": 0, "x": 1.0}', '{"step": 1, "x": 2.0}']
  log.close()   # the error was said once; closing does not hang or raise it again


def _full(path):
  return OSError(errno.ENOSPC, 'No space left on device', path)


def test_the_first_error_is_reported_when_a_hook_then_fails_to_close(monkeypatch, capsys):
  """metrics.jsonl fails in a step, then the TensorBoard writer fails as the loop closes its
  hooks: `train` raises the metrics.jsonl error (what the CLI's one line names), the close's
  goes to stderr on its own line, and every hook is closed."""
  import types
  import jax
  from copd_jax import driver
  from copd_jax.hooks import Hook
  closed = []

  class MetricsFull(Hook):
    def before_update(self, step, batch):
      raise _full('run/metrics.jsonl')

    def close(self):
      closed.append('metrics')

  class EventsFull(Hook):
    def close(self):
      closed.append('events')
      raise _full('run/tensorboard/events.out.tfevents')

  phases = types.SimpleNamespace(total_steps=1, at=lambda step: (0, 'rl'),
                                 wants_probe=lambda step, phase: False)
  run = types.SimpleNamespace(phases=phases, start_step=0, state=None,
                              root_key=jax.random.key(0))
  monkeypatch.setattr(driver, 'setup_run', lambda config, workdir, log: run)
  monkeypatch.setattr(driver, 'standard_hooks', lambda run, progress: [])
  monkeypatch.setattr(driver, 'sample_native',
                      lambda run, state, key: types.SimpleNamespace(batch=None))
  monkeypatch.setattr(driver, 'rollout_scalars', lambda sampled, run, prefix: {})
  capsys.readouterr()
  with pytest.raises(OSError) as info:
    driver.train(None, 'run', log=lambda _: None, progress=False,
                 hooks=[MetricsFull(), EventsFull()])
  assert info.value.filename == 'run/metrics.jsonl'
  assert closed == ['events', 'metrics']   # reverse order, every one
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith('warning: closing EventsFull also failed, after '
                                             'the error reported: [Errno 28]'), err
  assert 'events.out.tfevents' in err[0]


def test_closing_hooks_raises_the_first_failing_close_and_reports_the_rest():
  from copd_jax.hooks import Hook, closed_at_exit
  reported = []

  class Fails(Hook):
    def __init__(self, name):
      self.name = name

    def close(self):
      raise _full(self.name)

  with pytest.raises(OSError) as info:
    with closed_at_exit([Fails('a'), Hook(), Fails('b')], reported.append):
      pass
  assert info.value.filename == 'b'   # closed last first
  assert len(reported) == 1 and reported[0].endswith("No space left on device: 'a'")
  with closed_at_exit([Hook()], reported.append):
    pass
  assert len(reported) == 1


def test_metrics_log_close_reports_the_flush_error_not_tensorboards(tmp_path):
  """metrics.jsonl's upload fails in close(), then TensorBoard's events file fails to close:
  the metrics.jsonl error is the one raised."""
  from copd_jax.metrics import MetricsLog
  log = MetricsLog(str(tmp_path), flush_secs=0)
  log.write(0, {'x': 1.0})

  class FullOnClose:
    write = flush = lambda self, *args: None

    def close(self):
      raise _full('events')
  log._events._inner = FullOnClose()

  def upload_fails():
    raise _full(log.path)
  log.flush = upload_fails
  with pytest.raises(OSError) as info:
    log.close()
  assert info.value.filename == log.path
  assert log._events.error is not None and log._events.error.filename == 'events'
