"""Worker processes whose life the server owns, for the listening room.

Essentia's MusicExtractor holds Python's GIL for a whole analysis and may
take much memory, so recordings are analysed in spawned processes that the
server starts, replaces and stops itself:

* each worker runs at most `analyses_per_worker` analyses, then is replaced
  (the extractor's memory goes back); a worker that dies (killed, out of
  memory) is replaced too, and the analysis it held fails with `WorkerDied`
  (never retried: a recording that kills a worker would kill the next one);
* an analysis that runs past `timeout_s` has its worker killed and
  replaced, and fails with `TimedOut`;
* at most `max_waiting` analyses wait for a worker; more fail at once with
  `Busy`;
* a worker's address space is capped at `memory_mb` (`RLIMIT_AS`), so a
  runaway analysis ends in a MemoryError in that worker, not in the
  machine's swap;
* workers exit when the server's process is gone (`watch_parent`), and
  `close` fails every pending analysis at once (`ShuttingDown`), kills the
  workers and removes the pool's temporary directory, where every worker
  keeps its temporary files.

`run` is awaited from an event loop (any loop, any thread); the workers are
driven by one thread per worker slot, so nothing blocks the loop.

`concurrent.futures.ProcessPoolExecutor` is not used: with
`max_tasks_per_child` it can leave a task waiting forever with no worker
alive (CPython gh-115634), and one dead worker breaks it for every later
task (`BrokenProcessPool`) until it is rebuilt.
"""

import asyncio
import atexit
import collections
import concurrent.futures
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable

from mardjax.serve import audio_analysis

# How long a retired worker may take to leave on its own before it is
# killed, and how long `close` waits for the slot threads.
_EXIT_GRACE_S = 2.0
# How long a new worker may take to import its libraries: one stuck there
# (a hung file system) counts as one that cannot start.
_START_TIMEOUT_S = 120.0


class PoolError(Exception):
  """An analysis the pool could not run; `status` and `retry_after_s` are
  what an HTTP client is told (retry_after_s None: retrying will not help)."""

  status = 503
  retry_after_s: int | None = 5


class Busy(PoolError):
  """Too many analyses are waiting for a worker."""
  status = 429


class WorkerDied(PoolError):
  """The worker running the analysis died before answering."""
  retry_after_s = 1


class TimedOut(PoolError):
  """The analysis ran past the pool's time limit; its worker was killed."""
  status = 504
  retry_after_s = None


class Unavailable(PoolError):
  """No worker process could be started."""
  retry_after_s = 10


class ShuttingDown(PoolError):
  """The server is stopping."""
  retry_after_s = 10


def _peak_rss_mb() -> float:
  """This process' peak resident memory in MB."""
  # VmHWM belongs to this program's own address space; ru_maxrss would
  # include the server's, which the worker was forked from before exec.
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # macOS


def _worker_main(conn, parent_pid: int, memory_mb: int, temp_dir: str
                 ) -> None:
  """A worker process: reports itself ready, then runs (fn, args) calls
  from `conn` one at a time until told to stop (None) or the pipe closes.

  Each answer is ('ok', result, peak RSS MB) or ('error', exception, peak
  RSS MB). After a MemoryError the worker leaves: its heap may be in any
  state.
  """
  import signal  # pylint: disable=g-import-not-at-top
  # Ctrl-C reaches the whole process group: the server decides when its
  # workers stop.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  audio_analysis.watch_parent(parent_pid)
  # A killed worker cannot clean up after itself: its temporary files live
  # where the server removes them.
  os.environ['TMPDIR'] = tempfile.tempdir = temp_dir
  try:
    if memory_mb:
      import resource  # pylint: disable=g-import-not-at-top
      limit = int(memory_mb) * 2**20
      _, hard = resource.getrlimit(resource.RLIMIT_AS)
      if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
      resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    # Import the analysis' libraries now, not in the first upload's time.
    audio_analysis.preload()
  except BaseException as e:  # pylint: disable=broad-except
    # Told to clients and /healthz: the libraries' names, not their paths.
    conn.send(('failed', re.sub(r'/\S*/', '',
                                f'{type(e).__name__}: {str(e)[:200]}')))
    return
  conn.send(('ready', os.getpid()))
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):
      return
    if message is None:
      return
    fn, args, kwargs = message
    try:
      result = ('ok', fn(*args, **kwargs), _peak_rss_mb())
    except BaseException as e:  # pylint: disable=broad-except
      result = ('error', e, _peak_rss_mb())
    try:
      conn.send(result)
    except Exception as e:  # pylint: disable=broad-except
      # An exception or result that does not pickle: say what it was.
      conn.send(('error', RuntimeError(
          f'{type(result[1]).__name__}: {str(result[1])[:200]} '
          f'(unpicklable: {e})'), _peak_rss_mb()))
    if isinstance(result[1], MemoryError):
      return


class _Job:

  def __init__(self, fn, args, kwargs):
    self.call = (fn, args, kwargs)
    self.future = concurrent.futures.Future()


class _Worker:
  """One worker process and the parent's end of its pipe."""

  def __init__(self, process, conn, temp_dir: str):
    self.process, self.conn, self.temp_dir = process, conn, temp_dir
    self.analyses = 0

  @property
  def pid(self) -> int:
    return self.process.pid

  def alive(self) -> bool:
    # The sentinel, not is_alive(): that reaps the process, and /healthz's
    # thread would race the slot thread that waits for it.
    return not multiprocessing.connection.wait([self.process.sentinel], 0)

  def stop(self, gently: bool) -> None:
    """Asks the worker to leave (gently) or kills it; reaps it and removes
    its temporary files either way."""
    if gently:
      try:
        self.conn.send(None)
      except (OSError, ValueError):
        pass
      self.process.join(_EXIT_GRACE_S)
    if self.process.is_alive():
      self.process.kill()
    self.process.join(_EXIT_GRACE_S)
    self.conn.close()
    shutil.rmtree(self.temp_dir, ignore_errors=True)


class AnalysisPool:
  """Worker processes for analyses (see the module docstring).

  Args:
    workers: processes (0: one per CPU core).
    analyses_per_worker: analyses before a worker is replaced.
    timeout_s: the time limit of one analysis, from when a worker takes it
      (0: none).
    max_waiting: analyses that may wait for a busy worker; more get `Busy`.
    memory_mb: each worker's address-space limit (0: none).
  """

  def __init__(self, workers: int = 0, analyses_per_worker: int = 20,
               timeout_s: float = 120.0, max_waiting: int = 8,
               memory_mb: int = 3072):
    self.size = int(workers) or os.cpu_count() or 1
    self.analyses_per_worker = max(1, int(analyses_per_worker))
    self.timeout_s = float(timeout_s)
    self.max_waiting = int(max_waiting)
    self.memory_mb = int(memory_mb)
    self._ctx = multiprocessing.get_context('spawn')
    self._lock = threading.Condition()
    self._queue: collections.deque[_Job] = collections.deque()
    self._workers: list[_Worker | None] = [None] * self.size
    # Workers being started, so that `close` kills them too.
    self._starting: dict[int, _Worker] = {}
    self._busy = [False] * self.size
    self._threads: list[threading.Thread] = []
    self._closed = False
    self._root: str | None = None
    self._problem: str | None = None  # Why no worker can start, if so.
    self._counts = collections.Counter()
    self._peak_rss_mb = 0.0

  @property
  def temp_root(self) -> str | None:
    """The directory holding every worker's temporary files (None until
    the first worker starts)."""
    return self._root

  async def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs) in a worker (fn: a module-level function).

    Raises:
      Busy, WorkerDied, TimedOut, Unavailable, ShuttingDown: the pool
        could not run it.
      Whatever fn raised, as it raised it.
    """
    return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

  def submit(self, fn: Callable[..., Any], *args, **kwargs
             ) -> concurrent.futures.Future:
    """As `run`, for threads: a future of the result."""
    job = _Job(fn, args, kwargs)
    with self._lock:
      if self._closed:
        raise ShuttingDown('the server is shutting down')
      if not self._threads:
        self._start_slots()
      idle = self._busy.count(False)
      if len(self._queue) >= idle + self.max_waiting:
        self._counts['refused_busy'] += 1
        raise Busy(f'{self.size} analyses are running and '
                   f'{len(self._queue) - idle} are waiting, the most the '
                   'server lets wait (serve.max_waiting); try again soon')
      self._queue.append(job)
      self._lock.notify()
    return job.future

  def stats(self) -> dict[str, Any]:
    """The pool's state for /healthz: `ok` False when analyses cannot run
    (workers cannot start, or the pool is closed), with `problem` saying
    why."""
    with self._lock:
      live = [w for w in self._workers if w is not None and w.alive()]
      problem = ('the server is shutting down' if self._closed
                 else self._problem)
      return {'ok': problem is None, 'problem': problem,
              'workers': self.size, 'alive': len(live),
              'busy': sum(self._busy),
              'waiting': max(0, len(self._queue) - self._busy.count(False)),
              'max_waiting': self.max_waiting,
              'analyses': self._counts['analyses'],
              'replaced': self._counts['replaced'],
              'died': self._counts['died'],
              'timeouts': self._counts['timeouts'],
              'refused_busy': self._counts['refused_busy'],
              'start_failures': self._counts['start_failures'],
              'peak_worker_rss_mb': round(self._peak_rss_mb, 1),
              'worker_pids': sorted(w.pid for w in live)}

  def close(self) -> None:
    """Fails every pending analysis with `ShuttingDown`, kills the workers
    and removes the temporary files. Safe from any thread, more than
    once; never blocks for long."""
    with self._lock:
      already, self._closed = self._closed, True
      queued, self._queue = list(self._queue), collections.deque()
      workers = [w for w in self._workers if w is not None] + list(
          self._starting.values())
      self._lock.notify_all()
    for job in queued:
      _fail(job, ShuttingDown('the server is shutting down'))
    # Killing a busy worker wakes its slot thread, which fails the job.
    for w in workers:
      if w.process.is_alive():
        w.process.kill()
    if not already:
      deadline = time.monotonic() + _EXIT_GRACE_S * 2
      for t in self._threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if self._root:
      shutil.rmtree(self._root, ignore_errors=True)
      atexit.unregister(self.close)

  # --- The slot threads ---------------------------------------------------

  def _start_slots(self) -> None:
    self._root = tempfile.mkdtemp(prefix='mardjax-room-')
    # A server that never closes its pool still cleans up when it exits.
    atexit.register(self.close)
    for i in range(self.size):
      t = threading.Thread(target=self._slot, args=(i,), daemon=True,
                           name=f'analysis-slot-{i}')
      t.start()
      self._threads.append(t)

  def _slot(self, i: int) -> None:
    """Feeds worker slot i: takes a job, starts the slot's worker when it
    has none, runs the job, replaces the worker when it is spent or dead."""
    try:
      while True:
        with self._lock:
          while not self._queue and not self._closed:
            self._lock.wait()
          if self._closed:
            return
          job = self._queue.popleft()
          if not job.future.set_running_or_notify_cancel():
            continue  # Its client went away while it waited.
          self._busy[i] = True
        try:
          self._run_job(i, job)
        finally:
          with self._lock:
            self._busy[i] = False
    finally:
      w = self._workers[i]
      if w is not None:
        w.stop(gently=False)

  def _run_job(self, i: int, job: _Job) -> None:
    worker = self._workers[i]
    if worker is None or not worker.alive():
      if worker is not None:  # Died while idle.
        self._detach(i, died=True)
        worker.stop(gently=False)
      worker = self._start_worker(i)
      if worker is None:
        _fail(job, Unavailable(
            f'the analysis workers cannot start ({self._problem}); '
            'the server cannot analyse recordings now'))
        return
    try:
      message = multiprocessing.reduction.ForkingPickler.dumps(job.call)
    except Exception as e:  # pylint: disable=broad-except
      _fail(job, e)  # The caller's mistake: the worker is fine.
      return
    try:
      worker.conn.send_bytes(message)
    except (OSError, ValueError):
      pass  # Died meanwhile: its sentinel says so below.
    worker.analyses += 1
    deadline = (time.monotonic() + self.timeout_s if self.timeout_s
                else None)
    answer = None
    ready = multiprocessing.connection.wait(
        [worker.conn, worker.process.sentinel],
        None if deadline is None else max(0.0, deadline - time.monotonic()))
    if worker.conn in ready:
      try:
        answer = worker.conn.recv()
      except (EOFError, OSError):
        answer = None
    if answer is not None:
      kind, value, peak = answer
      spent = (worker.analyses >= self.analyses_per_worker or
               isinstance(value, MemoryError))
      with self._lock:
        self._peak_rss_mb = max(self._peak_rss_mb, peak)
        self._counts['analyses'] += 1
      if spent:  # Counted before the client hears, so /healthz agrees.
        self._detach(i, died=False)
      if kind == 'ok':
        _resolve(job, value)
      else:
        _fail(job, value)
      if spent:
        worker.stop(gently=True)
        self._start_worker(i)
      return
    if self._closed:
      _fail(job, ShuttingDown('the server is shutting down; the analysis '
                              'was abandoned'))
      return
    if ready:  # The worker is gone without answering.
      worker.process.join(_EXIT_GRACE_S)
      code = worker.process.exitcode
      self._detach(i, died=True)
      worker.stop(gently=False)
      _fail(job, WorkerDied(
          'the analysis worker stopped before it finished (exit code '
          f'{code}); the server replaced it; try again'))
    else:
      self._detach(i, died=False, timed_out=True)
      worker.stop(gently=False)
      _fail(job, TimedOut(
          f'the analysis took longer than {self.timeout_s:g} s '
          '(serve.analysis_timeout_s) and was stopped; try a shorter '
          'recording'))
    self._start_worker(i)

  def _start_worker(self, i: int) -> _Worker | None:
    """Starts slot i's worker and waits until it is ready; None (and the
    reason in `_problem`) when it cannot start."""
    if self._closed:
      return None
    temp_dir = tempfile.mkdtemp(prefix=f'worker{i}-', dir=self._root)
    parent, child = self._ctx.Pipe()
    process = self._ctx.Process(
        target=_worker_main, name=f'mardjax-analysis-{i}', daemon=True,
        args=(child, os.getpid(), self.memory_mb, temp_dir))
    worker = _Worker(process, parent, temp_dir)
    problem = None
    try:
      with self._lock:
        if self._closed:
          raise RuntimeError('the pool is closed')
        process.start()
        self._starting[i] = worker
    except Exception as e:  # pylint: disable=broad-except
      problem = f'{type(e).__name__}: {e}'
    child.close()
    if problem is None:
      # Waits for the worker's imports; the sentinel answers if it dies.
      ready = multiprocessing.connection.wait([parent, process.sentinel],
                                              _START_TIMEOUT_S)
      message = None
      if parent in ready:
        try:
          message = parent.recv()
        except (EOFError, OSError):
          pass
      if not message or message[0] != 'ready':
        process.join(_EXIT_GRACE_S)
        problem = (message[1] if message else
                   f'a worker did not start within {_START_TIMEOUT_S:g} s'
                   if not ready else 'the worker exited at start (exit '
                   f'code {process.exitcode})')
    with self._lock:
      self._starting.pop(i, None)
      if problem is None and not self._closed:
        self._problem = None
        self._workers[i] = worker
        return worker
      if problem is not None:
        self._problem = problem
        self._counts['start_failures'] += 1
    if process.pid is not None:
      worker.stop(gently=False)
    else:
      parent.close()
      shutil.rmtree(temp_dir, ignore_errors=True)
    return None

  def _detach(self, i: int, died: bool, timed_out: bool = False) -> None:
    """Counts slot i's worker as replaced and takes it from the slot (the
    caller stops it)."""
    with self._lock:
      self._workers[i] = None
      self._counts['replaced'] += 1
      self._counts['died'] += died
      self._counts['timeouts'] += timed_out


def _resolve(job: _Job, value: Any) -> None:
  if not job.future.done():
    job.future.set_result(value)


def _fail(job: _Job, error: BaseException) -> None:
  if not job.future.done():
    job.future.set_exception(error)
