"""The generator's own ranking: replayed traits, features, recall."""

import json
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from scipy import stats  # pylint: disable=g-import-not-at-top,wrong-import-position

from mardjax.data import mard_io  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.data import synth  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.data import text as text_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.evaluation import generator_ranking  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_replayed_traits_are_the_corpus_albums(tiny_corpus_master):
  traits = synth.replay_traits(tiny_corpus_master)
  with open(os.path.join(tiny_corpus_master, mard_io.METADATA_FILE)) as f:
    albums = [json.loads(line) for line in f if line.strip()]
  assert traits.amazon_ids == [a['amazon-id'] for a in albums]
  names = list(synth.GENRES)
  assert [names[g] for g in traits.genres] == [a['root-genre']
                                               for a in albums]
  assert list(traits.num_tracks) == [len(a['songs']) for a in albums]
  assert traits.tracks.shape == (len(albums), len(synth.LATENT))
  # Each album's traits sit around its genre's centre (spread 0.7, and
  # its tracks' 0.35 over their number).
  centres = np.array([synth.GENRES[names[g]][0] for g in traits.genres])
  assert np.abs(traits.tracks - centres).mean() < 0.8


def test_replay_draws_the_very_traits_the_generator_drew(tmp_path,
                                                        monkeypatch):
  drawn = []
  draw = synth._track_latents

  def recorded(rng, z_album, num_tracks):
    drawn.append(draw(rng, z_album, num_tracks))
    return drawn[-1]

  monkeypatch.setattr(synth, '_track_latents', recorded)
  out = str(tmp_path / 'mard')
  sizes = synth.SynthSizes(**synth.PRESETS['tiny'])
  synth.generate(out, sizes, seed=3, num_workers=1, show_progress=False,
                 style=synth.Style(single_track=0.3))
  assert len(drawn) == sizes.num_albums
  monkeypatch.setattr(synth, '_track_latents', draw)
  traits = synth.replay_traits(out)
  np.testing.assert_array_equal(traits.tracks,
                                np.stack([z.mean(0) for z in drawn]))
  assert traits.style == synth.Style(single_track=0.3)


def test_a_folder_the_generator_did_not_write_is_refused(tmp_path):
  with pytest.raises(UserError, match='not a complete synthetic corpus'):
    synth.replay_traits(str(tmp_path))


def test_features_by_hand():
  vocab = text_lib.Vocabulary([text_lib.PAD, text_lib.UNK, 'energetic',
                               'mellow', 'jazz', 'great', 'laid', 'back'])
  poles, shares = generator_ranking._word_columns(vocab)
  energy = synth.LATENT.index('energy')
  assert poles[2, energy] == 1 and poles[3, energy] == -1
  # 'laid-back' reads as two words: neither votes ('back' is common).
  assert not poles[[0, 1, 5, 6, 7]].any()
  jazz = list(synth.GENRES).index('Jazz')
  assert shares[4, jazz] == pytest.approx(
      1 / len(synth.genre_words()['Jazz']))
  genre_words = np.flatnonzero(shares.sum(1))
  assert list(genre_words) == [4]
  reviews = {'tokens': np.array([[2, 5, 2, 3, 4, 0], [5, 5, 0, 0, 0, 0]]),
             'lengths': np.array([5, 2])}
  got = generator_ranking._review_features(reviews, poles, genre_words)
  k = len(synth.LATENT)
  want = np.zeros((2, 3 * k + 1))
  want[0, energy], want[0, k + energy] = 2, 1  # High, low votes.
  want[0, 2 * k + energy] = 1.5  # Half a sentence per trait word.
  want[0, 3 * k] = 1  # 'jazz'.
  np.testing.assert_allclose(got, want)
  # An album at the centre of every trait: each pole even odds, each trait
  # as salient as the others.
  genre = np.eye(len(synth.GENRES))[[jazz]]
  album = generator_ranking._album_features(
      np.zeros((1, k)), genre, shares[genre_words], noise=0.6)
  np.testing.assert_allclose(album[0, :2 * k], np.log(0.5))
  np.testing.assert_allclose(album[0, 2 * k:3 * k], np.log(1 / k))
  np.testing.assert_allclose(album[0, 3 * k], np.log(
      (0.85 + 0.15 / len(synth.GENRES)) * shares[4, jazz]))
  # A high trait makes its high pole likely, through both noises.
  high = generator_ranking._album_features(
      np.full((1, k), 0.5), genre, shares[genre_words], noise=0.6)
  s = np.sqrt(0.36 + 0.64 / 12)
  np.testing.assert_allclose(high[0, energy], stats.norm.logcdf(0.5 / s))


def test_the_generator_ranks_its_own_albums(tiny_records, tiny_corpus_master,
                                            monkeypatch):
  data_dir, manifest = tiny_records
  albums = manifest.counts.albums

  def recall5():
    got = list(generator_ranking.recall(data_dir, tiny_corpus_master,
                                        ('dev', 'test'), 400).values())
    assert all(g['num_queries'] > 0 for g in got)
    return np.mean([g['recall@5'] for g in got]), got

  own, got = recall5()
  # Far above chance (5 of the 40 albums).
  assert own > 3 * 5 / albums
  assert all(g['with_genre_label']['recall@5'] > 2 * 5 / albums for g in got)
  # With each album given another album's traits the ranking is lost
  # (the mean over three shufflings: one of a few dozen albums can keep a
  # popular album's place by chance).
  replay = synth.replay_traits
  lost = []
  for seed in range(3):
    def shuffled(mard_dir, seed=seed):
      t = replay(mard_dir)
      order = np.random.default_rng(seed).permutation(len(t.amazon_ids))
      return t._replace(tracks=t.tracks[order], genres=t.genres[order])
    monkeypatch.setattr(synth, 'replay_traits', shuffled)
    lost.append(recall5()[0])
  assert np.mean(lost) < own / 2
