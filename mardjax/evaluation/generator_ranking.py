"""The generator's own ranking of a synthetic corpus: how far any model that
reads the audio can go.

A synthetic corpus (`mardjax.data.synth`) is drawn from hidden album traits
(`synth.LATENT`): an album's tracks sound as their traits say, and its
reviews describe the traits as each reviewer heard them. Replaying the
generator (`synth.replay_traits`) gives each album's traits as its tracks
carry them, and so the likelihood the generator gives a review's words
about the sound for every candidate album:

* each trait word votes for its pole: P(pole | album) = Phi(+-t / s), t the
  album's trait, s the reviewer's impression noise and the pole's own
  (uniform, width 0.8) noise together;
* a trait sentence is about trait k with probability proportional to
  |t_k| + 0.2 (its salience), about half a sentence per trait word;
* a genre word is drawn from the album's genre 85% of the time, else from
  any genre's words; the album's genre is what its traits say of it (the
  posterior over genres of its mean track traits), since its tracks carry
  nothing else.

Ranking the albums by that likelihood approximates the best ranking a model
reading the audio and the review's words can give (names, titles and the
rest carry nothing about an album a model has not trained on). Beside it,
`with_genre_label` ranks with each album's true genre, which its tracks do
not carry: what metadata would add. Both are scored by the evaluation's own
tie-aware metrics (`metrics.report`): a review with no word about the sound
ties every album and counts as chance, not as a hit.

The scores are a dot product of review features (word counts per pole,
trait and genre word) with album features (log-probabilities), so they go
through the same ranking code as the models' embeddings.
"""

from typing import Any

import numpy as np
from scipy import stats

from mardjax.data import input_pipeline
from mardjax.data import manifest as manifest_lib
from mardjax.data import synth
from mardjax.data import text as text_lib
from mardjax.evaluation import metrics

# The generator's constants (`synth._review_text`, `synth._album`): the
# width of the uniform noise on a trait sentence's pole, the floor of a
# trait's salience, the share of genre sentences naming the album's genre,
# the spread of albums around their genre's centre and of tracks around
# their album.
_POLE_NOISE_WIDTH = 0.8
_SALIENCE_FLOOR = 0.2
_OWN_GENRE = 0.85
_ALBUM_SPREAD = 0.7
_TRACK_SPREAD = 0.35
# Trait words per trait sentence, about two: each carries half its salience.
_SALIENCE_PER_WORD = 0.5


def _word_ids(vocab: text_lib.Vocabulary, words: list[str]) -> list[int]:
  """The ids of `words` the vocabulary knows as one token ('laid-back'
  reads as two common words and is left out)."""
  ids = [vocab.encode([w], 1)[0][0] for w in words
         if len(text_lib.tokenize(w)) == 1]
  return [i for i in ids if i > text_lib.UNK_ID]


def _word_columns(vocab: text_lib.Vocabulary) -> tuple[np.ndarray, ...]:
  """(V, K) signed pole votes of each word (+1 high, -1 low), (V, G) each
  word's share of each genre's words; words that are one token only."""
  v, k = len(vocab.words), len(synth.LATENT)
  poles = np.zeros((v, k))
  for j, trait in enumerate(synth.LATENT):
    low, high = synth.trait_words()[trait]
    for sign, words in ((-1.0, low), (1.0, high)):
      for i in _word_ids(vocab, words):
        poles[i, j] += sign
  genres = synth.genre_words()
  shares = np.zeros((v, len(genres)))
  for g, words in enumerate(genres.values()):
    for i in _word_ids(vocab, words):
      shares[i, g] += 1.0 / len(words)
  return poles, shares


def _genre_posterior(traits: synth.Traits) -> np.ndarray:
  """(num_albums, G) P(genre | the album's mean track traits)."""
  centres = np.array([c for c, _ in synth.GENRES.values()])
  prior = np.array([w for _, w in synth.GENRES.values()], np.float64)
  var = (_ALBUM_SPREAD ** 2 +
         _TRACK_SPREAD ** 2 / np.maximum(traits.num_tracks, 1))[:, None]
  log = (-((traits.tracks[:, None, :] - centres[None]) ** 2).sum(2)
         / (2 * var) + np.log(prior / prior.sum())[None])
  post = np.exp(log - log.max(1, keepdims=True))
  return post / post.sum(1, keepdims=True)


def _album_features(traits: np.ndarray, genre: np.ndarray, shares: np.ndarray,
                    noise: float) -> np.ndarray:
  """(A, 3K + W) log-probabilities: high pole, low pole, salience per trait,
  and each genre word (W of them, the columns `shares` has)."""
  s = np.sqrt(noise ** 2 + _POLE_NOISE_WIDTH ** 2 / 12)
  salience = np.abs(traits) + _SALIENCE_FLOOR
  own = genre * _OWN_GENRE + (1 - _OWN_GENRE) / genre.shape[1]
  return np.concatenate([
      stats.norm.logcdf(traits / s), stats.norm.logcdf(-traits / s),
      np.log(salience / salience.sum(1, keepdims=True)),
      np.log(own @ shares.T)], 1)


def _review_features(reviews: dict[str, np.ndarray], poles: np.ndarray,
                     genre_words: np.ndarray) -> np.ndarray:
  """(N, 3K + W) counts: high-pole and low-pole words per trait, trait
  words per trait (times `_SALIENCE_PER_WORD`), each genre word."""
  tokens, lengths = reviews['tokens'], reviews['lengths']
  mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  votes = poles[tokens] * mask[..., None]  # (N, L, K)
  high, low = (votes > 0).sum(1), (votes < 0).sum(1)
  column = np.full(poles.shape[0], -1)
  column[genre_words] = np.arange(len(genre_words))
  counts = np.zeros((tokens.shape[0], len(genre_words)))
  rows, cols = np.nonzero(mask & (column[tokens] >= 0))
  np.add.at(counts, (rows, column[tokens[rows, cols]]), 1.0)
  return np.concatenate([high, low, _SALIENCE_PER_WORD * (high + low),
                         counts], 1)


def recall(data_dir: str, mard_dir: str, splits: tuple[str, ...],
           max_len: int, ks: tuple[int, ...] = metrics.DEFAULT_KS
           ) -> dict[str, dict[str, Any]]:
  """review -> album recall@K of the generator's ranking on each split (the
  traits replayed and the albums' features formed once for all of them).

  Args:
    data_dir: the corpus's preprocessed records.
    mard_dir: the synthetic corpus they were built from.
    splits: of 'dev', 'test'.
    max_len: words of a review read (as the models read them).
    ks: the K of recall@K.

  Returns:
    {split: {'recall@K': ..., 'with_genre_label': {'recall@K': ...},
    'num_queries': N}}.

  Raises:
    UserError: `mard_dir` is not a corpus this generator wrote.
  """
  traits = synth.replay_traits(mard_dir)
  manifest = manifest_lib.load(data_dir)
  albums = np.flatnonzero(input_pipeline.load_audio_table(manifest).counts)
  # Records index albums in their own order: matched by Amazon id.
  order = {a: i for i, a in enumerate(traits.amazon_ids)}
  ids = {a: m['amazon_id'] for a, m in manifest_lib.read_albums(
      manifest).items()}
  rows = np.array([order[ids[a]] for a in albums])
  poles, shares = _word_columns(manifest_lib.read_vocabulary(manifest))
  genre_words = np.flatnonzero(shares.sum(1))
  readings = {name: _album_features(traits.tracks[rows], genre,
                                    shares[genre_words],
                                    traits.style.impression_noise)
              for name, genre in (
                  ('', _genre_posterior(traits)[rows]),
                  ('with_genre_label',
                   np.eye(len(synth.GENRES))[traits.genres[rows]]))}
  out = {}
  for split in splits:
    reviews = input_pipeline.load_reviews(manifest, split, max_len)
    queries = _review_features(reviews, poles, genre_words)
    got = {'num_queries': int(len(reviews['album']))}
    for name, album_emb in readings.items():
      found, _ = metrics.report(albums, album_emb, queries, reviews['album'],
                                ks, both_directions=False)
      figures = {f'recall@{k}': found[f'recall@{k}'] for k in ks}
      if name:
        got[name] = figures
      else:
        got.update(figures)
    out[split] = got
  return out
