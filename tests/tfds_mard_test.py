"""The TFDS builder builds offline from a local raw directory."""

import collections

import tensorflow_datasets as tfds

from mardjax.data import preprocess
from mardjax.data import tfds_mard  # pylint: disable=unused-import


def test_tfds_build_matches_preprocessing(tiny_corpus_master, config,
                                          tmp_path):
  download = tfds.download.DownloadConfig(manual_dir=tiny_corpus_master)
  kwargs = dict(data_dir=str(tmp_path / 'tfds'),
                download_and_prepare_kwargs={'download_config': download})
  report = preprocess.preprocess_corpus(
      config, tiny_corpus_master, str(tmp_path / 'pp'), show_progress=False)
  reviews = {s: list(tfds.as_numpy(tfds.load('mard/reviews', split=s,
                                             **kwargs)))
             for s in ('train', 'dev', 'test')}
  # Same parser, same splits as --mode=preprocess.
  assert {s: len(v) for s, v in reviews.items()} == report['reviews']
  ex = reviews['train'][0]
  assert ex['text'] and ex['review_id'].decode().startswith(
      ex['amazon_id'].decode() + '/')
  albums = {s: list(tfds.as_numpy(tfds.load('mard/albums', split=s,
                                            **kwargs)))
            for s in ('train', 'test')}
  assert {s: len(v) for s, v in albums.items()} == report['albums_by_split']
  tracks = sum(a['descriptors'].shape[0] for v in albums.values() for a in v)
  assert tracks == report['tracks']
  assert all(a['descriptors'].shape[1] == 369 for a in albums['train'])
  assert all(len(a['track_mbids']) == a['descriptors'].shape[0]
             for a in albums['train'])
  # Test-split reviews belong to test albums only.
  test_albums = {int(a['album_index']) for a in albums['test']}
  assert {int(r['album_index']) for r in reviews['test']} <= test_albums
  assert not collections.Counter(
      int(r['album_index']) for r in reviews['train']).keys() & test_albums


def test_the_builder_defaults_are_the_data_layers():
  # The data layer's own defaults equal configs/default.py's
  # (preprocess_test.py); the builder starts from them.
  from mardjax.data import ingest  # pylint: disable=g-import-not-at-top
  assert tfds_mard.MardConfig(name='x').data_config() == (
      ingest.default_data_config())
