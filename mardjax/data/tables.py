"""In-memory tables of the training data: every track, every review.

Plain numpy (no TensorFlow, no JAX), so that evaluation and serving can hold
and pass them without the input pipeline; `mardjax.data.input_pipeline`
fills them from the TFRecords.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class AudioTable:
  """Every album's tracks, normalised, in one array.

  Attributes:
    descriptors: (num_tracks, A) float32, normalised with the manifest's
      training statistics.
    offsets: (num_albums,) first row of each album (by album_index).
    counts: (num_albums,) tracks per album (0 for albums not loaded).
  """
  descriptors: np.ndarray
  offsets: np.ndarray
  counts: np.ndarray

  @property
  def dim(self) -> int:
    return self.descriptors.shape[1]

  def album_tracks(self, album: int) -> np.ndarray:
    start = self.offsets[album]
    return self.descriptors[start:start + self.counts[album]]

  def album_means(self, per_track: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean over each album's tracks of per-track rows.

    Args:
      per_track: (num_tracks, F) values in table order (e.g. descriptors,
        or track embeddings).

    Returns:
      (albums with tracks (C,), their means (C, F)).
    """
    albums = np.flatnonzero(self.counts > 0)
    sums = np.add.reduceat(per_track, self.offsets[albums], axis=0)
    return albums, sums / self.counts[albums][:, None]

  def sequences(self, albums: np.ndarray, max_tracks: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Albums' tracks in album order for the album LSTM.

    Args:
      albums: (n,) album indices.
      max_tracks: T; an album's tracks beyond its first T are left out.

    Returns:
      ((n, T, A) descriptors, zero past each album's tracks; (n,) counts).
    """
    seq, counts = album_sequences(self.descriptors, self.offsets,
                                  self.counts, albums, max_tracks, np)
    return seq.astype(np.float32), counts.astype(np.int32)


def album_sequences(descriptors, offsets, counts, albums, max_tracks: int,
                    xp=np):
  """The one formula of `AudioTable.sequences`, on the host (`xp=np`) and
  in a jitted step (`xp=jax.numpy`, `train_step.assemble`): albums (n,) ->
  ((n, T, A) descriptors, zero past each album's tracks; (n,) counts)."""
  counts = xp.minimum(counts[albums], max_tracks)
  slot = xp.arange(max_tracks)[None, :]
  valid = slot < counts[:, None]
  rows = xp.where(valid, offsets[albums][:, None] + slot, 0)
  return descriptors[rows] * valid[..., None], counts


@dataclasses.dataclass
class ReviewTable:
  """Training reviews in memory, tokens end to end.

  Attributes:
    tokens: (total tokens,) int32, review i at tokens[offsets[i]:][:lengths[i]].
    offsets: (N,) int64.
    lengths: (N,) int32, at most max_len.
    album: (N,) int32 album_index of each review.
    features: (N, F) float32 pretrained text features, when the records
      hold them (`Manifest.text_features`), else None.
  """
  tokens: np.ndarray
  offsets: np.ndarray
  lengths: np.ndarray
  album: np.ndarray
  features: np.ndarray | None = None

  def __len__(self) -> int:
    return self.lengths.shape[0]

  def token_index(self, rows: np.ndarray, max_len: int = 0) -> np.ndarray:
    """(sum of lengths[rows],) int64: where the real tokens of reviews
    `rows` lie in `tokens`, review after review; with `max_len` > 0 only
    each review's first `max_len`."""
    lengths = self.lengths[rows]
    if max_len:
      lengths = np.minimum(lengths, max_len)
    # A token's index: its review's offset plus its position in the review.
    starts = np.cumsum(lengths, dtype=np.int64) - lengths
    return (np.arange(lengths.sum(dtype=np.int64))
            + np.repeat(self.offsets[rows] - starts, lengths))

  def document_frequency(self, vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64: how many reviews hold each word."""
    review = np.repeat(np.arange(len(self), dtype=np.int64), self.lengths)
    at = self.token_index(np.arange(len(self)))
    pairs = np.unique(review * vocab_size + self.tokens[at])
    return np.bincount(pairs % vocab_size, minlength=vocab_size)


def word_albums(reviews: ReviewTable, row: np.ndarray,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Each distinct (word, album) pair of `reviews`, for the albums `row`
  numbers (>= 0; the others left out).

  Args:
    reviews: the reviews.
    row: (num_albums,) int64 each album's row, -1 for albums left out.
    vocab_size: V.

  Returns:
    ((P,) word ids, (P,) album rows), sorted by album row, then word.
  """
  review = np.repeat(np.arange(len(reviews), dtype=np.int64),
                     reviews.lengths)
  words = reviews.tokens[reviews.token_index(np.arange(len(reviews)))]
  rows = row[reviews.album[review]]
  present = rows >= 0
  pairs = np.unique(rows[present] * vocab_size + words[present])
  return pairs % vocab_size, pairs // vocab_size
