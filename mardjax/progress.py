"""Progress bars, metric writers, and an ordered process pool for long data
jobs."""

import contextlib
import multiprocessing
import sys
from typing import Any, Callable, Iterable, Iterator

from absl import logging
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


class _LoggingWriter:
  """Metrics to the log only: where TensorFlow (TensorBoard's event writer
  in clu) is not installed, as on GPU machines without it."""

  def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
    logging.info('[%d] %s', step, ', '.join(
        f'{k}={v:.6g}' if isinstance(v, (int, float)) else f'{k}={v}'
        for k, v in sorted(scalars.items())))

  def write_hparams(self, hparams: dict[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass


def metric_writer(workdir: str, just_logging: bool = False):
  """clu's TensorBoard + log writer, or the log alone without TensorFlow."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError:
    logging.warning('TensorBoard events need TensorFlow, which is not '
                    'installed: metrics go to the log only.')
    return _LoggingWriter()
  return metric_writers.create_default_writer(workdir,
                                              just_logging=just_logging)
