"""The prefetching thread: same items in the same order, errors raised at
their item, the thread stopped when the consumer stops."""

import contextlib
import itertools
import threading

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


def _new_prefetch_threads(before):
  return [t for t in threading.enumerate()
          if t.name == 'mardjax-prefetch' and t not in before]


def test_closing_stops_the_thread():
  """After close() the producing thread ends (joined, with a bound on the
  wait so a thread that never stops fails the test instead of hanging it),
  and it made at most the items taken, the queue's depth and the one it
  held when it was stopped."""
  made = []

  def endless():
    for i in itertools.count():
      made.append(i)
      yield i
  before = set(threading.enumerate())
  it = prefetch.prefetch(endless(), depth=2)
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  (thread,) = _new_prefetch_threads(before)
  it.close()
  thread.join(timeout=60)
  assert not thread.is_alive()
  # The thread is gone, so `made` can no longer grow.
  assert made == list(range(len(made))) and 3 <= len(made) <= 3 + 2 + 1


def test_the_thread_ends_after_an_error_and_after_the_last_item():
  """The thread ends on its own once it has passed on the iterator's end or
  its error: nothing is left running after a finished sequence."""
  def broken():
    yield 1
    raise ValueError('bad record')
  for source, expected in ((iter(range(4)), [0, 1, 2, 3]), (broken(), [1])):
    before = set(threading.enumerate())
    it = prefetch.prefetch(source, depth=2)
    got = []
    with pytest.raises(ValueError) if expected == [1] else contextlib.nullcontext():
      for item in it:
        got.append(item)
    assert got == expected
    for thread in _new_prefetch_threads(before):
      thread.join(timeout=60)
      assert not thread.is_alive()

