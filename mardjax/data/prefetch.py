"""A background thread that runs an iterator ahead of its consumer.

The training loop's batches are built on the host in numpy
(`input_pipeline.train_batches`: gathers of tokens and tracks, the epoch's
neighbourhood groups). Built in the loop's own thread, that work adds to
every step; built here, a step or two ahead, it runs while the device (or,
on a CPU, XLA's threads) computes the current step. numpy releases the GIL
in its gathers, so the two overlap. The sequence is the iterator's own, in
order: prefetching changes when batches are built, never which.
"""

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar('T')

_DONE = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def prefetch(iterator: Iterator[T], depth: int = 2) -> Iterator[T]:
  """Yields `iterator`'s items, built up to `depth` ahead in a daemon thread.

  An exception in the iterator is raised here, at the item where it
  happened. Closing the returned generator (or dropping it) stops the thread
  after at most one more item.
  """
  if depth < 1:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def produce():
    try:
      for item in iterator:
        while not stop.is_set():
          try:
            items.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
      items.put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except
      items.put(_Failure(e))

  thread = threading.Thread(target=produce, daemon=True,
                            name='mardjax-prefetch')
  thread.start()
  try:
    while True:
      item = items.get()
      if item is _DONE:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
