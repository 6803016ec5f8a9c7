"""Starting a linear model where the training data already points
(`model.init='prototypes'`).

A word's prototype is the mean sound of the training albums whose reviews
use it: the mean of those albums' mean track descriptors, less the mean over
all training albums, shrunk towards 0 as a mean of few albums should be
(n / (n + model.prototype_shrink), n albums). With E the embedding size and
P (E, A) the E principal directions of the training albums' mean
descriptors (A of them), the model starts with

    audio head kernel = P^T            (a track's embedding: P x),
    word vector[:E]   = P prototype(w) (the rest 0; words of no training
                                        album keep their random start),
    text head kernel  = [I_E; 0]       (a review: P (mean of its prototypes)),

so before any step a review already ranks the albums by how close their
sound is to the mean sound of its words' albums, in the principal
directions of the sound. Training then moves every parameter as usual. The
prototypes need no learning, so where a catalogue has few reviews per album
(most of MARD's albums have one) they carry what a randomly started model
has too few steps to learn.

Needs the linear heads over mean-pooled words and track descriptors, and an
embedding no wider than the word vectors (`check_config`).
"""

from typing import Any

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mardjax.data import tables
from mardjax.errors import need

INITS = ('random', 'prototypes')


def check_config(config: ml_collections.ConfigDict) -> None:
  """The prototype start needs a linear text head over mean-pooled words,
  a linear track head, and embed_dim <= word_dim.

  Raises:
    UserError: one line naming the field.
  """
  m = config.model
  need(m.init in INITS, 'model.init', m.init, f'one of {INITS}')
  need(float(m.prototype_shrink) >= 0, 'model.prototype_shrink',
       m.prototype_shrink, 'a number >= 0 (albums a prototype is shrunk by)')
  if m.init != 'prototypes':
    return
  need(m.linear and m.text_encoder == 'mean' and m.pooling == 'mean' and
       m.audio_encoder == 'track', 'model.init', m.init,
       "the prototype start sets linear heads over mean-pooled words and "
       "track descriptors (model.linear=True, text_encoder='mean', "
       "pooling='mean', audio_encoder='track'); use 'random' for this model")
  need(m.embed_dim <= m.word_dim, 'model.init', m.init,
       f'the prototype start needs model.embed_dim ({m.embed_dim}) <= '
       f'model.word_dim ({m.word_dim})')


def prototypes(reviews: tables.ReviewTable, audio: tables.AudioTable,
               vocab_size: int, shrink: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each word's shrunk prototype and the sound's principal directions.

  Args:
    reviews: the reviews the model trains on.
    audio: every album's tracks ((T, A) normalised descriptors).
    vocab_size: V.
    shrink: prototypes are sums over n albums divided by n + shrink.

  Returns:
    ((V, A) prototypes, 0 for words of no training album with tracks;
    (V,) int64 those albums per word; (min(A, albums), A) principal
    directions of the albums' mean descriptors, largest first).
  """
  with_tracks, means = audio.album_means(audio.descriptors)
  keep = np.isin(with_tracks, np.unique(reviews.album))
  x = means[keep].astype(np.float64)
  proto = np.zeros((vocab_size, x.shape[1]))
  albums = np.zeros(vocab_size, np.int64)
  if not len(x):
    return proto, albums, np.zeros((0, x.shape[1]))
  x -= x.mean(0)
  row = np.full(audio.counts.shape[0], -1, np.int64)
  row[with_tracks[keep]] = np.arange(len(x))
  word, album_row = tables.word_albums(reviews, row, vocab_size)
  albums = np.bincount(word, minlength=vocab_size).astype(np.int64)
  np.add.at(proto, word, x[album_row])
  proto /= (albums + shrink)[:, None] + (albums == 0)[:, None]
  _, _, directions = np.linalg.svd(x, full_matrices=False)
  return proto, albums, directions


def initial_params(params: Any, reviews: tables.ReviewTable,
                   audio: tables.AudioTable, shrink: float) -> Any:
  """`params` of a linear mean-encoder track model, started from the
  prototypes (module docstring). Word vectors keep the mean row norm of
  their random start, so the table's learning rate acts on it as on a
  random start.

  Args:
    params: the model's freshly initialised parameters.
    reviews, audio, shrink: as `prototypes` reads them.

  Returns:
    The parameters, the same structure and dtypes.
  """
  out = flax.core.unfreeze(params)
  table = out['text_features']['embed']['embedding']
  vocab_size, word_dim = table.shape
  kernel = out['audio_head']['out']['kernel']  # (A, E)
  embed_dim = kernel.shape[1]
  proto, albums, directions = prototypes(reviews, audio, vocab_size, shrink)
  # Fewer directions than E (few albums): the rest of the basis stays 0.
  basis = np.zeros((embed_dim, kernel.shape[0]))
  basis[:min(embed_dim, len(directions))] = directions[:embed_dim]
  words = np.asarray(table, np.float64).copy()
  used = albums > 0
  if used.any():
    z = proto[used] @ basis.T  # (U, E)
    start = np.linalg.norm(words[used], axis=1).mean()
    words[used] = 0.0
    words[used, :embed_dim] = z * start / max(
        np.linalg.norm(z, axis=1).mean(), 1e-12)
  text = np.zeros(out['text_head']['out']['kernel'].shape)
  text[:embed_dim, :embed_dim] = np.eye(embed_dim)
  out['text_features']['embed']['embedding'] = jnp.asarray(words,
                                                            table.dtype)
  out['text_head']['out']['kernel'] = jnp.asarray(
      text, out['text_head']['out']['kernel'].dtype)
  out['audio_head']['out']['kernel'] = jnp.asarray(basis.T, kernel.dtype)
  return flax.core.freeze(out) if isinstance(params,
                                             flax.core.FrozenDict) else out
