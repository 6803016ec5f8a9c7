"""tf.data input pipeline: TFRecords -> paired, device-shaped numpy batches.

Training examples are (review, one track of that review's album). Reviews
stream through tf.data (file shuffle, interleave, parse, shuffle, padding,
batching, prefetch); tracks are drawn afterwards from an in-memory table of
every track's normalised descriptors (`AudioTable`, ~0.5 GB at MARD scale),
so each epoch pairs each review with a fresh track.

Neighbourhood sampling (`neighbourhood=True`): reviews are grouped by album
with `group_by_window` into groups of `reviews_per_album` reviews of one album,
groups are shuffled and batched, and each group gets that many distinct tracks
of its album. Every album in a batch then has at least two reviews and two
tracks, so the neighbourhood terms of the loss have in-batch positives. Only
albums with at least two tracks and two training reviews take part.

Determinism: epoch e of seed s is always the same sequence of batches (file
order, shuffles and track draws are seeded by (s, e) and the batch number), so
a position (epoch, batch) is all a checkpoint needs to resume the sequence.
Multi-host: each process keeps the albums with album_index % process_count ==
process_index (whole albums, so groups stay intact).

Batches: {'tokens': (D, b, L) int32, 'lengths': (D, b) int32,
'album': (D, b) int32, 'audio': (D, b, A) float32}, D local devices and b the
per-device batch.
"""

import dataclasses
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf

from mardjax import descriptors as desc_lib
from mardjax import records


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


def _paths(data_dir: str, manifest: dict[str, Any], kind: str,
           split: str) -> list[str]:
  return [os.path.join(data_dir, n) for n in manifest['files'][kind][split]]


def load_audio_table(data_dir: str, manifest: dict[str, Any],
                     splits: tuple[str, ...] = ('train', 'test')
                     ) -> AudioTable:
  """Reads the album records of `splits` into one normalised table."""
  num_albums = manifest['counts']['albums']
  dim = manifest['descriptors']['dim']
  d = manifest['descriptors']
  mean, std = np.asarray(d['mean']), np.asarray(d['std'])
  counts = np.zeros(num_albums, np.int64)
  chunks = {}
  paths = [p for s in splits for p in _paths(data_dir, manifest, 'albums', s)]
  for ex in records.read_numpy(paths, 'album', dim):
    idx = int(ex['album_index'])
    chunks[idx] = desc_lib.normalize(ex['descriptors'], d['transform'], mean,
                                     std)
    counts[idx] = ex['descriptors'].shape[0]
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
  table = np.zeros((int(counts.sum()), dim), np.float32)
  for idx, rows in chunks.items():
    table[offsets[idx]:offsets[idx] + counts[idx]] = rows
  return AudioTable(table, offsets, counts)


def load_reviews(data_dir: str, manifest: dict[str, Any], split: str,
                 max_len: int) -> dict[str, np.ndarray]:
  """All reviews of a split as padded numpy arrays (evaluation, tests).

  Returns:
    {'tokens': (N, max_len) int32, 'lengths': (N,) int32,
     'album': (N,) int32, 'review_id': (N,) object}, in file order.
  """
  tokens, lengths, albums, ids = [], [], [], []
  for ex in records.read_numpy(_paths(data_dir, manifest, 'reviews', split),
                               'review'):
    t = ex['tokens'][:max_len].astype(np.int32)
    tokens.append(np.pad(t, (0, max_len - len(t))))
    lengths.append(len(t))
    albums.append(ex['album_index'])
    ids.append(ex['review_id'].decode())
  return {'tokens': np.stack(tokens) if tokens else np.zeros(
      (0, max_len), np.int32),
          'lengths': np.asarray(lengths, np.int32),
          'album': np.asarray(albums, np.int32),
          'review_id': np.asarray(ids, object)}


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def review_dataset(data_dir: str, manifest: dict[str, Any], audio: AudioTable,
                   *, batch_size: int, max_len: int, seed: int, epoch: int,
                   neighbourhood: bool, reviews_per_album: int,
                   shuffle_buffer: int, process_index: int = 0,
                   process_count: int = 1) -> tf.data.Dataset:
  """One epoch of training reviews as a tf.data pipeline (no audio yet).

  Elements: {'tokens': (G, r, L), 'lengths': (G, r), 'album': (G, r)} with
  r = reviews_per_album and G = batch_size // r under neighbourhood sampling,
  else r = 1 and G = batch_size.
  """
  epoch_seed = _epoch_seed(seed, epoch)
  files = _paths(data_dir, manifest, 'reviews', 'train')
  ds = tf.data.Dataset.from_tensor_slices(files)
  ds = ds.shuffle(len(files), seed=epoch_seed)
  ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(files)),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Parse in blocks of records (vectorized), then back to single reviews.
  ds = ds.batch(256).map(lambda s: records.parse_reviews_batch(s, max_len),
                         num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True).unbatch()
  if process_count > 1:
    ds = ds.filter(lambda ex: ex['album'] % process_count == process_index)
  ds = ds.shuffle(shuffle_buffer, seed=epoch_seed + 1)
  if neighbourhood:
    r = reviews_per_album
    counts = tf.constant(audio.counts, tf.int64)
    ds = ds.filter(lambda ex: tf.gather(counts, ex['album']) >= 2)
    ds = ds.group_by_window(
        key_func=lambda ex: tf.cast(ex['album'], tf.int64),
        reduce_func=lambda _, window: window.batch(r),
        window_size=r)
    ds = ds.filter(lambda g: tf.shape(g['album'])[0] == r)
    ds = ds.shuffle(max(1, shuffle_buffer // r), seed=epoch_seed + 2)
    ds = ds.batch(batch_size // r, drop_remainder=True)
  else:
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(lambda b: {k: v[:, None] for k, v in b.items()})
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def pair_audio(batch: dict[str, np.ndarray], audio: AudioTable, seed: int,
               epoch: int, step: int) -> np.ndarray:
  """Draws the tracks for a batch of review groups.

  Args:
    batch: numpy element of `review_dataset`; batch['album'] is (G, r).
    audio: the track table.
    seed, epoch, step: seed the draw, so a resumed run draws the same tracks.

  Returns:
    (G, r, A) descriptors: each group's r rows get distinct tracks of its
    album when it has at least r tracks (consecutive from a random start).
  """
  rng = np.random.default_rng([seed, epoch, step, 7])
  album = batch['album']
  n = audio.counts[album]  # (G, r)
  start = (rng.random(album.shape[0]) * n[:, 0]).astype(np.int64)
  slot = np.arange(album.shape[1])[None, :]
  rows = audio.offsets[album] + (start[:, None] + slot) % np.maximum(n, 1)
  return audio.descriptors[rows]


def train_batches(data_dir: str, manifest: dict[str, Any], audio: AudioTable,
                  *, batch_size: int, num_devices: int, max_len: int,
                  seed: int, neighbourhood: bool, reviews_per_album: int,
                  shuffle_buffer: int, start_epoch: int = 0,
                  start_batch: int = 0, process_index: int = 0,
                  process_count: int = 1
                  ) -> Iterator[tuple[tuple[int, int], dict[str, np.ndarray]]]:
  """Endless training batches from position (start_epoch, start_batch).

  Yields:
    ((epoch, batch number within the epoch), batch) with arrays shaped
    (num_devices, batch_size // num_devices, ...); batch_size is this
    process's share of the global batch.
  """
  epoch, skip = start_epoch, start_batch
  while True:
    ds = review_dataset(data_dir, manifest, audio, batch_size=batch_size,
                        max_len=max_len, seed=seed, epoch=epoch,
                        neighbourhood=neighbourhood,
                        reviews_per_album=reviews_per_album,
                        shuffle_buffer=shuffle_buffer,
                        process_index=process_index,
                        process_count=process_count)
    produced = 0
    for step, group in enumerate(ds.skip(skip).as_numpy_iterator(), skip):
      produced += 1
      rows = group['album'].shape[0] * group['album'].shape[1]
      batch = {k: v.reshape(rows, *v.shape[2:]) for k, v in group.items()}
      batch['audio'] = pair_audio(group, audio, seed, epoch, step).reshape(
          rows, audio.dim)
      yield (epoch, step), {k: v.reshape(num_devices, -1, *v.shape[1:])
                            for k, v in batch.items()}
    if produced == 0 and skip == 0:
      raise ValueError(
          'An epoch produced no batch: fewer training reviews than '
          f'batch_size={batch_size}' + (
              ' among albums with 2+ tracks and 2+ reviews (neighbourhood '
              'sampling)' if neighbourhood else '') + '.')
    epoch, skip = epoch + 1, 0
