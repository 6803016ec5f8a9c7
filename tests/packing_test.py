"""Packed reviews: layout, LSTM features equal to padded, the hand-written
LSTM gradient equal to autodiff's, both directions in one loop equal to a
loop each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from mardjax.models import lstm
from mardjax.models import layouts
from mardjax.models import two_branch
from mardjax.train import packing
from mardjax.train import train_step
from tests import step_helpers


def _reviews(seed, b=9, length=12, vocab=30):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, length + 1, b).astype(np.int32)
  lengths[0] = length  # One full-length review, one empty.
  lengths[1] = 0
  tokens = rng.integers(2, vocab, (b, length)).astype(np.int32)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  return tokens, lengths


def test_pack_places_every_review_once():
  tokens, lengths = _reviews(0)
  out = packing.pack(tokens[None], lengths[None], rows_multiple=2)
  rows = out['tokens'][0]
  assert rows.shape[0] % 2 == 0 or rows.shape[0] == len(lengths)
  assert rows.shape[0] < len(lengths)  # Packing saved rows.
  covered = np.zeros(rows.shape, int)
  for i, n in enumerate(lengths):
    (r0, p0), (r1, p1) = out['first'][0, i], out['last'][0, i]
    assert r0 == r1 and p1 - p0 + 1 == max(n, 1)
    np.testing.assert_array_equal(rows[r0, p0:p0 + n], tokens[i, :n])
    assert out['starts'][0, r0, p0] and out['ends'][0, r1, p1]
    covered[r0, p0:p1 + 1] += 1
  assert covered.max() == 1  # No two reviews share a position.
  assert out['starts'][0].sum() == out['ends'][0].sum() == len(lengths)


def test_a_review_longer_than_a_row_is_an_error():
  with pytest.raises(ValueError, match='longer than the row'):
    packing.assign_rows(np.array([3, 9]), capacity=8)


@pytest.mark.parametrize('reverse', [False, True])
def test_hand_written_lstm_gradient_equals_autodiff(reverse):
  rng = np.random.default_rng(1)
  p, r, h = 7, 3, 4
  proj = jnp.asarray(rng.normal(size=(p, r, 4 * h)).astype(np.float32))
  keep = jnp.asarray((rng.random((p, r, 1)) > 0.3).astype(np.float32))
  wh = jnp.asarray(rng.normal(size=(h, 4 * h)).astype(np.float32))
  weights = jnp.asarray(rng.normal(size=(p, r, h)).astype(np.float32))

  def loss(fn):
    return lambda a, b: jnp.sum(fn(a, keep, b, reverse) * weights)

  np.testing.assert_allclose(loss(lstm.recurrence)(proj, wh),
                             loss(lstm.reference)(proj, wh), rtol=1e-6)
  got = jax.grad(loss(lstm.recurrence), argnums=(0, 1))(proj, wh)
  want = jax.grad(loss(lstm.reference), argnums=(0, 1))(proj, wh)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_both_directions_in_one_loop_equal_a_loop_each():
  """lstm.bidirectional = the two recurrences run alone: hidden states and
  the gradients of the projections and kernels (hand-written backward),
  with resets where each direction's reviews start."""
  rng = np.random.default_rng(2)
  p, r, h = 7, 3, 4
  proj = jnp.asarray(rng.normal(size=(p, r, 2, 4 * h)).astype(np.float32))
  keep_f, keep_b = (jnp.asarray((rng.random((p, r, 1)) > 0.3).astype(
      np.float32)) for _ in range(2))
  wh = jnp.asarray(rng.normal(size=(2, h, 4 * h)).astype(np.float32))
  weights = jnp.asarray(rng.normal(size=(2, p, r, h)).astype(np.float32))

  def one_loop(proj, wh):
    hs = lstm.bidirectional(proj, keep_f, keep_b, wh)  # (P, 2, R, H)
    # Back to time order for both directions.
    return jnp.sum(jnp.stack([hs[:, 0], hs[::-1, 1]]) * weights)

  def a_loop_each(proj, wh):
    return jnp.sum(jnp.stack([
        lstm.reference(proj[:, :, 0], keep_f, wh[0], False),
        lstm.reference(proj[:, :, 1], keep_b, wh[1], True)]) * weights)

  np.testing.assert_allclose(one_loop(proj, wh), a_loop_each(proj, wh),
                             rtol=1e-6)
  got = jax.grad(one_loop, argnums=(0, 1))(proj, wh)
  want = jax.grad(a_loop_each, argnums=(0, 1))(proj, wh)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('loop', ['per_direction', 'bidirectional'])
def test_bilstm_matches_flax_lstm_cells(loop):
  """Same weights in flax's own LSTM cells over each review alone give the
  same features: the packed, hand-differentiated BiLSTM is a standard one,
  whether its directions run a loop each or both in one."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  tokens, lengths = _reviews(4, b=5, length=6)
  enc = two_branch.BiLSTMEncoder(vocab_size=30, word_dim=5, lstm_dim=3,
                                 loop=loop)
  params = enc.init(jax.random.PRNGKey(0), tokens, lengths)
  got = np.asarray(enc.apply(params, tokens, lengths))
  p = params['params']
  emb = np.asarray(p['embed']['embedding'])[tokens]
  cell = nn.LSTMCell(3)
  for i, n in enumerate(np.maximum(lengths, 1)):
    feats = []
    for d, seq in (('fwd', emb[i, :n]), ('bwd', emb[i, :n][::-1])):
      wi, wh, bias = (np.asarray(p[d][k]) for k in ('wi', 'wh', 'bias'))
      # flax's LSTMCell: separate i, f, g, o kernels; ours are concatenated.
      cell_params = {}
      for gate, name in enumerate('ifgo'):
        g = slice(gate * 3, (gate + 1) * 3)
        cell_params[f'i{name}'] = {'kernel': wi[:, g]}
        cell_params[f'h{name}'] = {'kernel': wh[:, g], 'bias': bias[g]}
      carry = cell.initialize_carry(jax.random.PRNGKey(0), (1, 5))
      for x in seq:
        carry, out = cell.apply({'params': cell_params}, carry, x[None])
      feats.append(np.asarray(out)[0])
    np.testing.assert_allclose(got[i], np.concatenate(feats), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize('loop', ['per_direction', 'bidirectional'])
def test_packed_lstm_features_equal_padded(loop):
  tokens, lengths = _reviews(2)
  enc = two_branch.BiLSTMEncoder(vocab_size=30, word_dim=5, lstm_dim=6,
                                 loop=loop)
  params = enc.init(jax.random.PRNGKey(0), tokens, lengths)
  padded = enc.apply(params, tokens, lengths)
  out = packing.pack(tokens[None], lengths[None], rows_multiple=1)
  packed = {k: v[0] for k, v in out.items()}
  got = enc.apply(params, packed['tokens'], None,
                  packed={k: packed[k] for k in ('starts', 'ends', 'first',
                                                 'last')})
  np.testing.assert_allclose(got, padded, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_packed_lazy_step_equals_padded_dense_step():
  """Two training steps: packed rows, the lazy update and both directions
  in one loop give the state of padded rows, the dense update and a loop
  per direction."""
  config = test_config.get_config()
  config.model.text_encoder = 'lstm'
  config.loss.negatives = 'all'
  tokens, lengths = _reviews(3, b=8)
  rng = np.random.default_rng(3)
  batch = {'audio': rng.normal(size=(8, 5)).astype(np.float32),
           'tokens': tokens, 'lengths': lengths,
           'album': np.repeat(np.arange(4), 2).astype(np.int32)}
  results = []
  for update, pack_rows, loop in (('dense', 0, 'per_direction'),
                                  ('lazy', 2, 'bidirectional')):
    config.model.lstm_loop = loop
    model = two_branch.build(config.model, 30)
    config.train.embedding_update = update
    plan = step_helpers.cpu_plan(
        config, text_layout='packed' if pack_rows else 'padded',
        pack_rows=pack_rows, positives='')
    state = train_step.create_state(model, config, plan,
                                    jax.random.PRNGKey(0), batch)
    prepared = train_step.prepare_batch(
        state, {k: v[None] for k, v in batch.items()}, plan, 4)
    if pack_rows:
      assert prepared['slots'].shape[1] < 8  # Really packed.
    prepared = {k: v[0] for k, v in prepared.items()}
    step = step_helpers.host_step(config)
    for _ in range(2):
      state, metrics = step(state, prepared, jax.random.PRNGKey(1))
    results.append((state, metrics))
  (dense, m_dense), (lazy, m_lazy) = results
  np.testing.assert_allclose(m_lazy['loss'], m_dense['loss'], rtol=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(lazy.params),
                  jax.tree_util.tree_leaves(dense.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_flat_review_layout_by_hand():
  lengths = np.asarray([[2, 0, 3], [1, 1, 0]], np.int32)
  out = layouts.flat_review(lengths, bucket=4)
  # Device 0 has 5 real tokens, device 1 two: T = 8 for both; 3 = padding.
  np.testing.assert_array_equal(out, [[0, 0, 2, 2, 2, 3, 3, 3],
                                      [0, 1, 3, 3, 3, 3, 3, 3]])
  assert layouts.flat_size(0, 4) == 4 and layouts.flat_size(9, 4) == 12


@pytest.mark.parametrize('weighted,dropout,lazy', [
    (False, False, False), (False, True, True), (True, True, False),
    (True, False, True)])
def test_flat_mean_features_equal_padded(weighted, dropout, lazy):
  """The flat layout's segment sum over real tokens = the padded layout's
  masked mean (gather, or bag-of-words product over table rows), with IDF
  weights and a word-dropout mask too."""
  tokens, lengths = _reviews(4)
  enc = two_branch.MeanEncoder(vocab_size=30, word_dim=5, weighted=weighted)
  params = enc.init(jax.random.PRNGKey(0), tokens, lengths)
  keep = (np.random.default_rng(1).random(tokens.shape) < 0.6
          if dropout else None)
  table = None
  if lazy:
    ids, slots = np.unique(tokens, return_inverse=True)
    table = params['params']['embed']['embedding'][ids]
    tokens = slots.reshape(tokens.shape).astype(np.int32)
  flat = layouts.flat_review(lengths[None], bucket=16)[0]
  assert flat.shape[0] > lengths.sum()  # Padding positions are ignored.
  padded = enc.apply(params, tokens, lengths, table, keep=keep)
  got = enc.apply(params, tokens, lengths, table, keep=keep,
                  flat_review=flat)
  np.testing.assert_allclose(got, padded, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(got[1])).max() == 0  # The empty review.


@pytest.mark.parametrize('seed,bucket', [(0, 4), (1, 16), (2, 64), (3, 1)])
def test_flat_owner_in_the_step_equals_binary_search(seed, bucket):
  """The step's owners of flat positions (a running sum of ones at the
  reviews' ends) equal a binary search over the running ends, bit for
  bit, on the host and jitted, with empty reviews (first, last, in a
  row), and compile to no loop."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, 9, 13).astype(np.int32)
  lengths[[0, 5, 6, 12]] = 0
  size = layouts.flat_size(lengths.sum(), bucket)
  want = np.searchsorted(np.cumsum(lengths), np.arange(size), side='right')
  np.testing.assert_array_equal(layouts.flat_owner(lengths, size, np), want)
  owner = jax.jit(layouts.flat_owner, static_argnums=1)
  np.testing.assert_array_equal(owner(lengths, size), want)
  hlo = owner.lower(lengths, size).compile().as_text()
  assert 'while' not in hlo, 'a loop in the flat layout'
  np.testing.assert_array_equal(
      layouts.flat_owner(np.zeros(3, np.int32), 4, np), [3, 3, 3, 3])


def test_flat_padding_positions_read_no_row():
  """Flat positions past the last real token read no table row and their
  gradient goes to none: a non-finite row that only padding would touch
  (the padding word's, 0 here) leaves the features finite and gets no
  gradient; the real tokens' rows get theirs."""
  tokens, lengths = _reviews(4)
  tokens = np.where(tokens == 0, 1, tokens)  # Word 0 only as padding.
  tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
  enc = two_branch.MeanEncoder(vocab_size=30, word_dim=5)
  params = enc.init(jax.random.PRNGKey(0), tokens, lengths)
  table = params['params']['embed']['embedding'].at[0].set(jnp.nan)
  flat = layouts.flat_review(lengths[None], bucket=16)[0]
  assert flat.shape[0] > lengths.sum()

  def total(table):
    return jnp.sum(enc.apply({'params': {'embed': {'embedding': table}}},
                             tokens, lengths, flat_review=flat))
  value, grad = jax.value_and_grad(total)(table)
  assert np.isfinite(float(value))
  assert np.asarray(grad[0] == 0).all()
  real = np.unique(tokens[np.arange(tokens.shape[1])[None, :]
                          < lengths[:, None]])
  assert np.abs(np.asarray(grad[real])).sum(1).min() > 0
