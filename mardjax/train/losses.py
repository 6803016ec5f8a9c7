"""The bi-directional margin ranking loss with neighbourhood constraints.

With L2-normalised audio embeddings x (B, D), text embeddings y (B, D) and
album ids per row, positives are pairs of the same album (many-to-many) and
negatives pairs of different albums; a same-album row is never a negative.
Four hinge terms `[m + d(anchor, pos) - d(anchor, neg)]_+`, Euclidean d:

  1. audio anchor, text positives vs text negatives      (weight l1)
  2. text anchor, audio positives vs audio negatives     (weight l2; l2 = 0 is
     the paper's uni-directional row)
  3. audio-audio neighbourhood: tracks of one album closer than others' (l3)
  4. text-text neighbourhood: reviews of one album closer than others'  (l4)

For each (anchor, positive) pair the hinges over its negatives are summed
(the paper's eq. 3; the original code overwrote instead of summing), and each
term is the mean over the valid (anchor, positive) pairs. In the neighbourhood
terms an anchor is not its own positive.

Negatives per (anchor, positive):
  * `all`: every in-batch negative (memory O(B^3): fine for B of a few
    hundred; use the others beyond);
  * `sampled:K`: K negatives drawn uniformly (with replacement) for each
    (anchor, positive) pair (the paper: K = 10); the pairs of one anchor
    share its K draws;
  * `hardest:K`: the K negatives closest to the anchor (Wang et al.'s top-K
    most violating);
  * `hardest:K+sampled:S`: those K and S drawn uniformly beside them: the
    hardest keep the hinges active, the uniform ones keep every wrong
    album in view (what holds for albums never seen in training is the
    coarse layout of the space, which the hardest alone never look at).

Given each anchor's list of positives (`positive_lists`, made on the host
with the batch, or `device_positive_lists`, in the step from the album ids
the sampled negatives' draw sorts; lists of width W), the hinges are
computed for those pairs only: (B, W, K) hinges, and under `sampled:K` the distances of the listed
and drawn pairs only, from gathered rows, O(B (K + W) D) in all, where the
hinges of every candidate as a positive are a (B, B, K) array (B^3 under
`all`). Without lists: a pairwise distance matrix and a `jax.vmap` over
anchors. No Python loop over the batch either way.

With `axis_name` set (inside pmap or shard_map)
the mean is taken over the global batch's pairs (see `_global_mean`), and with
gathering on, negatives and positives come from the global batch while each
device keeps its own anchors: the data-parallel loss then equals the
single-device loss of the whole batch.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mardjax.errors import need_choice
from mardjax.errors import UserError

# Squared distances are clamped here before the square root: sqrt has an
# infinite derivative at 0 (an anchor's distance to itself), and 0 * inf is NaN.
_MIN_SQUARED_DISTANCE = 1e-12
_BIG = 1e9


@dataclasses.dataclass(frozen=True)
class NegativeMode:
  """Parsed `negatives` config value: kind in {all, sampled, hardest}, k,
  and under `hardest` the uniform negatives drawn beside the k hardest."""
  kind: str
  k: int = 0
  sampled: int = 0

  @property
  def draws(self) -> int:
    """Uniform draws an anchor needs (0: no draw, no album blocks)."""
    return self.k if self.kind == 'sampled' else self.sampled

  @classmethod
  def parse(cls, text: str) -> 'NegativeMode':
    first, plus, second = text.partition('+')
    kind, _, k = first.partition(':')
    extra, _, s = second.partition(':')
    if kind == 'all' and not k and not plus:
      return cls('all')
    if kind in ('sampled', 'hardest') and k.isdigit() and int(k) > 0:
      if not plus:
        return cls(kind, int(k))
      if (kind == 'hardest' and extra == 'sampled' and s.isdigit()
          and int(s) > 0):
        return cls(kind, int(k), int(s))
    raise ValueError(f'negatives={text!r}: use all, sampled:K, hardest:K '
                     'or hardest:K+sampled:S (K, S positive integers).')


def pairwise_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """Euclidean distances (N, M) between rows of a (N, D) and b (M, D)."""
  sq = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :] -
        2.0 * a @ b.T)
  return jnp.sqrt(jnp.maximum(sq, _MIN_SQUARED_DISTANCE))


def _pair_masks(anchor_ids: jax.Array, candidate_ids: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """(N, M) bool masks of the positive (same album) and negative pairs of
  (N,) anchors and (M,) candidates; padding (id < 0) is in neither."""
  same = anchor_ids[:, None] == candidate_ids[None, :]
  real = (anchor_ids[:, None] >= 0) & (candidate_ids[None, :] >= 0)
  return same & real, ~same & real


def _hardest_negatives(dist: jax.Array, neg: jax.Array, k: int
                       ) -> tuple[jax.Array, jax.Array]:
  """The k negatives closest to each anchor, along the last axis of
  (..., M) distances and negative mask: (..., k) their distances and
  whether each is a real negative (fewer than k: the rest are not)."""
  top, _ = jax.lax.top_k(jnp.where(neg, -dist, -_BIG),
                         min(k, dist.shape[-1]))
  return -top, top > -_BIG / 2


def _anchor_hinges(dist_row: jax.Array, pos: jax.Array, neg: jax.Array,
                   margin: float, mode: NegativeMode,
                   sampled: tuple[jax.Array, jax.Array] | None
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Hinge sum of one anchor over its (positive, negative) pairs.

  Args:
    dist_row: (M,) distances from the anchor to every candidate.
    pos, neg: (M,) bool masks of positive and negative candidates.
    margin: m.
    mode: how negatives are chosen.
    sampled: (with uniform draws only) the (K,) candidate indices of the
      anchor's sampled negatives (`_sampled_negatives`) and whether it has
      any negative.

  Returns:
    (sum over positives of the summed hinges, number of positives, number
    of (positive, negative) hinges that are active (> 0), number of them).
  """
  num_pos = jnp.sum(pos)

  def result(h, slots):  # h, slots: (M, K) hinges and which ones count.
    h = h * slots
    return (jnp.sum(h), num_pos, jnp.sum((h > 0) & slots),
            jnp.sum(slots))

  if mode.kind == 'all':
    # (M_pos, M_neg): hinge of positive j against negative k.
    h = jax.nn.relu(margin + dist_row[:, None] - dist_row[None, :])
    return result(h, pos[:, None] & neg[None, :])
  # Sampled: drawn once per anchor and used for each of its positives:
  # every (anchor, positive) pair still meets K uniform negatives (the
  # expected loss is unchanged); drawing per pair would cost M times the
  # random numbers, each a threefry hash computed in the step.
  # (K, M): each draw against every candidate, reduced along the long,
  # contiguous axis; a candidate counts when it is a positive.
  drawn = (0.0, 0, 0)
  if sampled is not None:
    index, has_neg = sampled
    counted = pos & has_neg
    h = jax.nn.relu(margin + dist_row[None, :] - dist_row[index][:, None]
                    ) * counted[None, :]
    drawn = (jnp.sum(h), jnp.sum(h > 0), jnp.sum(counted) * index.shape[0])
  if mode.kind == 'sampled':
    return drawn[0], num_pos, drawn[1], drawn[2]
  # The K negatives closest to the anchor (same for every positive).
  neg_d, valid = _hardest_negatives(dist_row, neg, mode.k)
  h = jax.nn.relu(margin + dist_row[:, None] - neg_d[None, :])
  total, _, hits, slots = result(h, pos[:, None] & valid[None, :])
  return total + drawn[0], num_pos, hits + drawn[1], slots + drawn[2]


class AlbumBlocks(NamedTuple):
  """The candidates grouped by album, seen from each anchor
  (`album_blocks`): what the sampled negatives' draw and the positive lists
  made in the step read.

  Attributes:
    order: (M,) int32 candidate indices sorted by album id, stably: the
      padding rows (id < 0) first, then one block an album, its rows in
      index order.
    start: (N,) int32 where each anchor's album's block starts in `order`.
    size: (N,) int32 the block's length: the anchor's album's candidates.
    padding: () int32 how many candidates are padding (they come first).
  """
  order: jax.Array
  start: jax.Array
  size: jax.Array
  padding: jax.Array


def album_blocks(candidate_ids: jax.Array, anchor_index: jax.Array
                 ) -> AlbumBlocks:
  """Each anchor's album block among the candidates sorted by album id.

  One sort, then no search and no loop (a binary search compiles to a
  `while` of log M iterations, kernel launches in series on an
  accelerator): a block starts where a sorted id differs from the one
  before; each position's block start is the running maximum of those
  starts, its end the running minimum of the ends from the right; an
  anchor finds its sorted position through the inverse permutation.

  Args:
    candidate_ids: (M,) album ids (< 0: padding).
    anchor_index: (N,) each anchor's index among the candidates (its album
      is the candidate's).

  Returns:
    The `AlbumBlocks`.
  """
  m = candidate_ids.shape[0]
  order = jnp.argsort(candidate_ids).astype(jnp.int32)  # Stable.
  ids = candidate_ids[order]
  at = jnp.arange(m, dtype=jnp.int32)
  change = ids[1:] != ids[:-1]
  edge = jnp.ones((1,), bool)
  first = jnp.concatenate([edge, change])
  last = jnp.concatenate([change, edge])
  block_start = jax.lax.cummax(jnp.where(first, at, 0))
  block_end = jax.lax.cummin(jnp.where(last, at, m - 1), reverse=True)
  rank = jnp.zeros((m,), jnp.int32).at[order].set(at, unique_indices=True)
  mine = rank[anchor_index]
  start = block_start[mine]
  return AlbumBlocks(order, start, block_end[mine] + 1 - start,
                     jnp.sum(candidate_ids < 0, dtype=jnp.int32))


def _sampled_negatives(blocks: AlbumBlocks, anchor_ids: jax.Array,
                       uniform: jax.Array) -> tuple[jax.Array, jax.Array]:
  """K negatives per anchor, uniform with replacement, in O(1) a draw.

  Sorted by album id (padding rows, id < 0, first), an anchor's negatives
  are every real candidate but one contiguous block, its album's. Draw r,
  uniform in [0, count), is the r-th of them in that order: position
  padding + r, moved past the block when it reaches it. (Finding the
  r-th negative in index order instead takes a running count and K x M
  comparisons per anchor, quadratic in the batch: at large batches that
  alone would dominate the step.)

  Args:
    blocks: the candidates' album blocks (`album_blocks`) of N anchors.
    anchor_ids: (N,) the anchors' album ids (< 0: padding).
    uniform: (N, K) draws in [0, 1).

  Returns:
    ((N, K) candidate index of each draw, (N,) whether the anchor has any
    negative; without one its draws mean nothing).
  """
  m = blocks.order.shape[0]
  start, size = blocks.start, blocks.size
  count = jnp.where(anchor_ids >= 0, m - blocks.padding - size, 0)
  r = jnp.clip((uniform * count[:, None]).astype(jnp.int32), 0,
               jnp.maximum(count - 1, 0)[:, None])
  at = blocks.padding + r
  at = jnp.where(at >= start[:, None], at + size[:, None], at)
  return blocks.order[jnp.minimum(at, m - 1)], count > 0


def device_positive_lists(blocks: AlbumBlocks, anchor_ids: jax.Array,
                          width: int) -> jax.Array:
  """(N, width) int32 each anchor's positives, made in the step: its album's
  candidates, itself included, in index order, then -1 (none for a padding
  anchor); the lists `positive_lists` makes on the host, from the sort
  the sampled negatives' draw already needs.

  A block longer than `width` is cut to its first `width` rows: the caller
  chooses `width` at least the longest block (`positive_width`)."""
  slot = jnp.arange(width, dtype=jnp.int32)
  m = blocks.order.shape[0]
  at = jnp.minimum(blocks.start[:, None] + slot, m - 1)
  keep = (slot < blocks.size[:, None]) & (anchor_ids >= 0)[:, None]
  return jnp.where(keep, blocks.order[at], -1)


# Above this many (anchor, candidate) pairs the sampled hinges' distances
# are computed from gathered rows, pair by pair, not as a whole matrix: an
# anchor reads its W positives and K draws, a few dozen of the row's
# distances (at batch 8,192 the matrix is 67 million distances a term, of
# which a few hundred thousand are read). Up to batch 512, the matrix: it
# is cheap there, and gathered rows cost the gradient a scatter into the
# rows (the train benchmark at batch 128 to 1,024; see
# docs/performance.md).
_PAIRS_FOR_ROWS = 512 * 512


# The narrowest positive list (`positive_lists`): under neighbourhood
# sampling (2 reviews an album) a batch's lists are 2 long, or 4 when an
# album's groups meet in one batch; one width serves both, one program.
MIN_POSITIVES = 4


def positive_width(longest: int) -> int:
  """The width of positive lists whose longest holds `longest`: a power of
  two, at least `MIN_POSITIVES` (few widths, few programs)."""
  return max(MIN_POSITIVES, 1 << max(longest - 1, 0).bit_length())


def positive_lists(album: np.ndarray, across_devices: bool,
                   width: Callable[[int], int] | None = None) -> np.ndarray:
  """Each row's positives among its candidates, for the ranking loss's
  hinges (`ranking_term`), made on the host.

  Args:
    album: (D, b) album ids of D devices' rows; < 0: padding.
    across_devices: the candidates are every device's rows, numbered
      d * b + i (the loss gathers them); otherwise each device's own b.
    width: maps `positive_width` of the longest list to W (the run's
      agreed width, at least as wide); None: that width.

  Returns:
    (D, b, W) int32: the candidates of each row's album, itself included,
    in index order, then -1 (a padding row's list is empty).

  Raises:
    ValueError: `width` gave a width shorter than a list.
  """
  d, b = album.shape
  groups = album.reshape(1, -1) if across_devices else album
  n = groups.shape[1]
  order = np.argsort(groups, axis=1, kind='stable')  # Index order in a block.
  ids = np.take_along_axis(groups, order, 1)
  # Each sorted position's album block (numbered across the groups): its
  # first position and its length.
  starts = np.ones(ids.shape, bool)
  starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
  first = np.maximum.accumulate(np.where(starts, np.arange(n), 0), axis=1)
  block = np.cumsum(starts.ravel()).reshape(ids.shape) - 1
  size = np.where(ids >= 0, np.bincount(block.ravel())[block], 0)
  longest = int(size.max()) if size.size else 0
  width = (width or (lambda w: w))(positive_width(longest))
  if longest > width:
    raise ValueError(f'A row has {longest} positives, more than the '
                     f'positive list width {width}.')
  slot = np.arange(width)
  at = np.minimum(first[:, :, None] + slot, n - 1)
  sorted_lists = np.where(slot < size[:, :, None],
                          np.take_along_axis(order, at.reshape(len(groups), -1),
                                             1).reshape(at.shape), -1)
  lists = np.empty_like(sorted_lists)
  np.put_along_axis(lists, order[:, :, None], sorted_lists, 1)
  return lists.reshape(d, b, width).astype(np.int32)


def _row_distances(anchors: jax.Array, candidates: jax.Array,
                   index: jax.Array) -> jax.Array:
  """(N, J) Euclidean distances from anchor n to candidates index[n] (as
  `pairwise_distances` computes them, pair by pair)."""
  rows = candidates[index]  # (N, J, D)
  # The candidates' squared norms are taken once per candidate and read by
  # index: the gathered rows then enter one product only, and their
  # gradient is that product's alone (no second (N, J, D) term to add).
  sq = (jnp.sum(anchors * anchors, -1)[:, None]
        + jnp.sum(candidates * candidates, -1)[index]
        - 2.0 * jnp.einsum('nd,njd->nj', anchors, rows))
  return jnp.sqrt(jnp.maximum(sq, _MIN_SQUARED_DISTANCE))


def _listed_hinges(anchors: jax.Array, candidates: jax.Array,
                   anchor_ids: jax.Array, candidate_ids: jax.Array,
                   positives: jax.Array, margin: float, mode: NegativeMode,
                   sampled: tuple[jax.Array, jax.Array] | None,
                   self_index: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`_anchor_hinges`' four sums over every anchor at once, for the listed
  positives only: (N, W, J) hinges for J negatives an anchor (K, or M
  under `all`) instead of (N, M, J)."""
  # An anchor is not its own neighbour (self_index -1: no such rule).
  valid = (positives >= 0) & (positives != self_index[:, None])
  listed = jnp.maximum(positives, 0)
  if mode.kind == 'sampled':
    index, has_neg = sampled
    if anchors.shape[0] * candidates.shape[0] > _PAIRS_FOR_ROWS:
      # Distances of the listed and drawn pairs only, from gathered rows.
      pos_d = _row_distances(anchors, candidates, listed)
      neg_d = _row_distances(anchors, candidates, index)
    else:
      dist = pairwise_distances(anchors, candidates)
      pos_d = jnp.take_along_axis(dist, listed, 1)
      neg_d = jnp.take_along_axis(dist, index, 1)
    neg_ok = jnp.broadcast_to(has_neg[:, None], neg_d.shape)
  else:
    dist = pairwise_distances(anchors, candidates)
    _, neg = _pair_masks(anchor_ids, candidate_ids)
    pos_d = jnp.take_along_axis(dist, listed, 1)
    if mode.kind == 'hardest':
      neg_d, neg_ok = _hardest_negatives(dist, neg, mode.k)
      if sampled is not None:  # The uniform draws beside the hardest.
        index, has_neg = sampled
        neg_d = jnp.concatenate(
            [neg_d, jnp.take_along_axis(dist, index, 1)], 1)
        neg_ok = jnp.concatenate([neg_ok, jnp.broadcast_to(
            has_neg[:, None], index.shape)], 1)
    else:
      neg_d, neg_ok = dist, neg
  counted = valid[:, :, None] & neg_ok[:, None, :]
  h = jax.nn.relu(margin + pos_d[:, :, None] - neg_d[:, None, :]) * counted
  return jnp.sum(h), jnp.sum(valid), jnp.sum(h > 0), jnp.sum(counted)


def _term_sums(anchors: jax.Array, candidates: jax.Array,
               anchor_ids: jax.Array, candidate_ids: jax.Array,
               margin: float, mode: NegativeMode,
               uniform: jax.Array | None, self_index: jax.Array,
               positives: jax.Array | None, blocks: AlbumBlocks | None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """One term's (hinge sum, valid pairs, active hinges, hinge slots); the
  arguments as `ranking_term`'s, `self_index` -1 where no anchor is
  excluded."""
  sampled = (_sampled_negatives(blocks, anchor_ids, uniform)
             if mode.draws else None)
  if positives is not None:
    sums = _listed_hinges(anchors, candidates, anchor_ids, candidate_ids,
                          positives, margin, mode, sampled, self_index)
  else:
    sums = _all_pair_hinges(anchors, candidates, anchor_ids, candidate_ids,
                            margin, mode, sampled, self_index)
  return tuple(jnp.sum(x) for x in sums)


def ranking_term(anchors: jax.Array, candidates: jax.Array,
                 anchor_ids: jax.Array, candidate_ids: jax.Array,
                 margin: float, mode: NegativeMode,
                 uniform: jax.Array | None = None,
                 self_index: jax.Array | None = None,
                 axis_name: str | None = None,
                 positives: jax.Array | None = None,
                 blocks: AlbumBlocks | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """One hinge term, averaged over valid (anchor, positive) pairs.

  `ranking_loss` computes its terms together, as one stacked computation
  of this function's arithmetic.

  Args:
    anchors: (N, D) embeddings.
    candidates: (M, D) embeddings to rank for each anchor.
    anchor_ids: (N,) album id of each anchor; ids < 0 mark padding rows.
    candidate_ids: (M,) album id of each candidate; < 0 = padding.
    margin: m.
    mode: negatives.
    uniform: (N, K) draws in [0, 1) choosing each anchor's K uniform
      negatives (`mode.draws` of them).
    self_index: (N,) index of each anchor among the candidates, for the
      neighbourhood terms (an anchor is not its own positive); None otherwise.
    axis_name: device axis; the mean is then over the global batch's pairs.
    positives: (N, W) each anchor's positives among the candidates
      (`positive_lists`, -1 past the end; the anchor itself included): the
      hinges are then computed for those pairs only.
    blocks: `album_blocks` of the candidates for these anchors, needed
      for uniform draws.

  Returns:
    (scalar loss, 0 when no anchor has a positive; the fraction of its
    (anchor, positive, negative) hinges that are active, a diagnostic).
  """
  if mode.draws and blocks is None:
    raise ValueError('Uniform negatives need the album blocks.')
  if self_index is None:
    self_index = jnp.full(anchor_ids.shape, -1, jnp.int32)
  sums, counts, active, slots = _term_sums(
      anchors, candidates, anchor_ids, candidate_ids, margin, mode, uniform,
      self_index, positives, blocks)
  return (_global_mean(sums, counts, axis_name),
          jax.lax.stop_gradient(_global_mean(
              active.astype(sums.dtype), slots, axis_name)))


def _all_pair_hinges(anchors: jax.Array, candidates: jax.Array,
                     anchor_ids: jax.Array, candidate_ids: jax.Array,
                     margin: float, mode: NegativeMode,
                     sampled: tuple[jax.Array, jax.Array] | None,
                     self_index: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """`_anchor_hinges` of every anchor against every candidate: (N,) each
  of its four sums."""
  dist = pairwise_distances(anchors, candidates)
  pos, neg = _pair_masks(anchor_ids, candidate_ids)
  pos = pos & (jnp.arange(candidates.shape[0])[None, :] !=
               self_index[:, None])
  # `sampled` None (other modes) maps as an empty tree.
  per_anchor = jax.vmap(
      lambda d, p, n, s: _anchor_hinges(d, p, n, margin, mode, s))
  return per_anchor(dist, pos, neg, sampled)


def _global_mean(total: jax.Array, count: jax.Array,
                 axis_name: str | None) -> jax.Array:
  """total / count over the whole data-parallel batch, as this device's share.

  On one device: total / max(count, 1). Under a device axis, each device
  returns D * total_d / sum_d(count_d), so that averaging the devices' values
  and gradients (what the train step's pmean does) gives exactly the loss and
  gradient of the global batch, even when devices hold different numbers of
  valid pairs.
  """
  if axis_name is None:
    return total / jnp.maximum(count, 1)
  global_count = jax.lax.stop_gradient(jax.lax.psum(count, axis_name))
  devices = jax.lax.psum(1, axis_name)
  return total * devices / jnp.maximum(global_count, 1)


def _gather(x: jax.Array, axis_name: str | None) -> jax.Array:
  if axis_name is None:
    return x
  return jax.lax.all_gather(x, axis_name, tiled=True)


# The four terms: (name, anchors are text, candidates are text, an anchor
# is excluded from its own positives).
TERMS = (('audio_to_text', False, True, False),
         ('text_to_audio', True, False, False),
         ('audio_neighbourhood', False, False, True),
         ('text_neighbourhood', True, True, True))


def _stacked_terms(on: list[int], embeddings: tuple[jax.Array, ...],
                   album_ids: jax.Array, cand_ids: jax.Array,
                   self_index: jax.Array, draws: jax.Array | None,
                   margin: float, mode: NegativeMode,
                   positives: jax.Array | None, blocks: AlbumBlocks | None,
                   axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """The terms `on` (indices into `TERMS`) as one computation: `jax.vmap`
  of `_term_sums` over the terms' stacked anchors and candidates.

  Args:
    on: the terms to compute, in order.
    embeddings: (audio, text) (B, D) and their candidates (M, D).
    draws: (4, B, K) every term's uniform draws (`mode.draws`), or None.
    The rest as `ranking_loss` has them.

  Returns:
    ((len(on),) each term's loss; () the active fraction of the
    cross-modal terms' hinges among them, 0 when none is on).
  """
  audio, text, cand_audio, cand_text = embeddings
  anchors = jnp.stack([text if TERMS[i][1] else audio for i in on])
  cands = jnp.stack([cand_text if TERMS[i][2] else cand_audio for i in on])
  selves = jnp.stack([self_index if TERMS[i][3] else
                      jnp.full_like(self_index, -1) for i in on])
  uniform = None if draws is None else draws[jnp.asarray(on)]
  sums, counts, hits, slots = jax.vmap(
      lambda a, c, u, s: _term_sums(a, c, album_ids, cand_ids, margin, mode,
                                    u, s, positives, blocks))(
                                        anchors, cands, uniform, selves)
  rates = jax.lax.stop_gradient(_global_mean(
      hits.astype(sums.dtype), slots, axis_name))
  cross = [j for j, i in enumerate(on) if i < 2]
  active = (jnp.mean(rates[jnp.asarray(cross)]) if cross
            else jnp.zeros((), audio.dtype))
  return _global_mean(sums, counts, axis_name), active


def ranking_loss(audio: jax.Array, text: jax.Array, album_ids: jax.Array, *,
                 margin: float, weights: tuple[float, float, float, float],
                 negatives: str, key: jax.Array | None = None,
                 axis_name: str | None = None,
                 gather_across_devices: bool = False,
                 positives: jax.Array | int | None = None
                 ) -> tuple[jax.Array, dict[str, Any]]:
  """The weighted sum of the four terms (see the module docstring).

  The terms of non-zero weight are one stacked computation (`jax.vmap` over
  the terms of `ranking_term`'s arithmetic): one set of kernels for all of
  them, not one a term, and one collective for their counts.

  Args:
    audio: (B, D) audio embeddings of this device's rows.
    text: (B, D) text embeddings; row i is a review of album_ids[i] and
      audio row i one of its tracks.
    album_ids: (B,) album ids; negative = padding row.
    margin: m (paper: 0.05).
    weights: (l1, l2, l3, l4).
    negatives: `all`, `sampled:K`, `hardest:K` or `hardest:K+sampled:S`.
    key: PRNG key, needed for uniform draws.
    axis_name: the device axis inside pmap / shard_map.
    gather_across_devices: take positives and negatives from the global batch.
    positives: (B, W) each row's positives among the candidates
      (`positive_lists`, numbered as the candidates are), or W, an int:
      the lists made here, from the album ids (`device_positive_lists`; W
      at least the most rows of one album among the candidates). Hinges
      over those pairs only; the same list serves the four terms.

  Returns:
    (loss, {term name: value, and 'active_hinges': the fraction of the
    cross-modal terms' hinges that are active, a diagnostic}).
  """
  mode = NegativeMode.parse(negatives)
  if mode.draws and key is None:
    raise ValueError(f'negatives={negatives} needs a PRNG key.')
  gather = axis_name if gather_across_devices else None
  cand_audio, cand_text = _gather(audio, gather), _gather(text, gather)
  cand_ids = _gather(album_ids, gather)
  offset = 0 if gather is None else (
      jax.lax.axis_index(gather) * audio.shape[0])
  self_index = (offset + jnp.arange(audio.shape[0])).astype(jnp.int32)
  blocks = None
  if mode.draws or isinstance(positives, int):
    # Row i's album is candidate self_index[i]'s, in every term.
    blocks = album_blocks(cand_ids, self_index)
  if isinstance(positives, int):
    positives = device_positive_lists(blocks, album_ids, positives)
  # Every term's draws at once, as one flat vector (then shaped: the same
  # bits as a (4, B, K) draw): each draw of random numbers is a threefry
  # hash written out in the program, and XLA's CPU backend compiles the
  # hash of a multi-dimensional counter slowly. A key per anchor and term
  # (split, then drawn in a vmap), or one (4, B, K) draw, compiles the loss
  # and its gradient several times more slowly than one flat draw (the
  # train benchmark's compile_s; see docs/performance.md).
  draws = (jax.random.uniform(key, (4 * audio.shape[0] * mode.draws,)
                              ).reshape(4, audio.shape[0], mode.draws)
           if mode.draws else None)
  on = [t for t, w in enumerate(weights) if w]
  terms = {name: jnp.zeros((), audio.dtype) for name, *_ in TERMS}
  active = jnp.zeros((), audio.dtype)
  if on:
    values, active = _stacked_terms(
        on, (audio, text, cand_audio, cand_text), album_ids, cand_ids,
        self_index, draws, margin, mode, positives, blocks, axis_name)
    terms.update({TERMS[i][0]: values[j] for j, i in enumerate(on)})
  terms['active_hinges'] = active
  loss = sum(w * terms[name] for (name, *_), w in zip(TERMS, weights))
  return loss, terms


def _positive_mask(ids_a: jax.Array, ids_b: jax.Array) -> jax.Array:
  return (ids_a[:, None] == ids_b[None, :]) & (ids_a[:, None] >= 0) & (
      ids_b[None, :] >= 0)


def infonce_loss(audio: jax.Array, text: jax.Array, album_ids: jax.Array, *,
                 temperature: float, axis_name: str | None = None,
                 gather_across_devices: bool = False) -> jax.Array:
  """Symmetric InfoNCE with many-to-many positives (all same-album rows).

  loss_i = -log(sum_{j in pos(i)} exp(s_ij / t) / sum_{j real} exp(s_ij / t)),
  with s the cosine similarity, averaged over both directions and over the
  anchors that have a positive.

  Args:
    audio, text: (B, D) L2-normalised embeddings; album_ids: (B,).
    temperature: t.
  """
  gather = axis_name if gather_across_devices else None
  cand_text, cand_audio = _gather(text, gather), _gather(audio, gather)
  cand_ids = _gather(album_ids, gather)
  pos = _positive_mask(album_ids, cand_ids)
  real = (cand_ids >= 0)[None, :] & (album_ids >= 0)[:, None]

  def direction(anchors, candidates):
    logits = anchors @ candidates.T / temperature
    all_lse = jax.nn.logsumexp(jnp.where(real, logits, -_BIG), axis=1)
    pos_lse = jax.nn.logsumexp(jnp.where(pos, logits, -_BIG), axis=1)
    has_pos = jnp.any(pos, axis=1)
    per = jnp.where(has_pos, all_lse - pos_lse, 0.0)
    return _global_mean(jnp.sum(per), jnp.sum(has_pos), axis_name)

  return 0.5 * (direction(audio, cand_text) + direction(text, cand_audio))


def sigmoid_loss(audio: jax.Array, text: jax.Array, album_ids: jax.Array, *,
                 temperature: float, bias: float,
                 axis_name: str | None = None,
                 gather_across_devices: bool = False) -> jax.Array:
  """SigLIP-style pairwise sigmoid loss; positives are same-album pairs.

  loss = -mean over real pairs (i, j) of log sigmoid(z_ij (s_ij / t + b)),
  z = +1 for positives, -1 for negatives.
  """
  gather = axis_name if gather_across_devices else None
  cand_text = _gather(text, gather)
  cand_ids = _gather(album_ids, gather)
  pos = _positive_mask(album_ids, cand_ids)
  real = (cand_ids >= 0)[None, :] & (album_ids >= 0)[:, None]
  logits = audio @ cand_text.T / temperature + bias
  z = jnp.where(pos, 1.0, -1.0)
  per = -jax.nn.log_sigmoid(z * logits) * real
  return _global_mean(jnp.sum(per), jnp.sum(real), axis_name)


def _ranking_from_config(audio, text, album_ids, *, config, key, axis_name,
                         gather, positives=None):
  return ranking_loss(audio, text, album_ids, margin=config.margin,
                      weights=tuple(config.weights),
                      negatives=config.negatives, key=key,
                      axis_name=axis_name, gather_across_devices=gather,
                      positives=positives)


def _infonce_from_config(audio, text, album_ids, *, config, key, axis_name,
                         gather, positives=None):
  del key, positives
  return infonce_loss(audio, text, album_ids, temperature=config.temperature,
                      axis_name=axis_name, gather_across_devices=gather), {}


def _sigmoid_from_config(audio, text, album_ids, *, config, key, axis_name,
                         gather, positives=None):
  del key, positives
  return sigmoid_loss(audio, text, album_ids, temperature=config.temperature,
                      bias=config.sigmoid_bias, axis_name=axis_name,
                      gather_across_devices=gather), {}


# config.loss.kind -> fn(audio, text, album_ids, *, config (config.loss), key,
# axis_name, gather, positives=None) -> (loss, {term: value}). A new loss is
# one entry here.
LOSSES = {'ranking': _ranking_from_config,
          'infonce': _infonce_from_config,
          'sigmoid': _sigmoid_from_config}


def check_config(loss_config) -> None:
  """The loss fields that choose from this module: `kind` (a key of
  `LOSSES`) and `negatives` (`NegativeMode`).

  Raises:
    UserError: one line naming the field.
  """
  need_choice('loss.kind', loss_config.kind, LOSSES)
  try:
    NegativeMode.parse(loss_config.negatives)
  except ValueError as e:
    raise UserError(f'config.loss.{e}') from None
