"""The two-branch model: shapes, normalisation, masking, skipping a branch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from mardjax.models import layouts
from mardjax.models import two_branch


def _model(vocab_size=50, **overrides):
  cfg = default.get_config().model
  cfg.update(dict(word_dim=8, hidden_dim=16, embed_dim=4, lstm_dim=6))
  cfg.update(overrides)
  return two_branch.build(cfg, vocab_size=vocab_size)


def _inputs(b=3, length=7, a=5):
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, 50, (b, length)).astype(np.int32)
  lengths = np.array([7, 3, 1][:b], np.int32)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  return rng.normal(size=(b, a)).astype(np.float32), tokens, lengths


@pytest.mark.parametrize('encoder', ['mean', 'lstm'])
@pytest.mark.parametrize('linear,bn', [(False, False), (False, True),
                                       (True, False)])
def test_shapes_and_unit_norm(encoder, linear, bn):
  model = _model(text_encoder=encoder, linear=linear, batch_norm=bn)
  audio, tokens, lengths = _inputs()
  variables = model.init(jax.random.PRNGKey(0), audio=audio, tokens=tokens,
                         lengths=lengths)
  out = model.apply(variables, audio=audio, tokens=tokens, lengths=lengths)
  assert out['audio'].shape == (3, 4) and out['text'].shape == (3, 4)
  for v in out.values():
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
  if bn:
    out, state = model.apply(variables, audio=audio, tokens=tokens,
                             lengths=lengths, train=True,
                             mutable=['batch_stats'])
    assert 'batch_stats' in state


def test_linear_path_adds_a_linear_map_of_the_input():
  head = two_branch.Head(hidden_dim=16, embed_dim=4, linear_path=True)
  x = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
  v = head.init(jax.random.PRNGKey(0), x, train=False)
  p = v['params']
  assert p['skip']['kernel'].shape == (5, 4) and 'bias' not in p['skip']
  hidden = np.maximum(x @ p['hidden']['kernel'] + p['hidden']['bias'], 0)
  want = (hidden @ p['out']['kernel'] + p['out']['bias']
          + x @ p['skip']['kernel'])
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(head.apply(v, x, train=False), want,
                             rtol=1e-5, atol=1e-6)
  # The linear row keeps its one Dense: the path only sits beside the
  # non-linear head.
  linear = two_branch.Head(hidden_dim=16, embed_dim=4, linear=True,
                           linear_path=True)
  assert set(linear.init(jax.random.PRNGKey(0), x, train=False)['params']) == {
      'out'}


@pytest.mark.parametrize('encoder', ['mean', 'lstm'])
def test_padding_does_not_change_the_text_embedding(encoder):
  model = _model(text_encoder=encoder, batch_norm=False)
  audio, tokens, lengths = _inputs()
  variables = model.init(jax.random.PRNGKey(1), tokens=tokens, lengths=lengths)
  base = model.apply(variables, tokens=tokens, lengths=lengths)['text']
  noisy = tokens.copy()
  noisy[1, 3:] = 17  # Garbage past the length: must be ignored.
  longer = np.pad(noisy, ((0, 0), (0, 5)), constant_values=9)
  got = model.apply(variables, tokens=longer, lengths=lengths)['text']
  np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-6)
  assert 'audio' not in model.apply(variables, tokens=tokens, lengths=lengths)


def test_mean_encoder_is_the_masked_mean():
  enc = two_branch.MeanEncoder(vocab_size=10, word_dim=3, lstm_dim=2)
  tokens = jnp.array([[2, 3, 0, 0]])
  v = enc.init(jax.random.PRNGKey(0), tokens, jnp.array([2]))
  table = v['params']['embed']['embedding']
  got = enc.apply(v, tokens, jnp.array([2]))
  np.testing.assert_allclose(got[0], (table[2] + table[3]) / 2, rtol=1e-6)


@pytest.mark.parametrize('weighted', [False, True])
def test_split_bag_of_words_equals_the_whole_product(weighted, monkeypatch):
  """Rows past BAG_SLOTS summed token by token from 'rare_tokens' give the
  (B, U) product's features, with dropped words (`keep`) and IDF weights."""
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 6)
  rng = np.random.default_rng(4)
  b, length, rows = 5, 9, 16
  slots = rng.integers(0, rows, (b, length)).astype(np.int32)
  lengths = np.array([9, 4, 0, 1, 7], np.int32)
  keep = rng.random((b, length)) < 0.7
  table = jnp.asarray(rng.normal(size=(rows, 3 + weighted)), jnp.float32)
  enc = two_branch.MeanEncoder(vocab_size=rows, word_dim=3, weighted=weighted)
  rare = layouts.rare_mask(slots, lengths, np).reshape(-1)
  listed = layouts.rare_tokens(rare, int(rare.sum()) + 3, np)
  whole = enc.apply({}, slots, lengths, table=table, keep=keep)
  split = enc.apply({}, slots, lengths, table=table, keep=keep,
                    rare_tokens=listed)
  np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-6)
  assert 0 < rare.sum() < (np.arange(length) < lengths[:, None]).sum()


@pytest.mark.slow
def test_idf_pooling_is_the_softmax_weighted_mean_of_its_scores():
  """Weights: softmax of the words' scores (the table's last column) over
  the review's real tokens; repeated words count twice; empty reviews give
  zeros; the row-sparse path (a compacted table) agrees."""
  enc = two_branch.MeanEncoder(vocab_size=10, word_dim=3, weighted=True)
  tokens = jnp.array([[2, 3, 3, 0], [0, 0, 0, 0]])
  lengths = jnp.array([3, 0])
  v = enc.init(jax.random.PRNGKey(0), tokens, lengths)
  table = np.asarray(v['params']['embed']['embedding'])
  assert table.shape == (10, 4)
  w = np.exp(table[[2, 3, 3], 3])
  want = (w[:, None] * table[[2, 3, 3], :3]).sum(0) / w.sum()
  got = enc.apply(v, tokens, lengths)
  np.testing.assert_allclose(got[0], want, rtol=1e-5)
  np.testing.assert_array_equal(got[1], 0)
  compact = jnp.asarray(table[[0, 2, 3]])  # Rows 0, 2, 3 -> slots 0, 1, 2.
  slots = jnp.array([[1, 2, 2, 0], [0, 0, 0, 0]])
  np.testing.assert_allclose(enc.apply({}, slots, lengths, table=compact),
                             got, rtol=1e-5, atol=1e-7)
  # Gradients stay finite with an empty review in the batch.
  grads = jax.grad(lambda p: enc.apply({'params': p}, tokens, lengths).sum())(
      v['params'])
  assert np.isfinite(np.asarray(grads['embed']['embedding'])).all()


def test_idf_scores_weight_rare_words_up():
  from mardjax.data import tables  # pylint: disable=g-import-not-at-top
  # Reviews [2, 2, 3], [3], [4, 3] end to end, with a gap after the first.
  reviews = tables.ReviewTable(
      tokens=np.array([2, 2, 3, 9, 3, 4, 3], np.int32),
      offsets=np.array([0, 4, 5]), lengths=np.array([3, 1, 2], np.int32),
      album=np.zeros(3, np.int32))
  df = reviews.document_frequency(6)
  np.testing.assert_array_equal(df, [0, 0, 1, 3, 1, 0])
  # The real tokens of chosen reviews, in their order, skipping the gap.
  np.testing.assert_array_equal(
      reviews.tokens[reviews.token_index(np.array([2, 0]))], [4, 3, 2, 2, 3])
  assert reviews.token_index(np.array([], np.int64)).shape == (0,)
  scores = two_branch.idf_scores(df, 3)
  np.testing.assert_allclose(np.exp(scores[3]), np.log(4 / 4) + 1)
  np.testing.assert_allclose(np.exp(scores[2]), np.log(4 / 2) + 1, rtol=1e-6)
  assert scores[0] > scores[2] > scores[3]


@pytest.mark.slow
def test_audio_only_and_album_lstm():
  model = _model(batch_norm=False)
  audio, tokens, lengths = _inputs()
  variables = model.init(jax.random.PRNGKey(0), audio=audio, tokens=tokens,
                         lengths=lengths)
  out = model.apply(variables, audio=audio)
  assert set(out) == {'audio'}
  album = _model(audio_encoder='album_lstm', batch_norm=False)
  tracks = np.random.default_rng(1).normal(size=(2, 4, 5)).astype(np.float32)
  n = np.array([4, 2], np.int32)
  v = album.init(jax.random.PRNGKey(0), audio=tracks, num_tracks=n)
  e1 = album.apply(v, audio=tracks, num_tracks=n)['audio']
  tracks[1, 2:] = 99.0  # Past num_tracks: ignored.
  e2 = album.apply(v, audio=tracks, num_tracks=n)['audio']
  np.testing.assert_allclose(e1, e2, rtol=1e-5)


def test_pretrained_features_branch():
  model = _model(text_encoder='pretrained', batch_norm=False)
  feats = np.ones((2, 12), np.float32)
  v = model.init(jax.random.PRNGKey(0), text_features=feats)
  assert 'embed' not in str(jax.tree_util.tree_structure(v))
  assert model.apply(v, text_features=feats)['text'].shape == (2, 4)


def test_unknown_encoder_is_rejected():
  cfg = default.get_config().model
  cfg.text_encoder = 'transformer'
  with pytest.raises(ValueError, match=r"text_encoder='transformer': choose "
                     r"from \('mean', 'lstm', 'pretrained'\)"):
    two_branch.build(cfg, 10)


@pytest.mark.parametrize('layout,pooling', [('flat', 'mean'),
                                            ('split', 'mean'),
                                            ('split', 'idf')])
def test_batched_embedding_equals_the_model_applied_directly(layout,
                                                             pooling):
  """embed.reviews (flat or split layout, fixed size, padded last batch)
  and embed.albums (per-track embeddings summed per album on the device)
  give what the model and a numpy mean give on the whole input at once.
  Word ids span both sides of layouts.BAG_SLOTS, so that the split
  layout sums tokens inside and outside its product."""
  from mardjax.data import tables  # pylint: disable=g-import-not-at-top
  from mardjax.models import embed  # pylint: disable=g-import-not-at-top
  vocab = layouts.BAG_SLOTS + 40
  model = _model(vocab, batch_norm=True, pooling=pooling)
  rng = np.random.default_rng(5)
  n, length = 11, 7
  tokens = np.where(rng.random((n, length)) < 0.5,
                    rng.integers(2, 30, (n, length)),
                    rng.integers(layouts.BAG_SLOTS - 5, vocab,
                                 (n, length))).astype(np.int32)
  lengths = rng.integers(0, length + 1, n).astype(np.int32)
  lengths[3] = 0  # An empty review.
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  counts = np.array([2, 0, 1, 3, 1])  # Album 1 has no tracks.
  audio = tables.AudioTable(rng.normal(size=(7, 5)).astype(np.float32),
                            np.concatenate([[0], np.cumsum(counts)[:-1]]),
                            counts)
  variables = model.init(jax.random.PRNGKey(0), audio=audio.descriptors,
                         tokens=tokens, lengths=lengths)
  want = model.apply(variables, tokens=tokens, lengths=lengths)['text']
  got = embed.reviews(variables, model, {'tokens': tokens,
                                         'lengths': lengths}, batch_size=4,
                      layout=layout)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  rare = layouts.rare_mask(tokens, lengths, np)
  assert 0 < rare.sum() < (np.arange(length) < lengths[:, None]).sum()
  with pytest.raises(ValueError, match="layout 'padded'"):
    embed.reviews(variables, model, {'tokens': tokens, 'lengths': lengths},
                  layout='padded')
  per_track = np.asarray(model.apply(variables, audio=audio.descriptors)[
      'audio'])
  ids, means = audio.album_means(per_track)
  ids_got, got = embed.albums(variables, model, audio, batch_size=3)
  np.testing.assert_array_equal(ids_got, [0, 2, 3, 4])
  np.testing.assert_array_equal(ids, ids_got)
  np.testing.assert_allclose(
      got, means / np.linalg.norm(means, axis=1, keepdims=True),
      rtol=1e-5, atol=1e-6)
