"""Review -> album retrieval: embed, rank exactly, report recall@K.

Candidates are every album with audio (album embedding = the L2-normalised
mean of its tracks' embeddings); queries are the held-out reviews of a split.
For each query the rank of its own album is 1 + the number of albums strictly
closer, computed on the device in chunks of queries so memory stays
(chunk, num_albums) whatever the split size.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mardjax import input_pipeline
from mardjax import models

DEFAULT_KS = (1, 5, 10)


def _batched(fn: Callable[..., np.ndarray], arrays: tuple[np.ndarray, ...],
             batch_size: int) -> np.ndarray:
  """fn over row batches; the last batch is padded to keep one shape."""
  n = arrays[0].shape[0]
  out = []
  for start in range(0, n, batch_size):
    part = [a[start:start + batch_size] for a in arrays]
    short = batch_size - part[0].shape[0]
    if short:
      part = [np.concatenate([p, np.repeat(p[-1:], short, 0)]) for p in part]
    out.append(np.asarray(fn(*part))[:batch_size - short])
  return np.concatenate(out) if out else np.zeros((0,))


def embed_albums(variables: dict[str, Any], model: models.TwoBranch,
                 audio: input_pipeline.AudioTable, batch_size: int = 1024,
                 max_tracks: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Embeds every album that has tracks.

  Track models: the normalised mean of the album's track embeddings. The
  album LSTM: the model's embedding of the album's first `max_tracks`
  tracks (required then).

  Returns:
    (album indices (C,), embeddings (C, E)).
  """
  albums = np.flatnonzero(audio.counts > 0)
  if model.audio_encoder == 'album_lstm':
    if max_tracks < 1:
      raise ValueError('embed_albums: the album LSTM needs max_tracks.')
    embed_seq = jax.jit(lambda s, n: model.apply(variables, audio=s,
                                                 num_tracks=n)['audio'])
    return albums, _batched(
        lambda a: embed_seq(*audio.sequences(a, max_tracks)), (albums,), 256)
  embed = jax.jit(lambda a: model.apply(variables, audio=a)['audio'])
  tracks = _batched(embed, (audio.descriptors,), batch_size)
  sums = np.add.reduceat(tracks, audio.offsets[albums], axis=0)
  means = sums / audio.counts[albums][:, None]
  return albums, means / np.maximum(
      np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def embed_reviews(variables: dict[str, Any], model: models.TwoBranch,
                  reviews: dict[str, np.ndarray], batch_size: int = 512
                  ) -> np.ndarray:
  """(N, E) embeddings of `input_pipeline.load_reviews` output."""
  if model.text_encoder == 'pretrained':
    embed = jax.jit(lambda f: model.apply(variables, text_features=f)['text'])
    return _batched(embed, (reviews['text_features'],), batch_size)
  embed = jax.jit(lambda t, l: model.apply(variables, tokens=t,
                                           lengths=l)['text'])
  return _batched(embed, (reviews['tokens'], reviews['lengths']), batch_size)


@jax.jit
def _ranks_chunk(queries: jax.Array, true_rows: jax.Array,
                 candidates: jax.Array) -> jax.Array:
  """1 + #candidates strictly closer than the true one; queries (q, E)."""
  # Squared distances order the same as distances; unit vectors: 2 - 2 cos.
  sims = queries @ candidates.T
  true_sim = jnp.take_along_axis(sims, true_rows[:, None], axis=1)
  return 1 + jnp.sum(sims > true_sim, axis=1)


def ranks(queries: np.ndarray, query_albums: np.ndarray, cand_albums:
          np.ndarray, candidates: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """Rank of each query's album among the candidates (1 = first).

  Args:
    queries: (Q, E) unit vectors; query_albums: (Q,) album index.
    cand_albums: (C,) album index of each candidate; candidates: (C, E).
    chunk: queries per device call.
  """
  row_of = {int(a): i for i, a in enumerate(cand_albums)}
  missing = [int(a) for a in query_albums if int(a) not in row_of]
  if missing:
    raise ValueError(f'{len(missing)} queries name albums without audio, '
                     f'e.g. {missing[:3]}.')
  true_rows = np.asarray([row_of[int(a)] for a in query_albums], np.int32)
  cands = jnp.asarray(candidates)
  out = []
  for s in range(0, len(queries), chunk):
    q, t = queries[s:s + chunk], true_rows[s:s + chunk]
    short = chunk - len(q)
    if short:  # One compiled shape for every chunk.
      q = np.concatenate([q, np.zeros((short, q.shape[1]), q.dtype)])
      t = np.concatenate([t, np.zeros(short, t.dtype)])
    out.append(np.asarray(_ranks_chunk(jnp.asarray(q), jnp.asarray(t),
                                       cands))[:chunk - short])
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def retrieval_metrics(r: np.ndarray, num_candidates: int,
                      ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
  """recall@K (fractions), median rank, MRR, and random-ranking recall@K."""
  if len(r) == 0:
    raise ValueError('No queries to evaluate.')
  out = {f'recall@{k}': float(np.mean(r <= k)) for k in ks}
  out.update({f'random_recall@{k}': min(1.0, k / num_candidates) for k in ks})
  out['median_rank'] = float(np.median(r))
  out['mrr'] = float(np.mean(1.0 / r))
  out['num_queries'] = int(len(r))
  out['num_candidates'] = int(num_candidates)
  return out


def evaluate(variables: dict[str, Any], model: models.TwoBranch,
             audio: input_pipeline.AudioTable, reviews: dict[str, np.ndarray],
             ks: tuple[int, ...] = DEFAULT_KS,
             max_tracks: int = 0) -> dict[str, float]:
  """Review -> album retrieval metrics of `reviews` against all albums."""
  albums, album_emb = embed_albums(variables, model, audio,
                                   max_tracks=max_tracks)
  review_emb = embed_reviews(variables, model, reviews)
  r = ranks(review_emb, reviews['album'], albums, album_emb)
  return retrieval_metrics(r, len(albums), ks)
