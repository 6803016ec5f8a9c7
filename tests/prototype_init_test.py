"""Starting a linear model from the word prototypes (model.init)."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import test as test_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax import config_check  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax import modes  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.data import tables  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.models import embed  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.train import prototype_init  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tables():
  """Three albums (2, 1 and 0 tracks of 3 descriptors) and four reviews."""
  descriptors = np.array([[1., 0., 2.], [3., 0., 0.], [0., 4., 1.]],
                         np.float32)
  audio = tables.AudioTable(descriptors, offsets=np.array([0, 2, 3]),
                            counts=np.array([2, 1, 0]))
  words = [(0, [2, 3, 3]), (1, [3, 4]), (0, [2]), (2, [5])]
  lengths = np.array([len(w) for _, w in words], np.int32)
  reviews = tables.ReviewTable(
      tokens=np.concatenate([w for _, w in words]).astype(np.int32),
      offsets=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
      lengths=lengths, album=np.array([a for a, _ in words], np.int32))
  return audio, reviews


def test_prototypes_by_hand():
  audio, reviews = _tables()
  proto, albums, directions = prototype_init.prototypes(reviews, audio, 7,
                                                        shrink=1.0)
  # Album means (2, 0, 1) and (0, 4, 1); centred: -+(1, -2, 0).
  a, b = np.array([1., -2., 0.]), np.array([-1., 2., 0.])
  assert list(albums) == [0, 0, 1, 2, 1, 0, 0]  # Word 5: an album without tracks.
  np.testing.assert_allclose(proto[2], a / 2)  # One album, shrunk by 1.
  np.testing.assert_allclose(proto[3], (a + b) / 3)
  np.testing.assert_allclose(proto[4], b / 2)
  assert not proto[[0, 1, 5, 6]].any()
  np.testing.assert_allclose(np.abs(directions[0]), np.abs(a) / np.sqrt(5),
                             atol=1e-12)


def test_the_model_starts_reading_reviews_as_their_prototypes(tiny_records):
  data_dir, manifest = tiny_records
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.model.update(linear=True, init='prototypes', batch_norm=False)
  model = two_branch.from_manifest(config, manifest)
  params = model.init(jax.random.PRNGKey(0), **two_branch.dummy_inputs(
      config, manifest))['params']
  audio = input_pipeline.load_audio_table(manifest)
  reviews, _ = input_pipeline.load_training_reviews(
      manifest, config.data.max_len, 0.0, config.data.split_salt)
  got = prototype_init.initial_params(params, reviews, audio, 1.0)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
      params)
  proto, albums, directions = prototype_init.prototypes(
      reviews, audio, model.vocab_size, 1.0)
  e = config.model.embed_dim
  basis = directions[:e]
  # A track's embedding: its descriptors in the sound's principal directions.
  tracks = embed.audio(model, {'params': got}, audio.descriptors[:5])
  want = audio.descriptors[:5] @ basis.T
  np.testing.assert_allclose(
      tracks, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)
  # A review of words with albums: the normalised mean of their prototypes
  # in those directions; an unused word keeps its random start.
  used = np.flatnonzero(albums > 0)[:4]
  tokens = np.zeros((1, config.data.max_len), np.int32)
  tokens[0, :4] = used
  text = embed.text(model, {'params': got}, tokens, np.array([4], np.int32))
  want = proto[used].mean(0) @ basis.T
  np.testing.assert_allclose(text[0], want / np.linalg.norm(want), atol=1e-5)
  unused = np.flatnonzero(albums == 0)[-1]
  table = 'text_features', 'embed', 'embedding'
  start = params[table[0]][table[1]][table[2]]
  np.testing.assert_array_equal(got[table[0]][table[1]][table[2]][unused],
                                start[unused])


def test_config_check_refuses_what_the_start_cannot_set():
  config = test_config.get_config()
  config.model.init = 'prototypes'
  with pytest.raises(UserError, match='model.init'):
    config_check.validate_common(config)  # Non-linear heads.
  config.model.linear = True
  config_check.validate_common(config)
  config.model.init = 'pca'
  with pytest.raises(UserError, match='model.init'):
    config_check.validate_common(config)


@pytest.mark.slow
def test_training_starts_from_the_prototypes(tiny_corpus_master, tmp_path):
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.model.update(linear=True, init='prototypes')
  config.train.update(num_steps=20, eval_every=10, checkpoint_every=10)
  metrics = modes.run_mode('train', config, str(tmp_path),
                           show_progress=False)
  assert np.isfinite(metrics['recall@10'])
  # Step 0's evaluation reads the prototypes: above chance before training.
  first = metrics['history'][0]
  assert first['step'] == 0 and first['recall@10'] > 0.5
