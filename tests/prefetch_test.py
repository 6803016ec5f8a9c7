"""The prefetching thread: same items in the same order, errors raised at
their item, the thread stopped when the consumer stops."""

import itertools
import threading
import time

import pytest

from mardjax.data import prefetch


def test_prefetch_yields_the_same_sequence():
  assert list(prefetch.prefetch(iter(range(50)), depth=3)) == list(range(50))
  assert list(prefetch.prefetch(iter(range(5)), depth=0)) == list(range(5))


def test_an_error_is_raised_at_its_item():
  def broken():
    yield 1
    yield 2
    raise ValueError('bad record')
  it = prefetch.prefetch(broken())
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(ValueError, match='bad record'):
    next(it)


def test_closing_stops_the_thread():
  made = []

  def endless():
    for i in itertools.count():
      made.append(i)
      yield i
  it = prefetch.prefetch(endless(), depth=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  it.close()
  time.sleep(0.5)
  count = len(made)
  time.sleep(0.3)
  assert len(made) == count <= 3 + 2 + 2  # Stopped, a few items ahead.
  assert not any(t.name == 'mardjax-prefetch' and t.is_alive()
                 for t in threading.enumerate())
