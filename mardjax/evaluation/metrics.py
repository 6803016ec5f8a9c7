"""Retrieval metrics on embeddings: exact, chunked, tie-aware, with CIs.

Both directions rank by cosine similarity (embeddings are unit vectors, so
this is the Euclidean order too):

* review -> album: each held-out review ranks every candidate album; one
  album is right.
* album -> review: each album with held-out reviews ranks every held-out
  review; any of its own reviews is right.

Ties are resolved by a fair coin, in expectation: a query whose best right
answer has g wrong candidates strictly above it and shares its score with t
wrong and m right candidates (m >= 1, itself included) finds its first right
answer within the top K with probability

    P(K) = 1 - C(t, K - g) / C(t + m, K - g)    for 0 <= K - g <= t,

0 below and 1 above that range. recall@K is the mean of P(K) over queries,
so a model that maps everything to one point scores chance, not 1.0
(rank-by-strict-count would score it perfect). The expected rank of the
first right answer is g + 1 + t / (m + 1); for m = 1 the reciprocal rank's
expectation is (H(g + t + 1) - H(g)) / (t + 1).

Scores are computed on the device in chunks of queries and blocks of
candidates, so memory stays (chunk, block) whatever the split's size.
Scores within TIE_TOLERANCE of the right answer's count as tied.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from mardjax.errors import UserError

DEFAULT_KS = (1, 5, 10)


# Scores closer than this count as a tie: float32 dot products of unit
# vectors carry round-off of this order, and the threshold (the right
# answer's score) is computed apart from the candidate scores.
TIE_TOLERANCE = 1e-5
# Candidates per block: a (chunk, block) score tile is compared and counted
# block by block, instead of a (chunk, all candidates) array written to
# memory and read back: the scores never make that round trip. The size is
# chosen by the eval benchmark at MARD scale; see docs/performance.md.
_BLOCK = 2048


def _count_block(carry, queries, thresholds, query_ids, block, block_ids):
  greater, tied = carry
  sims = queries @ block.T
  other = query_ids[:, None] != block_ids[None, :]
  above = (sims > thresholds[:, None] + TIE_TOLERANCE) & other
  close = (jnp.abs(sims - thresholds[:, None]) <= TIE_TOLERANCE) & other
  # Counted as float32 sums (exact: a block holds far fewer than 2^24
  # candidates): XLA's CPU backend reduces booleans into int32 more slowly
  # than into float32 (the eval benchmark; see docs/performance.md).
  return (greater + jnp.sum(jnp.where(above, 1.0, 0.0), 1).astype(jnp.int32),
          tied + jnp.sum(jnp.where(close, 1.0, 0.0), 1).astype(jnp.int32))


@jax.jit
def _count_chunk(queries, thresholds, query_ids, blocks, block_ids):
  zeros = jnp.zeros(queries.shape[0], jnp.int32)

  def body(carry, blk):
    return _count_block(carry, queries, thresholds, query_ids, *blk), None

  (greater, tied), _ = jax.lax.scan(body, (zeros, zeros), (blocks, block_ids))
  return greater, tied


def count_wrong_above(queries: np.ndarray, thresholds: np.ndarray,
                      query_ids: np.ndarray, candidates: np.ndarray,
                      candidate_ids: np.ndarray, chunk: int = 1024
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Per query: wrong candidates scoring above / tied with its threshold.

  Args:
    queries: (Q, E) unit vectors; thresholds: (Q,) the score of each
      query's best right answer; query_ids: (Q,) an id per query.
    candidates: (C, E); candidate_ids: (C,) (>= 0); a candidate is right
      for a query when the ids match.
    chunk: queries per device call.

  Returns:
    (greater (Q,), tied (Q,)) counts of wrong candidates.
  """
  e = candidates.shape[1]
  block = min(_BLOCK, max(1, len(candidates)))
  pad = (-len(candidates)) % block
  # Padding rows score exactly 0 and are wrong for every query (id -1):
  # counted like the rest, then taken off below.
  blocks = np.concatenate([candidates, np.zeros((pad, e), np.float32)]
                          ).reshape(-1, block, e).astype(np.float32)
  ids = np.concatenate([candidate_ids, np.full(pad, -1)]).reshape(
      -1, block).astype(np.int32)
  blocks, ids = jnp.asarray(blocks), jnp.asarray(ids)
  chunk = min(chunk, max(1, len(queries)))
  greater, tied = [], []
  for s in range(0, len(queries), chunk):
    parts = [queries[s:s + chunk].astype(np.float32),
             thresholds[s:s + chunk].astype(np.float32),
             query_ids[s:s + chunk].astype(np.int32)]
    short = chunk - len(parts[0])
    if short:  # One compiled shape for every chunk.
      parts = [np.concatenate([p, np.repeat(p[-1:], short, 0)]) for p in parts]
    g, t = _count_chunk(*(jnp.asarray(p) for p in parts), blocks, ids)
    greater.append(np.asarray(g)[:chunk - short])
    tied.append(np.asarray(t)[:chunk - short])
  greater = np.concatenate(greater) if greater else np.zeros(0, np.int64)
  tied = np.concatenate(tied) if tied else np.zeros(0, np.int64)
  if pad:
    thr = thresholds.astype(np.float32)
    greater = greater - pad * (0 > thr + TIE_TOLERANCE)
    tied = tied - pad * (np.abs(thr) <= TIE_TOLERANCE)
  return greater.astype(np.int64), tied.astype(np.int64)


def require_finite(name: str, emb: np.ndarray) -> None:
  """Refuses embeddings with NaN or infinite values: they would compare as
  neither greater nor tied and score as hits."""
  bad = int(np.count_nonzero(~np.all(np.isfinite(emb), axis=-1)))
  if bad:
    raise UserError(f'{bad} of {len(emb)} {name} embeddings are not finite '
                    '(NaN or inf): the model diverged or its checkpoint is '
                    'damaged; no score is computed.')


def _require_distinct(name: str, ids: np.ndarray) -> None:
  if len(np.unique(ids)) != len(ids):
    raise ValueError(f'{name}: {len(ids) - len(np.unique(ids))} repeated '
                     'album ids among the candidates.')


def review_to_album_counts(queries: np.ndarray, query_albums: np.ndarray,
                           cand_albums: np.ndarray, candidates: np.ndarray,
                           chunk: int = 1024) -> tuple[np.ndarray, ...]:
  """(greater, tied, right) per review query; right is always 1.

  Args:
    queries: (Q, E) review embeddings; query_albums: (Q,) album index.
    cand_albums: (C,) album index of each candidate, each once;
      candidates: (C, E).
    chunk: queries per device call.

  Raises:
    UserError: non-finite embeddings.
    ValueError: repeated candidate albums, or query albums without audio.
  """
  require_finite('review', queries)
  require_finite('album', candidates)
  _require_distinct('review_to_album_counts', cand_albums)
  # Each query's album among the candidates, by a vectorised binary search:
  # a Python dict lookup per query is interpreter work that grows with the
  # queries, a visible share of an evaluation where the scoring is fast.
  order = np.argsort(cand_albums, kind='stable')
  at = np.minimum(np.searchsorted(cand_albums[order], query_albums),
                  max(len(order) - 1, 0))
  found = (cand_albums[order][at] == query_albums if len(order)
           else np.zeros(len(query_albums), bool))
  if not found.all():
    missing = np.unique(query_albums[~found])
    raise ValueError(f'{len(missing)} query albums have no audio, e.g. '
                     f'{missing[:3].tolist()}.')
  true_rows = order[at].astype(np.int64)
  thresholds = np.einsum('qe,qe->q', queries.astype(np.float32),
                         candidates[true_rows].astype(np.float32))
  greater, tied = count_wrong_above(queries, thresholds, query_albums,
                                    candidates, cand_albums, chunk)
  return greater, tied, np.ones_like(greater)


def album_to_review_counts(album_emb: np.ndarray, albums: np.ndarray,
                           review_emb: np.ndarray, review_albums: np.ndarray,
                           chunk: int = 1024) -> tuple[np.ndarray, ...]:
  """(greater, tied, right) per album query against all reviews.

  Args:
    album_emb: (A, E) embeddings of the query albums; albums: (A,) their
      indices, sorted, each with at least one review among the candidates.
    review_emb: (N, E) candidate reviews; review_albums: (N,) their albums.
  """
  require_finite('album', album_emb)
  require_finite('review', review_emb)
  if np.any(np.diff(albums) <= 0):
    raise ValueError('album_to_review_counts: albums must be sorted, '
                     'without repeats.')
  row = np.minimum(np.searchsorted(albums, review_albums), len(albums) - 1)
  member = albums[row] == review_albums  # Reviews of a query album.
  row = row[member]
  own = np.einsum('ne,ne->n', review_emb[member].astype(np.float32),
                  album_emb[row].astype(np.float32))
  best = np.full(len(albums), -np.inf, np.float32)
  np.maximum.at(best, row, own)
  right = np.bincount(row, weights=own >= best[row] - TIE_TOLERANCE,
                      minlength=len(albums)).astype(np.int64)
  if np.any(right == 0):
    raise ValueError('album_to_review_counts: a query album has no review '
                     'among the candidates.')
  greater, tied = count_wrong_above(album_emb, best, albums, review_emb,
                                    review_albums, chunk)
  return greater, tied, right


def success_probability(greater: np.ndarray, tied: np.ndarray,
                        right: np.ndarray, k: int) -> np.ndarray:
  """P(first right answer within the top k) under random tie-breaking."""
  g, t, m = (np.asarray(x, np.float64) for x in (greater, tied, right))
  j = k - g
  inside = (j >= 0) & (j <= t)
  jj = np.clip(j, 0, t)  # Outside [0, t] the answer is 0 or 1 (below).
  # C(t, j) / C(t + m, j) through log-gamma (stable for large counts).
  log_ratio = (special.gammaln(t + 1) - special.gammaln(t - jj + 1)
               - special.gammaln(t + m + 1) + special.gammaln(t + m - jj + 1))
  p = 1.0 - np.exp(np.where(inside, log_ratio, 0.0))
  return np.where(j > t, 1.0, np.where(j < 0, 0.0, p))


def expected_rank(greater, tied, right) -> np.ndarray:
  return np.asarray(greater) + 1.0 + np.asarray(tied) / (
      np.asarray(right) + 1.0)


def expected_reciprocal_rank(greater, tied) -> np.ndarray:
  """E[1 / rank] for one right answer tied with `tied` wrong ones."""
  g, t = np.asarray(greater, np.float64), np.asarray(tied, np.float64)
  harmonic = lambda n: special.digamma(n + 1) + np.euler_gamma
  return (harmonic(g + t + 1) - harmonic(g)) / (t + 1)


def bootstrap_ci(per_query: np.ndarray, samples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """Percentile bootstrap CI of the mean of each column of (Q, M) values."""
  rng = np.random.default_rng(seed)
  q = per_query.shape[0]
  means = []
  for start in range(0, samples, 100):  # Bounded memory: 100 x Q at a time.
    n = min(100, samples - start)
    # How often each query is drawn in each resample, then weighted means.
    idx = rng.integers(0, q, (n, q)) + q * np.arange(n)[:, None]
    times = np.bincount(idx.ravel(), minlength=n * q).reshape(n, q)
    means.append(times @ per_query / q)
  means = np.concatenate(means)
  tail = (1 - level) / 2 * 100
  return (np.percentile(means, tail, axis=0),
          np.percentile(means, 100 - tail, axis=0))


def summarize(greater: np.ndarray, tied: np.ndarray, right: np.ndarray,
              num_candidates: int, ks: tuple[int, ...] = DEFAULT_KS,
              prefix: str = '', bootstrap: int = 0,
              seed: int = 0) -> dict[str, Any]:
  """recall@K, random recall@K, median rank, MRR (single right answer) and,
  with bootstrap > 0, 95% CIs of recall@K, keys prefixed with `prefix`."""
  if len(greater) == 0:
    raise ValueError('No queries to evaluate.')
  probs = np.stack([success_probability(greater, tied, right, k)
                    for k in ks], 1)
  out: dict[str, Any] = {}
  for i, k in enumerate(ks):
    out[f'{prefix}recall@{k}'] = float(probs[:, i].mean())
  if bootstrap:
    lo, hi = bootstrap_ci(probs, bootstrap, seed)
    for i, k in enumerate(ks):
      out[f'{prefix}recall@{k}_ci95'] = [float(lo[i]), float(hi[i])]
  out[f'{prefix}median_rank'] = float(np.median(expected_rank(greater, tied,
                                                              right)))
  if np.all(np.asarray(right) == 1):
    out[f'{prefix}mrr'] = float(expected_reciprocal_rank(greater,
                                                         tied).mean())
  out[f'{prefix}num_queries'] = int(len(greater))
  out[f'{prefix}num_candidates'] = int(num_candidates)
  return out


def random_recall(right: np.ndarray, num_candidates: int,
                  ks: tuple[int, ...] = DEFAULT_KS) -> dict[int, float]:
  """Expected recall@K of a uniformly random ranking (everything tied)."""
  right = np.asarray(right)
  n = num_candidates
  return {k: float(success_probability(np.zeros_like(right),
                                       n - right, right, k).mean())
          for k in ks}


def report(albums: np.ndarray, album_emb: np.ndarray, review_emb: np.ndarray,
           review_albums: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS,
           both_directions: bool = True, bootstrap: int = 0,
           seed: int = 0) -> tuple[dict[str, Any], tuple[np.ndarray, ...]]:
  """The evaluator's metrics of one set of embeddings.

  Args:
    albums: (C,) sorted album indices of the candidates; album_emb: (C, E).
    review_emb: (N, E) held-out reviews; review_albums: (N,) their albums.
    ks, bootstrap, seed: see `summarize`.
    both_directions: also album -> review ('album_to_review/...').

  Returns:
    (metrics with 'random_recall@K' beside each recall, the review -> album
    (greater, tied, right) counts).
  """
  counts = review_to_album_counts(review_emb, review_albums, albums,
                                  album_emb)
  out = summarize(*counts, len(albums), ks, bootstrap=bootstrap, seed=seed)
  for k, v in random_recall(counts[2], len(albums), ks).items():
    out[f'random_recall@{k}'] = v
  if both_directions:
    query_albums, per_album = np.unique(review_albums, return_counts=True)
    rows = np.searchsorted(albums, query_albums)
    back = album_to_review_counts(album_emb[rows], query_albums, review_emb,
                                  review_albums)
    prefix = 'album_to_review/'
    out.update(summarize(*back, len(review_emb), ks, prefix=prefix,
                         bootstrap=bootstrap, seed=seed + 1))
    # A random ranking finds any of an album's reviews, not only those tied
    # at its best (back[2]).
    for k, v in random_recall(per_album, len(review_emb), ks).items():
      out[f'{prefix}random_recall@{k}'] = v
  return out, counts
