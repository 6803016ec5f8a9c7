"""Progress bars and an ordered process pool for long data jobs."""

import contextlib
import multiprocessing
import sys
from typing import Any, Callable, Iterable, Iterator

import tqdm


def bar(total: int | None, desc: str, unit: str = 'it',
        enabled: bool = True) -> tqdm.tqdm:
  """A tqdm bar on stderr; sparse updates when stderr is not a terminal."""
  tty = sys.stderr.isatty()
  return tqdm.tqdm(total=total, desc=desc, unit=unit, disable=not enabled,
                   file=sys.stderr, mininterval=0.2 if tty else 5.0,
                   dynamic_ncols=True, smoothing=0.1)


@contextlib.contextmanager
def pool_map(num_workers: int, chunksize: int = 1) -> Iterator[Callable[[Callable, Iterable],
                                                    Iterator[Any]]]:
  """Yields an ordered, lazy `map(fn, items)` over `num_workers` processes.

  One worker maps in this process (no start-up cost, easy to debug). Workers
  are spawned, not forked: the parent may hold TensorFlow or JAX threads,
  which do not survive a fork.
  """
  if num_workers <= 1:
    yield map
    return
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(num_workers) as pool:
    yield lambda fn, items: pool.imap(fn, items, chunksize=chunksize)
