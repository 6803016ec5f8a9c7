"""tf.data pipeline: shapes, pairing, neighbourhood sampling, determinism."""

import itertools
import types

import numpy as np
import pytest

from configs import default
from mardjax.data import input_pipeline
from mardjax.data import tables
from mardjax.train import trainer


@pytest.fixture(scope='module')
def table(tiny_records):
  data_dir, manifest = tiny_records
  return input_pipeline.load_audio_table(manifest)


@pytest.fixture(scope='module')
def reviews(tiny_records):
  data_dir, manifest = tiny_records
  return input_pipeline.load_review_table(manifest, 64)


def _batches(tiny_records, table, n, process_index=0, process_count=1,
             **kw):
  data_dir, manifest = tiny_records
  args = dict(batch_size=16, num_devices=4, max_len=64, seed=0,
              neighbourhood=True, reviews_per_album=2)
  args.update(kw)
  reviews = input_pipeline.load_review_table(
      manifest, args['max_len'], process_index=process_index,
      process_count=process_count)
  it = input_pipeline.train_batches(reviews, table, **args)
  return list(itertools.islice(it, n))


def test_review_table_holds_every_training_review(tiny_records, reviews):
  data_dir, manifest = tiny_records
  assert len(reviews) == manifest.counts.reviews['train']
  loaded = input_pipeline.load_reviews(manifest, 'train', 64)
  # The same reviews (files are interleaved, so compare as sorted lists).
  batch = input_pipeline.make_batch(reviews, np.arange(len(reviews)), 64)
  got = sorted(zip(batch['album'].tolist(), batch['lengths'].tolist(),
                   map(tuple, batch['tokens'].tolist())))
  want = sorted(zip(loaded['album'].tolist(), loaded['lengths'].tolist(),
                    map(tuple, loaded['tokens'].tolist())))
  assert got == want


def test_an_epoch_uses_each_review_at_most_once(tiny_records, table,
                                                reviews):
  for neighbourhood in (False, True):
    order = input_pipeline.epoch_order(
        reviews, table, batch_size=16, seed=0, epoch=3,
        neighbourhood=neighbourhood, reviews_per_album=2)
    flat = order.reshape(-1)
    assert len(np.unique(flat)) == len(flat)
    if not neighbourhood:  # All but the last partial batch.
      assert len(flat) == len(reviews) // 16 * 16
    else:  # Every eligible album's reviews, less an odd one out.
      counts = np.bincount(reviews.album)
      eligible = (counts >= 2) & (table.counts[:len(counts)] >= 1)
      want = int(np.sum(counts[eligible] // 2 * 2))
      assert want - 16 < len(flat) <= want


def test_filled_groups_train_every_review_of_every_album():
  """Albums of 1, 2, 3 and 5 reviews and one without tracks, by hand: with
  `fill` every review of an album with tracks is in the epoch, each group
  is one album's, and a short group repeats its album's reviews; without
  it the single-review album and the odd reviews sit out."""
  album = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4], np.int32)
  reviews = tables.ReviewTable(tokens=np.zeros(1, np.int32),
                               offsets=np.zeros(len(album), np.int64),
                               lengths=np.ones(len(album), np.int32),
                               album=album)
  audio = tables.AudioTable(np.zeros((4, 3), np.float32),
                            np.array([0, 1, 2, 3, 4]),
                            np.array([1, 1, 1, 1, 0]))
  for epoch in range(3):
    kw = dict(batch_size=2, seed=0, epoch=epoch, neighbourhood=True,
              reviews_per_album=2)
    filled = input_pipeline.epoch_order(reviews, audio, fill=True, **kw)
    groups = filled.reshape(-1, 2)
    # ceil(size / 2) groups of albums 0-3; album 4 has no track.
    assert len(groups) == 1 + 1 + 2 + 3
    assert np.all(album[groups[:, 0]] == album[groups[:, 1]])
    assert set(filled.ravel()) == set(range(11))
    np.testing.assert_array_equal(groups[album[groups[:, 0]] == 0], [[0, 0]])
    for a, size in ((1, 2), (2, 3), (3, 5)):
      rows = groups[album[groups[:, 0]] == a].ravel()
      assert len(set(rows)) == size  # Each review, the repeats its own.
    plain = input_pipeline.epoch_order(reviews, audio, **kw)
    assert 0 not in plain and 11 not in plain
    assert len(plain.ravel()) == 2 + 2 + 4
  # Album 0 never trains without `fill`; album 4 has no track to train.
  assert input_pipeline.left_out(reviews, audio, 2) == (1, 1)
  assert input_pipeline.left_out(reviews, audio, 3) == (2, 3)


def test_the_trainers_batch_order_follows_fill_groups():
  """The config's choice reaches the epoch order the trainer draws."""
  config = default.get_config()
  plan = types.SimpleNamespace(processes=1, devices=1)
  assert trainer.batch_order(config, plan)['fill'] is False
  config.train.fill_groups = True
  assert trainer.batch_order(config, plan)['fill'] is True


def test_audio_table_is_normalised_with_training_statistics(tiny_records,
                                                            table):
  _, manifest = tiny_records
  assert table.counts.sum() == manifest.counts.tracks
  train = [i for i in range(len(table.counts))]
  rows = np.concatenate([table.album_tracks(i) for i in train])
  assert rows.shape[1] == 369
  assert abs(float(rows.mean())) < 0.2  # Standardised (train + test rows).


def _raw_tracks(manifest, split):
  """{album_index: (n, dim) raw descriptors} of a split's album records."""
  from mardjax.data import records  # pylint: disable=g-import-not-at-top
  return {int(ex['album_index']): np.asarray(ex['descriptors'], np.float64)
          for ex in records.read_numpy(manifest.paths('albums', split),
                                       'album', manifest.descriptors.dim)}


def test_audio_rows_are_signed_log_standardised_by_hand(tiny_records, table):
  """Each track's row is (signed_log(raw) - mean) / std, with mean and std
  computed here in numpy from the training tracks alone; the training rows
  then have per-feature mean 0 and std 1 (features that vary). A missing
  shift or scale, statistics fitted on the wrong split or a skipped
  transform all change these values (training and serving share the
  function, so only a reference computed outside it can see them)."""
  _, manifest = tiny_records
  d = manifest.descriptors
  assert d.transform == 'signed_log'
  train = _raw_tracks(manifest, 'train')
  test = _raw_tracks(manifest, 'test')
  assert train and test and not set(train) & set(test)
  logged = np.concatenate([np.sign(x) * np.log1p(np.abs(x))
                           for x in train.values()])
  mean = logged.mean(axis=0)
  std = logged.std(axis=0)  # Population std, as the statistics are fitted.
  varies = std > 1e-6
  assert varies.sum() > 300  # The check below covers most features.
  std = np.where(varies, std, 1.0)  # Constant features are not scaled.
  np.testing.assert_allclose(d.mean, mean, rtol=1e-9, atol=1e-9,
                             err_msg='fitted mean != training-track mean')
  np.testing.assert_allclose(d.std, std, rtol=1e-9, atol=1e-9,
                             err_msg='fitted std != training-track std')
  for split, raws in (('train', train), ('test', test)):
    for album, raw in raws.items():
      want = (np.sign(raw) * np.log1p(np.abs(raw)) - mean) / std
      np.testing.assert_allclose(
          table.album_tracks(album), want, rtol=1e-5, atol=1e-5,
          err_msg=f'{split} album {album}: row != (signed_log(raw) - mean) '
          '/ std')
  rows = np.concatenate([table.album_tracks(a) for a in train]).astype(
      np.float64)
  np.testing.assert_allclose(rows.mean(axis=0), 0, atol=1e-4,
                             err_msg='training rows: per-feature mean != 0')
  np.testing.assert_allclose(rows.std(axis=0)[varies], 1, rtol=1e-4,
                             err_msg='training rows: per-feature std != 1')


def test_batch_shapes_and_pairing(tiny_records, table):
  (pos, batch), = _batches(tiny_records, table, 1)
  assert pos == (0, 0)
  assert batch['tokens'].shape == (4, 4, 64)
  assert batch['lengths'].shape == batch['album'].shape == (4, 4)
  assert batch['audio'].shape == (4, 4, 369)
  album = batch['album'].reshape(-1)
  audio = batch['audio'].reshape(-1, 369)
  for a, row in zip(album, audio):
    # Every audio row is a track of that row's album.
    assert np.any(np.all(table.album_tracks(a) == row, axis=1))
  lengths = batch['lengths'].reshape(-1)
  tokens = batch['tokens'].reshape(-1, 64)
  for t, n in zip(tokens, lengths):
    assert n >= 1 and np.all(t[n:] == 0) and np.all(t[:n] > 0)


def test_neighbourhood_batches_have_in_batch_positives(tiny_records, table):
  for _, batch in _batches(tiny_records, table, 6):
    album = batch['album'].reshape(-1, 2)  # Groups of reviews_per_album.
    audio = batch['audio'].reshape(-1, 2, 369)
    assert np.all(album[:, 0] == album[:, 1])
    for a, pair in zip(album[:, 0], audio):
      assert table.counts[a] >= 1
      if table.counts[a] >= 2:  # Two distinct tracks where it has two.
        assert not np.array_equal(pair[0], pair[1])
      else:  # MARD's original release: the album's one track, repeated.
        np.testing.assert_array_equal(pair[0], pair[1])
    # Each device's slice holds whole groups, so positives are local too.
    per_device = batch['album'].reshape(4, -1)
    for row in per_device:
      assert all(np.sum(row == a) >= 2 for a in row)


def test_most_album_rows_counts_within_each_batch(reviews, table):
  """Hand-made album ids, then a real epoch order against a direct count."""
  fake = tables.ReviewTable(tokens=np.zeros(1, np.int32),
                            offsets=np.zeros(6, np.int64),
                            lengths=np.ones(6, np.int32),
                            album=np.array([7, 7, 3, 7, 3, 5], np.int32))
  # Album 7 twice in the first batch; the second's 7 and the first's do not
  # add up across the batches, nor runs across their boundary.
  assert input_pipeline.most_album_rows(fake, np.array([[0, 2, 1],
                                                        [3, 4, 5]])) == 2
  assert input_pipeline.most_album_rows(fake, np.array([[0, 1, 3]])) == 3
  assert input_pipeline.most_album_rows(fake, np.zeros((0, 3), int)) == 0
  order = input_pipeline.epoch_order(reviews, table, batch_size=16, seed=0,
                                     epoch=0, neighbourhood=True,
                                     reviews_per_album=2)
  assert input_pipeline.most_album_rows(reviews, order) == max(
      np.bincount(reviews.album[rows]).max() for rows in order)


def test_plain_sampling_and_determinism(tiny_records, table):
  a = _batches(tiny_records, table, 5, neighbourhood=False)
  b = _batches(tiny_records, table, 5, neighbourhood=False)
  c = _batches(tiny_records, table, 5, neighbourhood=False, seed=1)
  for (pa, x), (pb, y) in zip(a, b):
    assert pa == pb
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x['album'], z['album'])
             for (_, x), (_, z) in zip(a, c))


def test_resuming_at_a_position_continues_the_same_sequence(tiny_records,
                                                            table):
  full = _batches(tiny_records, table, 40)
  epochs = {p[0] for p, _ in full}
  assert len(epochs) > 1  # The run crosses an epoch boundary.
  for cut in (3, 17, 25):
    (epoch, batch_no), _ = full[cut]
    resumed = _batches(tiny_records, table, 40 - cut, start_epoch=epoch,
                       start_batch=batch_no)
    for (p1, x), (p2, y) in zip(full[cut:], resumed):
      assert p1 == p2
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])


def test_process_shards_split_albums(tiny_records, table):
  got = [
      {int(a) for _, b in _batches(tiny_records, table, 3, batch_size=8,
                                   process_index=i, process_count=2)
       for a in b['album'].reshape(-1)}
      for i in range(2)]
  assert got[0] and got[1] and not got[0] & got[1]
  assert all(a % 2 == 0 for a in got[0]) and all(a % 2 == 1 for a in got[1])


def test_too_large_a_batch_is_a_clear_error(tiny_records, table):
  with pytest.raises(ValueError, match='no batch'):
    _batches(tiny_records, table, 1, batch_size=4096)


def test_load_reviews(tiny_records):
  data_dir, manifest = tiny_records
  dev = input_pipeline.load_reviews(manifest, 'dev', 64)
  n = manifest.counts.reviews['dev']
  assert dev['tokens'].shape == (n, 64) and dev['album'].shape == (n,)
  assert np.all(dev['lengths'] > 0)


def test_album_sequences_for_the_album_lstm(tiny_records, table):
  (_, batch), = _batches(tiny_records, table, 1, album_tracks=3)
  assert batch['audio'].shape == (4, 4, 3, 369)
  for a, seq, n in zip(batch['album'].reshape(-1),
                       batch['audio'].reshape(-1, 3, 369),
                       batch['num_tracks'].reshape(-1)):
    tracks = table.album_tracks(a)
    assert n == min(3, len(tracks))
    np.testing.assert_array_equal(seq[:n], tracks[:n])
    assert not np.any(seq[n:])


def test_single_track_albums_take_part_in_neighbourhood_sampling(
    tiny_records):
  """The original MARD release has one track per album."""
  _, manifest = tiny_records
  full = input_pipeline.load_audio_table(manifest)
  # Keep only each album's first track, as the original release does.
  counts = np.minimum(full.counts, 1)
  rows = full.offsets[counts > 0]
  offsets = np.zeros_like(full.offsets)
  offsets[counts > 0] = np.arange(len(rows))
  single = tables.AudioTable(full.descriptors[rows], offsets, counts)
  reviews = input_pipeline.load_review_table(manifest, 64)
  it = input_pipeline.train_batches(
      reviews, single, batch_size=16, num_devices=1, max_len=64, seed=0,
      neighbourhood=True, reviews_per_album=2)
  _, batch = next(it)
  album = batch['album'].reshape(-1, 2)
  audio = batch['audio'].reshape(-1, 2, 369)
  assert np.all(album[:, 0] == album[:, 1])
  np.testing.assert_array_equal(audio[:, 0], audio[:, 1])


@pytest.mark.parametrize('seed,high,n', [(0, 10, 1000), (1, 70_000, 5000),
                                         (2, 2**32 - 1, 3000), (3, 1, 7),
                                         (4, 2**16, 4096)])
def test_stable_argsort_is_numpys_stable_order(seed, high, n):
  """The two-digit radix order equals numpy's stable argsort on ids with
  many repeats, ids across the 16-bit boundary and up to 2**32 - 1, and
  falls back to it for negative, wider, float and empty keys."""
  rng = np.random.default_rng(seed)
  keys = rng.integers(0, high, n, dtype=np.int64).astype(
      np.uint32 if high > 2**31 else np.int32)
  np.testing.assert_array_equal(input_pipeline.stable_argsort(keys),
                                np.argsort(keys, kind='stable'))
  for other in (np.array([3, -1, 3, 0]), np.array([2**40, 1, 2**40]),
                np.array([0.5, 0.25, 0.5]), np.zeros(0, np.int32)):
    np.testing.assert_array_equal(input_pipeline.stable_argsort(other),
                                  np.argsort(other, kind='stable'))
