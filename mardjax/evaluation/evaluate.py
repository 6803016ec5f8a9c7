"""Evaluation: embed albums and held-out reviews, then retrieval metrics.

Candidates are every album with audio (album embedding = the L2-normalised
mean of its tracks' embeddings, or the album LSTM's); queries are the
held-out reviews of a split (`dev`: reviews of training albums held out
review by review; `test`: reviews of albums never seen in training). The
ranking math (exact, chunked, tie-aware, bootstrap CIs) is
`mardjax.evaluation.metrics`.
"""

from typing import Any, Callable

import jax
import numpy as np

from mardjax.data import input_pipeline
from mardjax.evaluation import metrics
from mardjax.models import two_branch

DEFAULT_KS = metrics.DEFAULT_KS


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


def embed_albums(variables: dict[str, Any], model: two_branch.TwoBranch,
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
  albums, means = audio.album_means(tracks)
  return albums, means / np.maximum(
      np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def embed_reviews(variables: dict[str, Any], model: two_branch.TwoBranch,
                  reviews: dict[str, np.ndarray], batch_size: int = 256
                  ) -> np.ndarray:
  """(N, E) embeddings of `input_pipeline.load_reviews` output."""
  if model.text_encoder == 'pretrained':
    embed = jax.jit(lambda f: model.apply(variables, text_features=f)['text'])
    return _batched(embed, (reviews['text_features'],), batch_size)
  embed = jax.jit(lambda t, l: model.apply(variables, tokens=t,
                                           lengths=l)['text'])
  return _batched(embed, (reviews['tokens'], reviews['lengths']), batch_size)


def evaluate(variables: dict[str, Any], model: two_branch.TwoBranch,
             audio: input_pipeline.AudioTable, reviews: dict[str, np.ndarray],
             ks: tuple[int, ...] = DEFAULT_KS, max_tracks: int = 0,
             full: bool = False, genres: np.ndarray | None = None,
             bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Retrieval metrics of held-out `reviews` against every album with audio.

  Args:
    variables, model: the trained model.
    audio: every album's tracks (candidates: albums with at least one).
    reviews: `input_pipeline.load_reviews` output of the split.
    ks: the K of recall@K.
    max_tracks: the album LSTM's tracks per album (0 for track models).
    full: also album -> review, bootstrap CIs and the per-genre breakdown
      (what --mode=eval reports); otherwise review -> album only (the
      training loop's periodic check).
    genres: (num_albums,) root genre of each album (full only).
    bootstrap: resamples for the CIs.
    seed: seeds the bootstrap.

  Returns:
    review -> album 'recall@K', 'random_recall@K', 'median_rank', 'mrr',
    'num_queries', 'num_candidates'; with `full` also 'recall@K_ci95',
    'album_to_review/...' and 'per_genre'.
  """
  if not len(reviews['album']):
    raise ValueError('No held-out reviews to evaluate.')
  albums, album_emb = embed_albums(variables, model, audio,
                                   max_tracks=max_tracks)
  review_emb = embed_reviews(variables, model, reviews)
  out, counts = metrics.report(albums, album_emb, review_emb,
                               reviews['album'], ks, both_directions=full,
                               bootstrap=bootstrap if full else 0, seed=seed)
  if full and genres is not None:
    out['per_genre'] = per_genre(counts, genres[reviews['album']], ks)
  return out


def per_genre(counts: tuple[np.ndarray, ...], query_genres: np.ndarray,
              ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, dict[str, Any]]:
  """review -> album recall@K of the queries of each root genre."""
  out = {}
  for genre in sorted(set(query_genres.tolist())):
    sel = query_genres == genre
    out[genre or '(none)'] = {
        'num_queries': int(sel.sum()),
        **{f'recall@{k}': float(metrics.success_probability(
            *(c[sel] for c in counts), k).mean()) for k in ks}}
  return out
