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

Similarities are computed on the device in chunks of queries, so memory stays
(chunk, candidates) whatever the split's size.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

DEFAULT_KS = (1, 5, 10)


@jax.jit
def _review_counts(queries, true_rows, candidates):
  sims = queries @ candidates.T
  true = jnp.take_along_axis(sims, true_rows[:, None], axis=1)
  greater = jnp.sum(sims > true, axis=1)
  tied = jnp.sum(sims == true, axis=1) - 1  # Less the right album itself.
  return greater, tied


@jax.jit
def _album_counts(queries, query_ids, candidates, candidate_ids):
  sims = queries @ candidates.T
  own = query_ids[:, None] == candidate_ids[None, :]
  best = jnp.max(jnp.where(own, sims, -jnp.inf), axis=1, keepdims=True)
  greater = jnp.sum((sims > best) & ~own, axis=1)
  tied = jnp.sum((sims == best) & ~own, axis=1)
  right = jnp.sum((sims == best) & own, axis=1)
  return greater, tied, right


def _chunked(fn, queries: np.ndarray, per_query: tuple[np.ndarray, ...],
             fixed: tuple[np.ndarray, ...], chunk: int) -> list[np.ndarray]:
  """fn over query chunks, the last padded so one shape is compiled."""
  fixed = tuple(jnp.asarray(f) for f in fixed)
  outs = []
  for s in range(0, len(queries), chunk):
    parts = [queries[s:s + chunk]] + [p[s:s + chunk] for p in per_query]
    short = chunk - len(parts[0])
    if short:
      parts = [np.concatenate([p, np.repeat(p[-1:], short, 0)]) for p in parts]
    res = fn(*(jnp.asarray(p) for p in parts), *fixed)
    outs.append([np.asarray(r)[:chunk - short] for r in res])
  if not outs:
    return [np.zeros(0, np.int64) for _ in range(3)]
  return [np.concatenate(col) for col in zip(*outs)]


def review_to_album_counts(queries: np.ndarray, query_albums: np.ndarray,
                           cand_albums: np.ndarray, candidates: np.ndarray,
                           chunk: int = 1024) -> tuple[np.ndarray, ...]:
  """(greater, tied, right) per review query; right is always 1.

  Args:
    queries: (Q, E) review embeddings; query_albums: (Q,) album index.
    cand_albums: (C,) album index of each candidate; candidates: (C, E).
    chunk: queries per device call.
  """
  row_of = {int(a): i for i, a in enumerate(cand_albums)}
  missing = sorted({int(a) for a in query_albums if int(a) not in row_of})
  if missing:
    raise ValueError(f'{len(missing)} query albums have no audio, e.g. '
                     f'{missing[:3]}.')
  true_rows = np.asarray([row_of[int(a)] for a in query_albums], np.int32)
  greater, tied = _chunked(_review_counts, queries.astype(np.float32),
                           (true_rows,), (candidates.astype(np.float32),),
                           chunk)[:2]
  return greater, tied, np.ones_like(greater)


def album_to_review_counts(album_emb: np.ndarray, albums: np.ndarray,
                           review_emb: np.ndarray, review_albums: np.ndarray,
                           chunk: int = 1024) -> tuple[np.ndarray, ...]:
  """(greater, tied, right) per album query against all reviews.

  Args:
    album_emb: (A, E) embeddings of the query albums; albums: (A,) their
      indices, each with at least one review among the candidates.
    review_emb: (N, E) candidate reviews; review_albums: (N,) their albums.
  """
  return tuple(_chunked(_album_counts, album_emb.astype(np.float32),
                        (albums.astype(np.int32),),
                        (review_emb.astype(np.float32),
                         review_albums.astype(np.int32)), chunk))


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
    idx = rng.integers(0, q, (n, q))
    means.append(per_query[idx].mean(axis=1))
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
