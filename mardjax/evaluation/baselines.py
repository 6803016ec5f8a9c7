"""Baselines on the evaluator's split, features and candidates.

* CCA: regularised canonical correlation analysis, closed form, between an
  album's audio (the mean of its normalised track descriptors) and a review's
  text vector, fitted on training (review, album) pairs; retrieval by cosine
  in the shared space. One row per latent size (`baselines.cca_dims`).
* WSABIE: a linear map of each side into a shared space, trained with the
  WARP loss (a sampled hinge weighted by the estimated rank: Weston et al.),
  in JAX.
* random: the expectation of a random ranking (exact, not simulated).

Text vectors: the mean of GloVe vectors of a review's words when
`baselines.glove_path` names a local GloVe text file, otherwise TF-IDF of
the review's word ids followed by truncated SVD to `baselines.text_dim`
dimensions, both fitted on training reviews only.

Every baseline is fitted on the reviews the model trains on: the training
split less the share `eval.validation_fraction` holds out for the model's
selection, so model and baselines learn from the same reviews. One fit
serves every split evaluated (`baselines_on_splits`).

Every row reports the evaluator's metrics (`mardjax.evaluation.metrics`): review ->
album and album -> review recall@K with their random expectation, median
rank and MRR.
"""

import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from scipy import sparse

from mardjax.data import input_pipeline
from mardjax.evaluation import metrics
from mardjax.data import manifest as manifest_lib
from mardjax.data import splits
from mardjax.data import tables
from mardjax.errors import UserError


# --- Text vectors ----------------------------------------------------------


def _counts_matrix(tokens: np.ndarray, lengths: np.ndarray,
                   vocab_size: int) -> sparse.csr_matrix:
  """(N, V) word counts of padded token rows (padding excluded)."""
  mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  rows = np.broadcast_to(np.arange(tokens.shape[0])[:, None],
                         tokens.shape)[mask]
  return sparse.csr_matrix((np.ones(rows.shape[0], np.float32),
                            (rows, tokens[mask])),
                           shape=(tokens.shape[0], vocab_size))


class TfidfSvd:
  """TF-IDF (fitted on training reviews) then truncated SVD."""

  def __init__(self, vocab_size: int, dim: int, seed: int):
    from sklearn.decomposition import TruncatedSVD  # pylint: disable=g-import-not-at-top
    from sklearn.feature_extraction.text import TfidfTransformer  # pylint: disable=g-import-not-at-top
    self.vocab_size = vocab_size
    self.tfidf = TfidfTransformer(sublinear_tf=True)
    self.svd = TruncatedSVD(dim, algorithm='randomized', random_state=seed)
    self.name = f'tfidf-svd{dim}'

  def fit(self, reviews: dict[str, np.ndarray]) -> 'TfidfSvd':
    counts = _counts_matrix(reviews['tokens'], reviews['lengths'],
                            self.vocab_size)
    dim = min(self.svd.n_components, counts.shape[1] - 1, counts.shape[0] - 1)
    self.svd.n_components = dim
    self.svd.fit(self.tfidf.fit_transform(counts))
    return self

  def __call__(self, reviews: dict[str, np.ndarray]) -> np.ndarray:
    counts = _counts_matrix(reviews['tokens'], reviews['lengths'],
                            self.vocab_size)
    return self.svd.transform(self.tfidf.transform(counts)).astype(np.float32)


class GloveMean:
  """Mean GloVe vector of a review's in-vocabulary words."""

  def __init__(self, path: str, dim: int, words: list[str]):
    self.name = f'glove{dim}'
    index = {w: i for i, w in enumerate(words)}
    self.table = np.zeros((len(words), dim), np.float32)
    self.known = np.zeros(len(words), bool)
    if not os.path.isfile(path):
      raise UserError(f'config.baselines.glove_path={path!r} does not exist.')
    with open(path, encoding='utf-8', errors='replace') as f:
      for line_no, line in enumerate(f, 1):
        parts = line.rstrip('\n').rstrip().split(' ')
        if len(parts) < 2:
          if not line.strip():
            continue
          raise UserError(f'{path}:{line_no}: not a GloVe line '
                          '("word v1 v2 ...").')
        if len(parts) - 1 != dim:
          raise UserError(
              f'{path}:{line_no}: {len(parts) - 1} values, but '
              f'config.baselines.glove_dim={dim}: a GloVe file of another '
              'dimension, or a malformed line.')
        i = index.get(parts[0])
        if i is None:
          continue
        try:
          self.table[i] = np.asarray(parts[1:], np.float32)
        except ValueError:
          raise UserError(f'{path}:{line_no}: a value is not a number.'
                          ) from None
        self.known[i] = True
    if not self.known.any():
      raise UserError(f'{path}: no word of the vocabulary has a vector.')

  def fit(self, reviews) -> 'GloveMean':
    del reviews
    return self

  def __call__(self, reviews: dict[str, np.ndarray]) -> np.ndarray:
    mask = (np.arange(reviews['tokens'].shape[1])[None, :] <
            reviews['lengths'][:, None]) & self.known[reviews['tokens']]
    total = np.einsum('bld,bl->bd', self.table[reviews['tokens']],
                      mask.astype(np.float32))
    return total / np.maximum(mask.sum(1), 1)[:, None]


# --- CCA ---------------------------------------------------------------------


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh(c)
  return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T


class CCA:
  """Regularised CCA, closed form (whiten each side, SVD of the cross term).

  Each covariance gets `reg` times its mean variance added to the diagonal.
  Projections are scaled by the canonical correlations, so directions that
  correlate better weigh more in the cosine.
  """

  def __init__(self, dim: int, reg: float):
    self.dim, self.reg = dim, reg

  def fit(self, x: np.ndarray, y: np.ndarray) -> 'CCA':
    x, y = x.astype(np.float64), y.astype(np.float64)
    self.mx, self.my = x.mean(0), y.mean(0)
    x, y = x - self.mx, y - self.my
    n = x.shape[0]
    cxx, cyy, cxy = x.T @ x / n, y.T @ y / n, x.T @ y / n
    cxx += self.reg * np.trace(cxx) / cxx.shape[0] * np.eye(cxx.shape[0])
    cyy += self.reg * np.trace(cyy) / cyy.shape[0] * np.eye(cyy.shape[0])
    wx, wy = _inv_sqrt(cxx), _inv_sqrt(cyy)
    u, s, vt = np.linalg.svd(wx @ cxy @ wy)
    d = min(self.dim, s.shape[0])
    self.corr = s[:d]
    self.a = wx @ u[:, :d] * s[:d]
    self.b = wy @ vt[:d].T * s[:d]
    return self

  def audio(self, x: np.ndarray) -> np.ndarray:
    return _unit((x - self.mx) @ self.a)

  def text(self, y: np.ndarray) -> np.ndarray:
    return _unit((y - self.my) @ self.b)


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --- WSABIE ------------------------------------------------------------------


def _warp_weight(rank: jax.Array) -> jax.Array:
  """L(r) = sum_{i<=r} 1/i, the WARP rank weight (harmonic number)."""
  return jax.scipy.special.digamma(rank + 1.0) + np.euler_gamma


def warp_loss(params, text, audio_pos, audio_pool, neg_idx, margin: float,
              num_candidates: int) -> jax.Array:
  """WARP loss of a batch of (review text, its album's audio) pairs.

  Args:
    params: {'text': (T, d), 'audio': (A, d)} linear maps.
    text: (B, T) text vectors; audio_pos: (B, A) their albums' audio.
    audio_pool: (C, A) every training album's audio (negatives).
    neg_idx: (B, S) sampled candidate albums, in sampling order.
    margin: hinge margin.
    num_candidates: C, for the rank estimate.

  Each pair's first sampled album that violates the margin stands for all:
  with n trials to find it the rank is estimated as floor((C - 1) / n), and
  its hinge is weighted by L(rank). Pairs with no violator in S draws add 0.
  (Samples of the positive album itself are skipped.)
  """
  t = text @ params['text']
  pos = jnp.sum(t * (audio_pos @ params['audio']), -1)  # (B,)
  # Project the pool once (C x A x d), then gather: cheaper than projecting
  # B x S gathered rows, and no (B, S, A) array.
  neg = jnp.einsum('bd,bsd->bs', t, (audio_pool @ params['audio'])[neg_idx])
  hinge = margin - pos[:, None] + neg  # (B, S)
  violating = hinge > 0
  first = jnp.argmax(violating, axis=1)
  found = jnp.any(violating, axis=1)
  trials = (first + 1).astype(jnp.float32)
  rank = jnp.floor((num_candidates - 1) / trials)
  h = jnp.take_along_axis(hinge, first[:, None], 1)[:, 0]
  weight = jax.lax.stop_gradient(_warp_weight(rank))
  return jnp.mean(jnp.where(found, weight * h, 0.0))


def train_wsabie(text: np.ndarray, pair_album: np.ndarray,
                 album_audio: np.ndarray, cfg: ml_collections.ConfigDict,
                 seed: int) -> dict[str, np.ndarray]:
  """Linear maps trained with WARP; text (N, T), pair_album (N,) rows of
  album_audio (C, A)."""
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  k1, k2 = jax.random.split(key)
  d = cfg.wsabie_dim
  params = {'text': jax.random.normal(k1, (text.shape[1], d)) /
                    math.sqrt(text.shape[1]),
            'audio': jax.random.normal(k2, (album_audio.shape[1], d)) /
                     math.sqrt(album_audio.shape[1])}
  tx = optax.adam(cfg.wsabie_learning_rate)
  opt = tx.init(params)
  pool = jnp.asarray(album_audio)
  c = album_audio.shape[0]

  text_all = jnp.asarray(text)
  albums_all = jnp.asarray(pair_album)

  @jax.jit
  def step(params, opt, rows, neg):
    loss, grads = jax.value_and_grad(warp_loss)(
        params, text_all[rows], pool[albums_all[rows]], pool, neg,
        cfg.wsabie_margin, c)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  b = min(cfg.wsabie_batch, text.shape[0])
  for _ in range(cfg.wsabie_steps):
    rows = rng.integers(0, text.shape[0], b)
    neg = rng.integers(0, c, (b, cfg.wsabie_samples))
    # A draw of the positive album is not a negative: redraw it once, then
    # point any remaining clash at a different album.
    clash = neg == pair_album[rows][:, None]
    neg[clash] = rng.integers(0, c, clash.sum())
    clash = neg == pair_album[rows][:, None]
    neg[clash] = (neg[clash] + 1) % c
    params, opt, _ = step(params, opt, rows, neg)
  return jax.tree_util.tree_map(np.asarray, params)


# --- Runner ------------------------------------------------------------------


def _album_audio(audio: tables.AudioTable
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(albums with tracks (C,), their mean normalised descriptors (C, A))."""
  albums, means = audio.album_means(audio.descriptors)
  return albums, means.astype(np.float32)


def _score(name: str, album_emb: np.ndarray, albums: np.ndarray,
           review_emb: np.ndarray, held_out: dict[str, np.ndarray],
           bootstrap: int = 0, ks=metrics.DEFAULT_KS) -> dict[str, Any]:
  """The evaluator's metrics, with 95% bootstrap CIs of recall@K (the
  evaluator's resampling and seed, so intervals compare row to row)."""
  out, _ = metrics.report(albums, album_emb, review_emb, held_out['album'],
                          ks, bootstrap=bootstrap)
  return {'baseline': name, **out}


def random_row(num_albums: int, held_out: dict[str, np.ndarray],
               ks=metrics.DEFAULT_KS) -> dict[str, Any]:
  """The exact expectation of a random ranking, in the evaluator's keys."""
  n = len(held_out['album'])
  everything = (np.zeros(n, np.int64), np.full(n, num_albums - 1),
                np.ones(n, np.int64))
  out = {'baseline': 'random', **metrics.summarize(*everything, num_albums,
                                                   ks)}
  _, per_album = np.unique(held_out['album'], return_counts=True)
  back = (np.zeros_like(per_album), n - per_album, per_album)
  out.update(metrics.summarize(*back, n, ks, prefix='album_to_review/'))
  return out


def evaluate_baselines(config: ml_collections.ConfigDict, data_dir: str
                       ) -> dict[str, Any]:
  """Every baseline on config.eval.split; returns {'split', 'baselines':
  [rows]}."""
  split = config.eval.split
  return {'split': split,
          'baselines': baselines_on_splits(config, data_dir, (split,))[split]}


def _training_pairs(config: ml_collections.ConfigDict,
                    manifest: manifest_lib.Manifest, row_of: np.ndarray
                    ) -> dict[str, np.ndarray]:
  """The training reviews the model trains on (the split's, less the share
  `eval.validation_fraction` holds out for its model selection) whose
  album has tracks."""
  train = input_pipeline.load_reviews(manifest, 'train', config.data.max_len)
  keep = (row_of[train['album']] >= 0) & ~splits.in_validation(
      train['review_id'], config.eval.validation_fraction,
      config.data.split_salt)
  return {k: v[keep] for k, v in train.items()}


def baselines_on_splits(config: ml_collections.ConfigDict, data_dir: str,
                        split_names: Sequence[str]
                        ) -> dict[str, list[dict[str, Any]]]:
  """Every baseline fitted once, on the reviews the model trains on, and
  evaluated on each split of `split_names`: {split: [rows]}.

  Raises:
    UserError: a split holds no reviews.
  """
  cfg = config.baselines
  manifest = manifest_lib.load(data_dir)
  held = {}
  for split in split_names:
    held[split] = input_pipeline.load_reviews(manifest, split,
                                              config.data.max_len)
    if not len(held[split]['album']):
      raise UserError(f'The {split!r} split holds no held-out reviews.')
  audio = input_pipeline.load_audio_table(manifest)
  albums, album_audio = _album_audio(audio)
  row_of = np.full(manifest.counts.albums, -1)
  row_of[albums] = np.arange(len(albums))
  train = _training_pairs(config, manifest, row_of)
  pair_album = row_of[train['album']]

  start = time.time()
  if cfg.glove_path:
    words = manifest_lib.read_vocabulary(manifest).words
    texter = GloveMean(cfg.glove_path, cfg.glove_dim, words)
  else:
    texter = TfidfSvd(manifest.vocab.size, cfg.text_dim, config.seed)
  texter.fit(train)
  train_text = texter(train)
  held_text = {split: texter(reviews) for split, reviews in held.items()}
  features = {'baseline': 'text features', 'name': texter.name,
              'dim': int(train_text.shape[1]),
              'seconds': round(time.time() - start, 2)}
  # name -> (album embeddings (C, d), text map, fit seconds).
  fitted = {}
  for dim in cfg.cca_dims:
    start = time.time()
    cca = CCA(dim, cfg.cca_reg).fit(album_audio[pair_album], train_text)
    fitted[f'cca-{dim}'] = (cca.audio(album_audio), cca.text,
                            time.time() - start)
  start = time.time()
  params = train_wsabie(train_text, pair_album, album_audio, cfg, config.seed)
  fitted['wsabie'] = (_unit(album_audio @ params['audio']),
                      lambda y: _unit(y @ params['text']), time.time() - start)
  out = {}
  for split, reviews in held.items():
    rows = [dict(features)]
    for name, (album_emb, text_map, fit_s) in fitted.items():
      rows.append(dict(_score(name, album_emb, albums,
                              text_map(held_text[split]), reviews,
                              config.eval.bootstrap),
                       fit_seconds=round(fit_s, 2), text=texter.name))
    rows.append(random_row(len(albums), reviews))
    out[split] = rows
  return out
