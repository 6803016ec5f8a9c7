"""Reviews packed end to end into rows, so the text LSTM skips padding.

Review lengths are heavy-tailed (median ~90 words, max_len 400): a padded
(B, 400) batch is mostly padding, and an LSTM pays for every position. Packed,
B reviews of a batch share R rows of max_len positions (best-fit
decreasing: about 40 rows for 128 MARD reviews), the LSTM's state is reset
where a review starts (and, running backwards, where one ends), and each
review's features are read at its last (forwards) and first (backwards)
position. The features equal those of the padded layout
(tests/models_test.py).

Layout of one device's packed batch:
  * 'tokens' (R, P): the reviews' tokens, padding 0 after the last review of
    a row;
  * 'starts' (R, P) bool: first position of a review; 'ends' (R, P) bool:
    last position of a review;
  * 'first', 'last' (B, 2) int32: (row, position) of review i's first and
    last token.
An empty review takes one position holding the padding token, as in the
padded layout.

Where each review goes (`plan`: best-fit decreasing over the lengths) is
decided on the host, from lengths alone; the layout is then built there
(`pack`, host-assembled batches) or inside the step from the reviews
gathered on the device (`pack_on_device`), and the two are equal.
"""

import bisect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ('tokens', 'starts', 'ends', 'first', 'last')


def assign_rows(lengths: np.ndarray, capacity: int
                ) -> tuple[np.ndarray, np.ndarray, int]:
  """Best-fit decreasing: (row (B,), start position (B,), rows used).

  Longest review first, each into the row with the least room that still
  holds it (the lowest such row on a tie), else into a new row. The rows
  with room are kept as one sorted list of free * (B + 1) + row, so the
  search and the update are `bisect` calls: `plan` is O(B log B), host
  work beside every step, where first-fit decreasing's numpy scan over the
  rows is O(B R) for the same row counts (38, 277 and 2,332 rows at 128,
  1,024 and 8,192 MARD-like reviews).
  """
  lengths = np.maximum(lengths, 1)
  if np.any(lengths > capacity):
    raise ValueError(f'a review of {lengths.max()} tokens is longer than the '
                     f'row length {capacity}')
  b = lengths.shape[0]
  row, start = [0] * b, [0] * b
  room = []  # Rows with room left, as free * (b + 1) + row, ascending.
  used = 0
  order = np.argsort(-lengths, kind='stable')
  for i, n in zip(order.tolist(), lengths[order].tolist()):
    j = bisect.bisect_left(room, n * (b + 1))
    if j < len(room):
      free, r = divmod(room.pop(j), b + 1)
    else:
      free, r, used = capacity, used, used + 1
    row[i], start[i] = r, capacity - free
    if free > n:
      bisect.insort(room, (free - n) * (b + 1) + r)
  return np.asarray(row, np.int64), np.asarray(start, np.int64), used


def plan(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
  """Where each device's reviews go, from their lengths alone.

  Args:
    lengths: (D, B) true lengths (0 allowed), D devices.
    capacity: P, positions per row (max_len).

  Returns:
    (place (D, B, 2) int32: (row, first position) of each review, the
    rows the fullest device uses).
  """
  plans = [assign_rows(x, capacity) for x in lengths]
  place = np.stack([np.stack([row, start], -1) for row, start, _ in plans])
  return place.astype(np.int32), max(used for _, _, used in plans)


def row_count(used: int, rows_multiple: int, batch: int) -> int:
  """R, the packed batch's rows: `used` rounded up to a multiple of
  `rows_multiple` (few shapes to compile), at most the batch's B."""
  return min(-(-used // rows_multiple) * rows_multiple, batch)


def pack(tokens: np.ndarray, lengths: np.ndarray, rows_multiple: int,
         rows_max: Callable[[int], int] | None = None
         ) -> dict[str, np.ndarray]:
  """Packs each device's reviews on the host (numpy).

  Args:
    tokens: (D, B, P) padded tokens (or slots), D devices.
    lengths: (D, B) true lengths (0 allowed).
    rows_multiple: the row count R (the same on every device) is rounded up
      to a multiple of this (`row_count`).
    rows_max: with several processes, maps this process's row count to the
      largest of any process (every device needs the same shape).

  Returns:
    The packed arrays (module docstring), each with a leading D axis.
  """
  d, b, p = tokens.shape
  place, used = plan(lengths, p)
  rows = row_count(rows_max(used) if rows_max else used, rows_multiple, b)
  out = {'tokens': np.zeros((d, rows, p), tokens.dtype),
         'starts': np.zeros((d, rows, p), bool),
         'ends': np.zeros((d, rows, p), bool),
         'first': np.zeros((d, b, 2), np.int32),
         'last': np.zeros((d, b, 2), np.int32)}
  pos = np.arange(p)
  for i in range(d):
    row, start = place[i, :, 0], place[i, :, 1]
    n = np.maximum(lengths[i], 1)
    # Scatter every review's tokens (its padding token if empty) at once.
    valid = pos[None, :] < n[:, None]
    dest_row = np.broadcast_to(row[:, None], valid.shape)[valid]
    dest_pos = (start[:, None] + pos[None, :])[valid]
    out['tokens'][i, dest_row, dest_pos] = tokens[i][valid]
    out['starts'][i, row, start] = True
    out['ends'][i, row, start + n - 1] = True
    out['first'][i] = place[i]
    out['last'][i] = np.stack([row, start + n - 1], 1)
  return out


def pack_on_device(tokens: jax.Array, lengths: jax.Array, place: jax.Array,
                   rows: int) -> dict[str, jax.Array]:
  """`pack` of one device's reviews inside a jitted step, from the host's
  `plan`: the same arrays, without the leading D axis.

  Args:
    tokens: (B, P) padded tokens, 0 after each review's length.
    lengths: (B,) true lengths (0 allowed), at most P.
    place: (B, 2) int32 (row, first position) of each review (`plan`).
    rows: R (static).
  """
  p = tokens.shape[1]
  row, start = place[:, 0], place[:, 1]
  n = jnp.maximum(lengths, 1)
  pos = jnp.arange(p)
  valid = pos[None, :] < n[:, None]
  # Positions past a review's end go to row R, out of bounds, and are
  # dropped; an empty review writes its padding token at its one position.
  dest_row = jnp.where(valid, row[:, None], rows)
  dest_pos = jnp.where(valid, start[:, None] + pos[None, :], 0)
  last = start + n - 1
  return {
      'tokens': jnp.zeros((rows, p), tokens.dtype).at[dest_row, dest_pos].set(
          tokens, mode='drop'),
      'starts': jnp.zeros((rows, p), bool).at[row, start].set(True),
      'ends': jnp.zeros((rows, p), bool).at[row, last].set(True),
      'first': place,
      'last': jnp.stack([row, last], 1)}
