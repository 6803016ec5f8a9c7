"""Input pipeline: TFRecords -> paired, device-shaped numpy batches.

Training examples are (review, one track of that review's album).

* Reading: tf.data reads this process's review records once per run
  (interleaved TFRecord files, vectorized parsing in blocks, prefetch) into
  an in-memory `tables.ReviewTable`: every review's tokens end to end (4 bytes a
  token: about 100 MB at MARD scale) with offsets, lengths and albums.
  Tracks live in an `tables.AudioTable` (every track's normalised descriptors).
* Each epoch is then an index computation in numpy (`epoch_order`): a seeded
  permutation of the reviews, grouped and batched, and each batch is a
  gather from the tables (`make_batch`), with a fresh track per review.
  Shuffling and grouping per element inside tf.data (shuffle buffer,
  group_by_window) pays an overhead per element and cannot reach the
  pipeline's target (10x what the train step consumes; the pipeline
  benchmark, see docs/performance.md); as index arithmetic the same work is
  a few vectorised passes per epoch, and the shuffle is a full permutation
  rather than a buffer's approximation.

Neighbourhood sampling (`neighbourhood=True`): each album's reviews are
split, in random order, into groups of `reviews_per_album`; groups are
shuffled and batched, and each group gets that many distinct tracks of its
album where it has them (an album with fewer tracks repeats them: MARD's
original release has one track per album). Every album in a batch then has
at least two reviews, and two tracks where it has two, so the
neighbourhood terms of the loss have in-batch positives. With `fill`
(`train.fill_groups`) every album with a track takes part with all its
reviews: an album's last group is completed with its first reviews of the
epoch, so a single-review album (most of MARD's) trains as a group of that
review twice. Without it, albums with a track and at least two training
reviews take part, and an album's reviews beyond a multiple of the group
size sit out that epoch (a different random subset each epoch).

Determinism: epoch e of seed s is always the same sequence of batches (its
order and track draws are seeded by (s, e) and the batch number), so a
position (epoch, batch) is all a checkpoint needs to resume the sequence.
Multi-host: each process keeps the albums with album_index % process_count ==
process_index (whole albums, so groups stay intact).

Batches: {'tokens': (D, b, L) int32, 'lengths': (D, b) int32,
'album': (D, b) int32, 'audio': (D, b, A) float32}, D local devices and b the
per-device batch.
"""

from typing import Iterator

import numpy as np

from mardjax.data import descriptors as desc_lib
from mardjax.data import manifest as manifest_lib
from mardjax.data import splits
from mardjax.data import tables


def _records():
  """The TFRecord readers, imported when records are read: batching and the
  epoch order need no TensorFlow (a GPU machine may not have it)."""
  from mardjax.data import records  # pylint: disable=g-import-not-at-top
  return records


def load_audio_table(manifest: manifest_lib.Manifest,
                     splits: tuple[str, ...] = ('train', 'test')
                     ) -> tables.AudioTable:
  """Reads the album records of `splits` into one normalised table."""
  num_albums = manifest.counts.albums
  d = manifest.descriptors
  dim = d.dim
  counts = np.zeros(num_albums, np.int64)
  chunks = {}
  paths = [p for s in splits for p in manifest.paths('albums', s)]
  for ex in _records().read_numpy(paths, 'album', dim):
    idx = int(ex['album_index'])
    chunks[idx] = desc_lib.normalize(ex['descriptors'], d.transform, d.mean,
                                     d.std)
    counts[idx] = ex['descriptors'].shape[0]
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  table = np.zeros((int(counts.sum()), dim), np.float32)
  for idx, rows in chunks.items():
    table[offsets[idx]:offsets[idx] + counts[idx]] = rows
  return tables.AudioTable(table, offsets, counts)


def load_reviews(manifest: manifest_lib.Manifest, split: str,
                 max_len: int) -> dict[str, np.ndarray]:
  """All reviews of a split as padded numpy arrays (evaluation, tests).

  Returns:
    {'tokens': (N, max_len) int32, 'lengths': (N,) int32,
     'album': (N,) int32, 'review_id': (N,) object}, in file order, and
    'text_features' (N, F) float32 when the records hold them.
  """
  feature_dim = manifest.feature_dim
  tokens, lengths, albums, ids, features = [], [], [], [], []
  for ex in _records().read_numpy(manifest.paths('reviews', split),
                               'review'):
    t = ex['tokens'][:max_len].astype(np.int32)
    tokens.append(np.pad(t, (0, max_len - len(t))))
    lengths.append(len(t))
    albums.append(ex['album_index'])
    ids.append(ex['review_id'].decode())
    features.append(ex['text_features'])
  out = {'tokens': np.stack(tokens) if tokens else np.zeros(
      (0, max_len), np.int32),
         'lengths': np.asarray(lengths, np.int32),
         'album': np.asarray(albums, np.int32),
         'review_id': np.asarray(ids, object)}
  if feature_dim:
    out['text_features'] = (np.stack(features).astype(np.float32) if features
                            else np.zeros((0, feature_dim), np.float32))
  return out


def _review_blocks(manifest: manifest_lib.Manifest, split: str,
                   max_len: int) -> Iterator[dict[str, np.ndarray]]:
  """A split's reviews in blocks of up to 1,024, parsed by tf.data
  (`records.parse_reviews_batch`), in file order."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  records = _records()
  files = manifest.paths('reviews', split)
  if not files:
    return
  feature_dim = manifest.feature_dim
  ds = tf.data.Dataset.from_tensor_slices(files)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(1024).map(
      records.no_autograph(
          lambda s: records.parse_reviews_batch(s, max_len, feature_dim)),
      num_parallel_calls=tf.data.AUTOTUNE,
      deterministic=True).prefetch(tf.data.AUTOTUNE)
  yield from ds.as_numpy_iterator()


def load_review_table(manifest: manifest_lib.Manifest, max_len: int,
                      split: str = 'train', process_index: int = 0,
                      process_count: int = 1) -> tables.ReviewTable:
  """Reads a split's reviews of this process's albums through tf.data."""
  return _read_reviews(manifest, split, max_len, process_index,
                       process_count, 0.0, '')[0]


def load_training_reviews(manifest: manifest_lib.Manifest, max_len: int,
                          fraction: float, salt: str, process_index: int = 0,
                          process_count: int = 1
                          ) -> tuple[tables.ReviewTable,
                                     dict[str, np.ndarray]]:
  """The training reviews of this process's albums less those held out for
  model selection (`splits.in_validation`), and the held-out ones of every
  process, as `load_reviews` gives a split: one pass over the records."""
  return _read_reviews(manifest, 'train', max_len, process_index,
                       process_count, fraction, salt)


def _read_reviews(manifest: manifest_lib.Manifest, split: str, max_len: int,
                  process_index: int, process_count: int, fraction: float,
                  salt: str
                  ) -> tuple[tables.ReviewTable, dict[str, np.ndarray]]:
  """(this process's table of the split's reviews not held out, the
  held-out reviews of every process as padded arrays)."""
  feature_dim = manifest.feature_dim
  tokens, lengths, album, features = [], [], [], []
  parts = {k: [] for k in ('tokens', 'lengths', 'album', 'review_id')}
  if feature_dim:
    parts['text_features'] = []
  for block in _review_blocks(manifest, split, max_len):
    held = splits.in_validation(block['review_id'], fraction, salt)
    keep = (block['album'] % process_count == process_index) & ~held
    mask = (np.arange(max_len)[None, :] < block['lengths'][keep][:, None])
    tokens.append(block['tokens'][keep][mask])
    lengths.append(block['lengths'][keep])
    album.append(block['album'][keep])
    if feature_dim:
      features.append(block['text_features'][keep])
    for k in parts:
      parts[k].append(block[k][held])
  lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
  table = tables.ReviewTable(
      tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
      offsets=offsets.astype(np.int64), lengths=lengths,
      album=np.concatenate(album) if album else np.zeros(0, np.int32),
      features=(np.concatenate(features) if features else
                np.zeros((0, feature_dim), np.float32)) if feature_dim
      else None)
  empty = {'tokens': np.zeros((0, max_len), np.int32),
           'lengths': np.zeros(0, np.int32), 'album': np.zeros(0, np.int32),
           'review_id': np.zeros(0, object),
           'text_features': np.zeros((0, feature_dim), np.float32)}
  out = {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}
  out['review_id'] = np.asarray([i.decode() for i in out['review_id']],
                                object)
  return table, out


def stable_argsort(keys: np.ndarray) -> np.ndarray:
  """`np.argsort(keys, kind='stable')`, faster for ids in [0, 2**32).

  A stable sort's order is unique, so any stable sort gives the same
  answer. numpy sorts keys of 16 bits or fewer by radix (linear time, a
  pass per byte) and wider ones by merging; wider ids (MARD's 65,566 albums
  need 17 bits) are sorted as two digits, the low one first, each pass
  stable: the low digit holds the bits beyond 16 (one byte's pass when
  they are 8 or fewer), the high one 16 bits. At MARD's size a seventh of
  a merge sort's time, paid at each epoch's order.
  """
  keys = np.asarray(keys)
  if (keys.dtype.kind not in 'iu' or not keys.size or keys.min() < 0
      or keys.max() >= 2**32):
    return np.argsort(keys, kind='stable')
  bits = int(keys.max()).bit_length()
  if bits <= 16:
    return np.argsort(keys.astype(np.uint16), kind='stable')
  keys = keys.astype(np.uint32, copy=False)
  low_bits = bits - 16
  low = np.argsort((keys & ((1 << low_bits) - 1)).astype(
      np.uint8 if low_bits <= 8 else np.uint16), kind='stable')
  high = (keys[low] >> low_bits).astype(np.uint16)
  return low[np.argsort(high, kind='stable')]


def epoch_order(reviews: tables.ReviewTable, audio: tables.AudioTable, *,
                batch_size: int, seed: int, epoch: int, neighbourhood: bool,
                reviews_per_album: int, fill: bool = False) -> np.ndarray:
  """The review indices of every batch of one epoch, (num_batches, batch_size).

  Under neighbourhood sampling each run of `reviews_per_album` consecutive
  entries of a batch row is one album's group. `fill`: every review of an
  album with a track takes part, an album's last group completed with its
  first reviews of the epoch (a single-review album's group repeats that
  review); else an album's reviews beyond whole groups sit out the epoch.
  """
  rng = np.random.default_rng([seed, epoch, 11])
  perm = rng.permutation(len(reviews))
  if not neighbourhood:
    n = len(perm) // batch_size
    return perm[:n * batch_size].reshape(n, batch_size)
  r = reviews_per_album
  if len(audio.counts) and audio.counts.min() < 1:  # Albums without tracks.
    perm = perm[audio.counts[reviews.album[perm]] >= 1]
  # Stable sort by album keeps the random order within each album.
  key = reviews.album[perm]
  by_album = stable_argsort(key)
  order, albums = perm[by_album], key[by_album]
  first = np.flatnonzero(np.r_[True, albums[1:] != albums[:-1]])
  size = np.diff(np.r_[first, len(order)])
  if fill:
    # ceil(size / r) groups per album; slot p of an album reads its review
    # p % size, so the last group wraps around to the album's first ones.
    count = -(-size // r)
    album = np.repeat(np.arange(len(first)), count)
    group = np.arange(len(album)) - np.repeat(np.cumsum(count) - count, count)
    slot = group[:, None] * r + np.arange(r)[None, :]
    groups = order[first[album][:, None] + slot % size[album][:, None]]
  else:
    # Each album's first size // r * r reviews, in whole groups of r.
    keep = np.arange(len(order)) < np.repeat(first + size // r * r, size)
    groups = order[keep].reshape(-1, r)
  # `take` copies whole rows, several times faster than indexing by rows.
  groups = np.take(groups, rng.permutation(len(groups)), axis=0)
  per_batch = batch_size // r
  n = len(groups) // per_batch
  return groups[:n * per_batch].reshape(n, batch_size)


def left_out(reviews: tables.ReviewTable, audio: tables.AudioTable,
             reviews_per_album: int) -> tuple[int, int]:
  """(albums, reviews) that neighbourhood sampling without `fill` never
  trains: the albums with a track and fewer training reviews than a
  group. (Reviews beyond whole groups rotate from epoch to epoch.)"""
  counts = np.bincount(reviews.album, minlength=len(audio.counts))
  counts = counts[:len(audio.counts)][audio.counts >= 1]
  short = (counts >= 1) & (counts < reviews_per_album)
  return int(short.sum()), int(counts[short].sum())


def most_album_rows(reviews: tables.ReviewTable, order: np.ndarray) -> int:
  """The most rows one album holds in any batch of `order` (an
  `epoch_order`, (num_batches, batch_size)): how long the longest list of
  a row's positives gets (`losses.positive_lists`)."""
  if not order.size:
    return 0
  albums = np.sort(reviews.album[order], axis=1).ravel()
  # A run of one album within one batch row.
  starts = np.ones(albums.size, bool)
  starts[1:] = albums[1:] != albums[:-1]
  starts[::order.shape[1]] = True
  return int(np.bincount(np.cumsum(starts) - 1).max())


def make_batch(reviews: tables.ReviewTable, rows: np.ndarray, max_len: int
               ) -> dict[str, np.ndarray]:
  """Padded tokens (b, max_len), lengths (b,), album (b,) of review `rows`."""
  lengths = reviews.lengths[rows]
  # Only the real tokens are read and placed (a fifth of the (b, max_len)
  # positions at MARD's lengths), so the work follows the tokens, not the
  # padding. A token at offsets[row] + i in the table goes to row * max_len + i.
  at = reviews.token_index(rows, max_len)
  tokens = np.zeros((len(rows), max_len), np.int32)
  tokens.reshape(-1)[at - np.repeat(
      reviews.offsets[rows] - np.arange(len(rows)) * max_len,
      np.minimum(lengths, max_len))] = reviews.tokens[at]
  batch = {'tokens': tokens, 'lengths': lengths,
           'album': reviews.album[rows]}
  if reviews.features is not None:
    batch['text_features'] = reviews.features[rows]
  return batch


def pair_tracks(album: np.ndarray, audio: tables.AudioTable, seed: int,
                epoch: int, step: int) -> np.ndarray:
  """Draws the tracks for a batch of review groups.

  Args:
    album: (G, r) album of each review, r reviews of one album per group.
    audio: the track table.
    seed, epoch, step: seed the draw, so a resumed run draws the same tracks.

  Returns:
    (G, r) rows of `audio.descriptors`: each group's r rows get distinct
    tracks of its album when it has at least r tracks (consecutive from a
    random start).
  """
  rng = np.random.default_rng([seed, epoch, step, 7])
  n = audio.counts[album]  # (G, r)
  start = (rng.random(album.shape[0]) * n[:, 0]).astype(np.int64)
  slot = np.arange(album.shape[1])[None, :]
  return audio.offsets[album] + (start[:, None] + slot) % np.maximum(n, 1)


def pair_audio(album: np.ndarray, audio: tables.AudioTable, seed: int,
               epoch: int, step: int) -> np.ndarray:
  """(G, r, A) descriptors of `pair_tracks`' draw."""
  return audio.descriptors[pair_tracks(album, audio, seed, epoch, step)]


def train_indices(reviews: tables.ReviewTable, audio: tables.AudioTable, *,
                  batch_size: int, num_devices: int, seed: int,
                  neighbourhood: bool, reviews_per_album: int,
                  fill: bool = False, start_epoch: int = 0,
                  start_batch: int = 0
                  ) -> Iterator[tuple[tuple[int, int], dict[str, np.ndarray]]]:
  """The batches of `train_batches` as indices into the tables: what a
  step that assembles its batch on the device needs from the host.

  Yields:
    ((epoch, batch number), {'rows': (D, b) review rows of `reviews`,
    'tracks': (D, b) rows of `audio.descriptors`}).

  Raises:
    ValueError: an epoch would hold no batch.
  """
  r = reviews_per_album if neighbourhood else 1
  epoch, skip = start_epoch, start_batch
  while True:
    order = epoch_order(reviews, audio, batch_size=batch_size, seed=seed,
                        epoch=epoch, neighbourhood=neighbourhood,
                        reviews_per_album=r, fill=fill)
    if not len(order):
      raise ValueError(
          'An epoch produced no batch: fewer training reviews than '
          f'batch_size={batch_size}' + (
              ' in groups of reviews_per_album reviews of one album '
              '(neighbourhood sampling)' if neighbourhood else '') + '.')
    for step in range(skip, len(order)):
      rows = order[step]
      tracks = pair_tracks(reviews.album[rows].reshape(-1, r), audio, seed,
                           epoch, step).reshape(-1)
      yield (epoch, step), {'rows': rows.reshape(num_devices, -1),
                            'tracks': tracks.reshape(num_devices, -1)}
    epoch, skip = epoch + 1, 0


def train_batches(reviews: tables.ReviewTable, audio: tables.AudioTable, *,
                  batch_size: int, num_devices: int, max_len: int, seed: int,
                  neighbourhood: bool, reviews_per_album: int,
                  fill: bool = False, start_epoch: int = 0,
                  start_batch: int = 0, album_tracks: int = 0
                  ) -> Iterator[tuple[tuple[int, int], dict[str, np.ndarray]]]:
  """Endless training batches from position (start_epoch, start_batch).

  Args:
    reviews: this process's training reviews (`load_review_table`).
    audio: every album's tracks.
    batch_size: this process's share of the global batch.
    num_devices: local devices; the batch is split over them.
    max_len: padded review length.
    seed: seeds every epoch's order and track draws.
    neighbourhood: neighbourhood sampling (module docstring).
    reviews_per_album: group size under neighbourhood sampling.
    fill: every review takes part (`epoch_order`).
    start_epoch, start_batch: where to start (a checkpoint's position).
    album_tracks: > 0 pairs each review with its album's first
      `album_tracks` tracks (the album LSTM): 'audio' is then (D, b, T, A)
      and 'num_tracks' (D, b) counts them.

  Yields:
    ((epoch, batch number within the epoch), batch) with arrays shaped
    (num_devices, batch_size // num_devices, ...): the host-side gather of
    `train_indices`' rows and tracks.

  Raises:
    ValueError: an epoch would hold no batch.
  """
  for position, index in train_indices(
      reviews, audio, batch_size=batch_size, num_devices=num_devices,
      seed=seed, neighbourhood=neighbourhood,
      reviews_per_album=reviews_per_album, fill=fill,
      start_epoch=start_epoch, start_batch=start_batch):
    batch = make_batch(reviews, index['rows'].reshape(-1), max_len)
    if album_tracks:
      batch['audio'], batch['num_tracks'] = audio.sequences(
          batch['album'], album_tracks)
    else:
      batch['audio'] = audio.descriptors[index['tracks'].reshape(-1)]
    yield position, {k: v.reshape(num_devices, -1, *v.shape[1:])
                     for k, v in batch.items()}
