"""The text batch's layouts, built where a batch is assembled.

The mean encoder reads a batch in one of the layouts the run's plan names
(`mardjax.plan.Plan.text_layout`): padded (B, L) tokens, or with it the
flat layout (every real token end to end, `flat_review`) or the split
bag-of-words' list of tokens outside the product (`rare_tokens`). The
model only reads them; the host (`train_step.prepare_batch`,
`sparse_embedding.compact_batch`, `embed`) and the device-side assembly
(`train_step.assemble`) build them here, with one formula for both: the
functions that run in either place take `xp` (numpy on the host,
jax.numpy in a jitted step).
"""

from typing import Callable

import jax.numpy as jnp
import numpy as np

# Row-sparse training's bag-of-words product covers the first BAG_SLOTS
# rows a batch uses (its most frequent words: ids are ranked by frequency);
# the other tokens are gathered and summed one by one (`MeanEncoder`,
# `rare_tokens`). A batch's bag over all its distinct words is mostly
# zeros (a review holds a few hundred of thousands of words), while by
# Zipf's law the most frequent thousand words hold most of its tokens: the
# product shrinks to those, and the rest costs a gather per token. Chosen
# with the `train` benchmark (docs/performance.md).
BAG_SLOTS = 1024


def flat_review(lengths: np.ndarray, bucket: int,
                size_max: Callable[[int], int] | None = None) -> np.ndarray:
  """The flat layout of the mean encoder: every real token of a batch end
  to end, no padding.

  Review i's tokens are flat positions [sum(lengths[:i]), sum(lengths[:i+1]));
  the layout is the review of each position, so the encoder gathers and
  sums only real tokens (`MeanEncoder`) where the padded
  (B, max_len) layout, mostly padding at MARD's lengths, would cost for
  every position.

  Args:
    lengths: (D, B) true lengths (0 allowed), D devices.
    bucket: the flat size T (the same on every device) is rounded up to a
      multiple of this, so that only a few shapes are compiled.
    size_max: with several processes, maps this process's size to the
      largest of any process.

  Returns:
    (D, T) int32: the review (0..B-1) of each flat position; B past the
    last real token.
  """
  size = int(lengths.sum(1).max()) if lengths.shape[0] else 0
  if size_max is not None:
    size = size_max(size)
  size = flat_size(size, bucket)
  return np.asarray([flat_owner(x, size, np) for x in lengths],
                    np.int32).reshape(-1, size)


def flat_owner(lengths, size: int, xp=jnp):
  """(B,) true lengths -> (size,) int32 review of each flat position, B past
  the last real token: the one formula of the flat layout, on the host
  (`xp=np`, `flat_review`) and in a jitted step (`xp=jnp`): position p
  belongs to the review whose running end is the first above p, that is
  to as many reviews as have ended by p. Counted as a running sum of ones
  placed at the reviews' ends (a binary search per position would compile
  to a `while` loop, kernel launches in series on an accelerator)."""
  ends = xp.minimum(xp.cumsum(lengths), size)
  if xp is np:
    ended = np.bincount(ends, minlength=size + 1)
  else:
    ended = jnp.zeros((size + 1,), jnp.int32).at[ends].add(1)
  return xp.cumsum(ended[:size]).astype(xp.int32)


def flat_size(tokens: int, bucket: int) -> int:
  """T of the flat layout of `tokens` real tokens: rounded up to a multiple
  of `bucket`, at least one bucket."""
  return max(-(-int(tokens) // bucket) * bucket, bucket)


def rare_mask(slots, lengths, xp=jnp):
  """(..., b, L) bool: the real tokens whose row is not in the bag-of-words
  product (`BAG_SLOTS`), from (..., b, L) slots (or word ids, whose first
  `BAG_SLOTS` are the most frequent words) and (..., b) lengths; the one
  formula of the host (`xp=np`) and the step."""
  real = xp.arange(slots.shape[-1]) < lengths[..., None]
  return real & (slots >= BAG_SLOTS)


def rare_tokens(rare, size: int, xp=jnp):
  """(size,) int32 positions of the True entries of a flat (b * L,)
  `rare_mask`, in order, then b * L; `size` must hold them all."""
  if xp is np:
    out = np.full(size, rare.shape[0], np.int32)
    found = np.flatnonzero(rare)
    out[:found.shape[0]] = found
    return out
  return jnp.nonzero(rare, size=size, fill_value=rare.shape[0])[0].astype(
      jnp.int32)
