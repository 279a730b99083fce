"""The run's log files on a disk that fills up: whole lines or nothing, and the failed file named.

A full disk while appending to metrics.jsonl / samples.jsonl would leave a torn last line and
raise an OSError without a file name; TensorBoard's events are written by tensorboardX's
background thread, where an OSError kills the thread with a printed traceback and the run goes
on without its events. Here:

* `append_whole` appends one record's bytes or, when the write fails, cuts the file back to its
  previous length (so what was written before stays readable) and raises an OSError that names
  the file (`copd_jax.disk_space.describe` turns it into one line).
* `EventErrors` wraps tensorboardX's record writer of one events file: an OSError in the
  background thread is kept (the thread goes on, writing nothing more, so the events before it
  stay readable and `close()` does not hang), and `raise_kept()` raises it in the main thread,
  naming the events file.
"""
from __future__ import annotations

import os
import threading


def append_whole(path: str, data: bytes) -> None:
  """Appends `data` to the local file `path` entirely, or not at all (raising OSError naming
  `path`)."""
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    try:
      written = 0
      while written < len(data):
        written += os.write(fd, data[written:])
    except OSError as e:
      os.ftruncate(fd, size)   # freeing the torn tail needs no room
      raise OSError(e.errno, e.strerror, path) from e
  finally:
    os.close(fd)


class EventErrors:
  """Stands in for tensorboardX's RecordWriter of one events file (write / flush / close):
  keeps the first OSError instead of raising it in the writer thread; after it, writes nothing.
  """

  def __init__(self, record_writer, path: str):
    self._inner = record_writer
    self.path = path
    self.error: OSError | None = None
    self._raised = False
    self._lock = threading.Lock()

  @classmethod
  def install(cls, summary_writer) -> 'EventErrors':
    """Wraps the record writer of a tensorboardX SummaryWriter's events file (tensorboardX
    2.6's attributes: FileWriter.event_writer -> EventFileWriter._ev_writer -> EventsWriter.
    _py_recordio_writer)."""
    events = summary_writer._get_file_writer().event_writer._ev_writer
    wrapper = cls(events._py_recordio_writer, events._file_name)
    events._py_recordio_writer = wrapper
    return wrapper

  def _guarded(self, action) -> None:
    with self._lock:
      if self.error is not None:
        return
      try:
        action()
      except OSError as e:
        self.error = e

  def write(self, data: bytes) -> None:
    self._guarded(lambda: self._inner.write(data))

  def flush(self) -> None:
    self._guarded(self._inner.flush)

  def close(self) -> None:
    try:
      self._inner.close()
    except OSError as e:
      with self._lock:
        self.error = self.error or e

  def raise_kept(self) -> None:
    """Raises the kept OSError (once), naming the events file."""
    if self.error is not None and not self._raised:
      self._raised = True
      raise OSError(self.error.errno, self.error.strerror, self.path) from self.error
