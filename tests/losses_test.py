"""The ranking loss against slow Python-loop references and hand-computed cases."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mardjax.train import losses


def _normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batch(seed, b=10, d=6, albums=4):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, albums, b)
  x = _normalize(rng.normal(size=(b, d))).astype(np.float32)
  y = _normalize(rng.normal(size=(b, d))).astype(np.float32)
  return x, y, ids.astype(np.int32)


def _dist(a, b):
  return float(np.sqrt(max(np.sum((a - b) ** 2), 1e-12)))


def _reference_term(anchors, cands, a_ids, c_ids, margin, neighbourhood,
                    hardest_k=None):
  """Plain loops: for each anchor, each positive, sum hinges over negatives."""
  total, pairs = 0.0, 0
  for i, j in itertools.product(range(len(anchors)), range(len(cands))):
    if a_ids[i] < 0 or c_ids[j] < 0 or a_ids[i] != c_ids[j]:
      continue
    if neighbourhood and i == j:
      continue
    negs = [k for k in range(len(cands)) if c_ids[k] >= 0 and
            c_ids[k] != a_ids[i]]
    if hardest_k is not None:
      negs = sorted(negs, key=lambda k: _dist(anchors[i], cands[k]))[
          :hardest_k]
    pairs += 1
    for k in negs:
      total += max(0.0, margin + _dist(anchors[i], cands[j]) -
                   _dist(anchors[i], cands[k]))
  return total / max(pairs, 1)


def _reference(x, y, ids, margin, weights, hardest_k=None):
  l1, l2, l3, l4 = weights
  return (l1 * _reference_term(x, y, ids, ids, margin, False, hardest_k) +
          l2 * _reference_term(y, x, ids, ids, margin, False, hardest_k) +
          l3 * _reference_term(x, x, ids, ids, margin, True, hardest_k) +
          l4 * _reference_term(y, y, ids, ids, margin, True, hardest_k))


@pytest.mark.parametrize('seed', range(4))
@pytest.mark.parametrize('weights', [(1, 1, 0, 0), (1, 0, 0, 0),
                                     (0.5, 1.5, 0.2, 0.3), (0, 0, 1, 1)])
def test_all_negatives_matches_reference(seed, weights):
  x, y, ids = _batch(seed)
  margin = 0.5  # Large enough that many hinges are active.
  got, terms = losses.ranking_loss(x, y, ids, margin=margin, weights=weights,
                                   negatives='all')
  want = _reference(x, y, ids, margin, weights)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)
  assert set(terms) == {'audio_to_text', 'text_to_audio',
                        'audio_neighbourhood', 'text_neighbourhood',
                        'active_hinges'}


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('k', [1, 3, 20])
def test_hardest_k_matches_reference(seed, k):
  x, y, ids = _batch(seed)
  got, _ = losses.ranking_loss(x, y, ids, margin=0.3, weights=(1, 1, 1, 1),
                               negatives=f'hardest:{k}')
  want = _reference(x, y, ids, 0.3, (1, 1, 1, 1), hardest_k=k)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


def test_sampled_k_is_unbiased_for_k_times_the_mean_hinge():
  x, y, ids = _batch(0, b=8)
  margin, k = 0.5, 4

  def one(key):
    return losses.ranking_loss(x, y, ids, margin=margin, weights=(1, 0, 0, 0),
                               negatives=f'sampled:{k}', key=key)[0]

  samples = jax.vmap(one)(jax.random.split(jax.random.PRNGKey(0), 4000))
  # E[sum of K uniform draws] = K * mean over negatives, per (anchor, pos).
  total, pairs = 0.0, 0
  for i in range(8):
    negs = [n for n in range(8) if ids[n] != ids[i]]
    for j in range(8):
      if ids[j] == ids[i]:
        pairs += 1
        total += k * np.mean([max(0, margin + _dist(x[i], y[j]) -
                                  _dist(x[i], y[n])) for n in negs])
  np.testing.assert_allclose(float(samples.mean()), total / pairs, rtol=0.03)
  assert float(samples.std()) > 0  # Really random.


def test_hand_computed_case():
  # Two albums on a line: audio 0 of album 0 at +e1, text 0 at +e1 (d=0),
  # text 1 of album 1 at -e1 (d=2). Margin 0.1: every hinge inactive except
  # where distance ordering is violated.
  e1 = np.array([[1.0, 0.0]], np.float32)
  x = np.concatenate([e1, -e1])  # audio rows: album 0, album 1
  y = np.concatenate([-e1, e1])  # text rows swapped: each review far away
  ids = np.array([0, 1], np.int32)
  loss, terms = losses.ranking_loss(x, y, ids, margin=0.1,
                                    weights=(1, 0, 0, 0), negatives='all')
  # Anchor x0: positive y0 at distance 2, negative y1 at distance 0:
  # hinge 0.1 + 2 - 0 = 2.1, same for x1; mean over 2 pairs = 2.1.
  np.testing.assert_allclose(float(loss), 2.1, rtol=1e-6)
  np.testing.assert_allclose(float(terms['audio_to_text']), 2.1, rtol=1e-6)
  loss, _ = losses.ranking_loss(x, x[::-1] * -1, ids, margin=0.1,
                                weights=(1, 0, 0, 0), negatives='all')
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)  # All satisfied.


def test_same_album_rows_are_never_negatives_and_padding_is_ignored():
  x, y, ids = _batch(1, b=6, albums=2)
  padded_ids = np.concatenate([ids, [-1, -1]]).astype(np.int32)
  rng = np.random.default_rng(9)
  junk = _normalize(rng.normal(size=(2, x.shape[1]))).astype(np.float32)
  full, _ = losses.ranking_loss(np.concatenate([x, junk]),
                                np.concatenate([y, junk]), padded_ids,
                                margin=0.4, weights=(1, 1, 1, 1),
                                negatives='all')
  plain, _ = losses.ranking_loss(x, y, ids, margin=0.4, weights=(1, 1, 1, 1),
                                 negatives='all')
  np.testing.assert_allclose(float(full), float(plain), rtol=1e-6)
  # One album only: no negatives, so no loss at all.
  one = np.zeros(6, np.int32)
  loss, _ = losses.ranking_loss(x, y, one, margin=0.4, weights=(1, 1, 1, 1),
                                negatives='all')
  assert float(loss) == 0.0


def test_gradient_is_finite_when_all_hinges_are_inactive():
  # Identical rows per album and far-apart albums: every hinge is 0, and the
  # neighbourhood terms see zero distances (sqrt'(0) would be inf).
  x = np.array([[1, 0], [1, 0], [-1, 0], [-1, 0]], np.float32)
  ids = np.array([0, 0, 1, 1], np.int32)

  def f(a, t):
    return losses.ranking_loss(a, t, ids, margin=0.05, weights=(1, 1, 1, 1),
                               negatives='all')[0]

  value, grads = jax.value_and_grad(f, argnums=(0, 1))(x, x)
  assert float(value) == 0.0
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_jit_and_vmap_compatible():
  x, y, ids = _batch(2)
  fn = jax.jit(lambda a, b: losses.ranking_loss(
      a, b, ids, margin=0.2, weights=(1, 1, 1, 1), negatives='hardest:2')[0])
  np.testing.assert_allclose(float(fn(x, y)), float(losses.ranking_loss(
      x, y, ids, margin=0.2, weights=(1, 1, 1, 1), negatives='hardest:2')[0]),
                             rtol=1e-6)
  batched = jax.vmap(fn)(jnp.stack([x, y]), jnp.stack([y, x]))
  assert batched.shape == (2,)


@pytest.mark.parametrize('bad', ['some', 'sampled', 'hardest:0', 'all:3',
                                 'sampled:-1', 'hardest:x', '', 'al',
                                 'a:', 'hardest:3+', 'hardest:3+sampled:0',
                                 'sampled:3+sampled:2', 'all+sampled:2',
                                 'hardest:3+hardest:2', 'hardest:3+sampled'])
def test_bad_negative_modes(bad):
  with pytest.raises(ValueError):
    losses.NegativeMode.parse(bad)


def test_a_mixed_mode_parses_into_its_two_counts():
  mode = losses.NegativeMode.parse('hardest:10+sampled:5')
  assert (mode.kind, mode.k, mode.sampled, mode.draws) == ('hardest', 10, 5, 5)
  assert losses.NegativeMode.parse('sampled:7').draws == 7
  assert losses.NegativeMode.parse('hardest:7').draws == 0


@pytest.mark.parametrize('listed', [False, True])
def test_mixed_negatives_add_the_hardest_and_the_sampled_hinges(listed):
  """Every (anchor, positive) pair's hinges against its K hardest and its
  S uniform negatives: the two modes' losses summed (the same draws: one
  key), with the neighbourhood terms, padding and listed positives."""
  x, y, ids = _batch(4, b=12, albums=4)
  ids[5] = -1
  kw = dict(margin=0.4, weights=(1, 0.7, 0.3, 0.2),
            key=jax.random.PRNGKey(3),
            positives=losses.positive_lists(ids[None], False)[0]
            if listed else None)
  both, terms = losses.ranking_loss(x, y, ids, negatives='hardest:2+sampled:3',
                                    **kw)
  hard, hard_terms = losses.ranking_loss(x, y, ids, negatives='hardest:2',
                                         **kw)
  drawn, drawn_terms = losses.ranking_loss(x, y, ids, negatives='sampled:3',
                                           **kw)
  np.testing.assert_allclose(float(both), float(hard) + float(drawn),
                             rtol=1e-5)
  for name in ('audio_to_text', 'text_neighbourhood'):
    np.testing.assert_allclose(
        float(terms[name]), float(hard_terms[name]) + float(drawn_terms[name]),
        rtol=1e-5)
  assert float(drawn) > 0 and float(hard) > 0
  with pytest.raises(ValueError, match='PRNG key'):
    losses.ranking_loss(x, y, ids, negatives='hardest:2+sampled:3',
                        **dict(kw, key=None))


def test_sampled_draws_only_negatives():
  """With one negative per anchor every draw must be it: sampled:K = K * all."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 3)).astype(np.float32)
  y = rng.normal(size=(2, 3)).astype(np.float32)
  ids = np.array([0, 1], np.int32)
  kw = dict(margin=5.0, weights=(1, 1, 0, 0))
  want, _ = losses.ranking_loss(x, y, ids, negatives='all', **kw)
  for seed in range(3):
    got, _ = losses.ranking_loss(x, y, ids, negatives='sampled:6',
                                 key=jax.random.PRNGKey(seed), **kw)
    np.testing.assert_allclose(float(got), 6 * float(want), rtol=1e-6)


def test_sampled_negatives_are_uniform_over_each_anchors_negatives():
  """Unsorted ids, padding rows and albums of several rows: every draw is a
  real candidate of another album, and each of them is drawn about equally
  often (200,000 draws over 7 negatives per anchor here)."""
  ids = jnp.array([3, -1, 0, 3, 2, 0, -1, 5, 2, 3, 1], jnp.int32)
  anchors = jnp.array([3, 0, 5, -1, 1], jnp.int32)
  draws = 40_000
  u = jax.random.uniform(jax.random.PRNGKey(0), (len(anchors), draws))
  blocks = losses.album_blocks(ids, jnp.array([0, 2, 7, 1, 10]))
  index, has_neg = losses._sampled_negatives(blocks, anchors, u)
  index, ids = np.asarray(index), np.asarray(ids)
  np.testing.assert_array_equal(np.asarray(has_neg),
                                [True, True, True, False, True])
  for a, album in enumerate(np.asarray(anchors)):
    if album < 0:
      continue
    negatives = np.flatnonzero((ids >= 0) & (ids != album))
    assert set(index[a]) == set(negatives), album
    freq = np.bincount(index[a], minlength=len(ids))[negatives] / draws
    np.testing.assert_allclose(freq, 1 / len(negatives), atol=0.01)


def test_positive_lists_hand_computed():
  """Each row's same-album rows, itself included, in index order: among its
  device's rows, or every device's (numbered d * b + i); none for padding;
  widths a power of two from `losses.MIN_POSITIVES`."""
  album = np.array([[3, 1, 3, -1], [1, 1, 5, 3]])
  local = losses.positive_lists(album, False)
  np.testing.assert_array_equal(local, [
      [[0, 2, -1, -1], [1, -1, -1, -1], [0, 2, -1, -1], [-1, -1, -1, -1]],
      [[0, 1, -1, -1], [0, 1, -1, -1], [2, -1, -1, -1], [3, -1, -1, -1]]])
  across = losses.positive_lists(album, True, lambda w: 2 * w)
  assert across.shape == (2, 4, 8) and across.dtype == np.int32
  np.testing.assert_array_equal(across[..., :4], [
      [[0, 2, 7, -1], [1, 4, 5, -1], [0, 2, 7, -1], [-1, -1, -1, -1]],
      [[1, 4, 5, -1], [1, 4, 5, -1], [6, -1, -1, -1], [0, 2, 7, -1]]])
  assert (across[..., 4:] == -1).all()
  assert [losses.positive_width(n) for n in (0, 1, 4, 5, 9)] == [
      4, 4, 4, 8, 16]
  with pytest.raises(ValueError, match='more than'):
    losses.positive_lists(np.zeros((1, 6), int), False, lambda w: 4)


@pytest.mark.slow
@pytest.mark.parametrize('seed,negatives,rows', [
    (0, 'sampled:5', False), (1, 'sampled:5', False), (0, 'sampled:5', True),
    (2, 'sampled:5', True), (0, 'hardest:3', False), (1, 'hardest:30', False),
    (2, 'all', False), (0, 'hardest:3+sampled:4', False),
    (1, 'hardest:2+sampled:5', True)])
def test_listed_positives_give_the_loss_over_every_pair(seed, negatives,
                                                        rows, monkeypatch):
  """The hinges over each anchor's listed positives equal those over every
  candidate (the same draws): loss, terms and gradients, with padding
  rows, albums of one to four rows and the neighbourhood terms' self;
  sampled, with the distances from the matrix or from gathered rows (as
  at large batches)."""
  if rows:
    monkeypatch.setattr(losses, '_PAIRS_FOR_ROWS', 0)
  x, y, ids = _batch(seed, b=14, albums=5)
  ids[[3, 9]] = -1
  lists = losses.positive_lists(ids[None], False)[0]

  def loss(x, y, positives):
    return losses.ranking_loss(x, y, ids, margin=0.4, weights=(1, 0.7, 0.3,
                                                               0.2),
                               negatives=negatives,
                               key=jax.random.PRNGKey(seed),
                               positives=positives)
  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (want, want_terms), want_grads = grad(x, y, None)
  (got, got_terms), got_grads = grad(x, y, lists)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for k in want_terms:
    np.testing.assert_allclose(float(got_terms[k]), float(want_terms[k]),
                               rtol=1e-5, atol=1e-7, err_msg=k)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_sampled_needs_a_key():
  x, y, ids = _batch(0)
  with pytest.raises(ValueError, match='PRNG key'):
    losses.ranking_loss(x, y, ids, margin=0.1, weights=(1, 1, 1, 1),
                        negatives='sampled:3')


def _ref_infonce(x, y, ids, t):
  def direction(a, c):
    out, n = 0.0, 0
    for i in range(len(a)):
      s = a[i] @ c.T / t
      pos = ids == ids[i]
      out += -np.log(np.exp(s[pos]).sum() / np.exp(s).sum())
      n += 1
    return out / n
  return 0.5 * (direction(x, y) + direction(y, x))


def test_infonce_and_sigmoid_match_references():
  x, y, ids = _batch(3)
  got = losses.infonce_loss(x, y, ids, temperature=0.1)
  np.testing.assert_allclose(float(got), _ref_infonce(x, y, ids, 0.1),
                             rtol=1e-5)
  got = losses.sigmoid_loss(x, y, ids, temperature=0.1, bias=-2.0)
  want = 0.0
  for i, j in itertools.product(range(len(x)), repeat=2):
    z = 1.0 if ids[i] == ids[j] else -1.0
    want += np.log1p(np.exp(-z * (x[i] @ y[j] / 0.1 - 2.0)))
  np.testing.assert_allclose(float(got), want / len(x) ** 2, rtol=1e-5)


@pytest.mark.parametrize('kind', ['ranking', 'infonce', 'sigmoid'])
def test_gathered_loss_on_four_devices_equals_the_global_loss(kind):
  n = jax.local_device_count()
  assert n == 4, 'tests force 4 CPU devices (tests/conftest.py)'
  x, y, ids = _batch(5, b=16, albums=5)
  shard = lambda a: a.reshape(n, -1, *a.shape[1:])
  fns = {
      'ranking': lambda a, t, i, **kw: losses.ranking_loss(
          a, t, i, margin=0.3, weights=(1, 0.5, 0.2, 0.1), negatives='all',
          **kw)[0],
      'infonce': lambda a, t, i, **kw: losses.infonce_loss(
          a, t, i, temperature=0.1, **kw),
      'sigmoid': lambda a, t, i, **kw: losses.sigmoid_loss(
          a, t, i, temperature=0.1, bias=-1.0, **kw),
  }
  fn = fns[kind]

  def per_device(a, t, i):
    return fn(a, t, i, axis_name='d', gather_across_devices=True)

  per = jax.pmap(per_device, axis_name='d')(shard(x), shard(y), shard(ids))
  # Devices hold different numbers of positive pairs; the mean of their
  # values is still exactly the loss of the whole batch on one device.
  np.testing.assert_allclose(float(per.mean()), float(fn(x, y, ids)),
                             rtol=1e-5)


def _reference_active(anchors, cands, ids, margin, hardest_k=None):
  """(active hinges, hinges) of one cross-modal term, by plain loops."""
  active = total = 0
  for i, j in itertools.product(range(len(anchors)), range(len(cands))):
    if ids[i] != ids[j]:
      continue
    negs = [k for k in range(len(cands)) if ids[k] != ids[i]]
    if hardest_k is not None:
      negs = sorted(negs, key=lambda k: _dist(anchors[i], cands[k]))[
          :hardest_k]
    for k in negs:
      total += 1
      active += (margin + _dist(anchors[i], cands[j]) -
                 _dist(anchors[i], cands[k])) > 0
  return active, total


@pytest.mark.parametrize('negatives,hardest_k', [('all', None),
                                                 ('hardest:3', 3),
                                                 # More than any anchor has.
                                                 ('hardest:20', 20)])
def test_active_hinges_is_the_fraction_of_active_cross_modal_hinges(
    negatives, hardest_k):
  x, y, ids = _batch(7)
  _, terms = losses.ranking_loss(x, y, ids, margin=0.3, weights=(1, 1, 1, 1),
                                 negatives=negatives)
  a1, n1 = _reference_active(x, y, ids, 0.3, hardest_k)
  a2, n2 = _reference_active(y, x, ids, 0.3, hardest_k)
  want = (a1 / n1 + a2 / n2) / 2
  assert 0 < want < 1
  np.testing.assert_allclose(float(terms['active_hinges']), want, rtol=1e-6)
  # The uni-directional loss reports its one term's fraction.
  _, terms = losses.ranking_loss(x, y, ids, margin=0.3, weights=(1, 0, 0, 0),
                                 negatives=negatives)
  np.testing.assert_allclose(float(terms['active_hinges']), a1 / n1,
                             rtol=1e-6)


def test_infonce_and_sigmoid_leave_padding_rows_out():
  """Padding rows (album id < 0) are neither anchors nor candidates: the
  losses of a padded batch equal those of its real rows alone."""
  x, y, ids = _batch(11, b=9)
  pad = np.array([-1, -1, -1], np.int32)
  rng = np.random.default_rng(1)
  px = _normalize(rng.normal(size=(3, x.shape[1]))).astype(np.float32)
  py = _normalize(rng.normal(size=(3, y.shape[1]))).astype(np.float32)
  # Padding interleaved with real rows, not only at the end.
  order = np.random.default_rng(2).permutation(12)
  xx, yy = np.concatenate([x, px])[order], np.concatenate([y, py])[order]
  ii = np.concatenate([ids, pad])[order]
  got = losses.infonce_loss(xx, yy, ii, temperature=0.1)
  np.testing.assert_allclose(float(got), _ref_infonce(x, y, ids, 0.1),
                             rtol=1e-5)
  got = losses.sigmoid_loss(xx, yy, ii, temperature=0.1, bias=-2.0)
  want = losses.sigmoid_loss(x, y, ids, temperature=0.1, bias=-2.0)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_a_draw_at_the_top_of_its_range_is_still_a_negative():
  """`uniform * count` rounds up to `count` in float32 once an anchor has
  more than 2**24 negatives: the largest draw must still be the anchor's
  last negative in album order, never its own album or past the end (here
  the anchors' blocks come first, in the middle and last)."""
  ids = jnp.array([4, 0, 2, 4, -1, 0, 2, 4], jnp.int32)
  anchors = jnp.array([0, 2, 4], jnp.int32)
  for top in (1.0, np.nextafter(np.float32(1), np.float32(0))):
    u = jnp.full((3, 2), top, jnp.float32)
    blocks = losses.album_blocks(ids, jnp.array([1, 2, 0]))
    index, has_neg = losses._sampled_negatives(blocks, anchors, u)
    index = np.asarray(index)
    assert np.asarray(has_neg).all()
    # The last negative in album order: album 4's last row for anchors of
    # albums 0 and 2, album 2's last row for album 4.
    np.testing.assert_array_equal(index, [[7, 7], [7, 7], [6, 6]])


@pytest.mark.parametrize('listed', [False, True])
def test_each_term_draws_its_own_negatives_in_the_stacked_terms(listed):
  """Under sampled:K the four terms get four different draws, the slices
  of one draw of 4 * B * K uniforms (a term sharing another's draws would
  correlate the two terms' negatives), and the stacked computation of the
  terms gives each term as `ranking_term` computes it alone: with all four
  weights on, and with one term on at a time."""
  audio, text, ids = _batch(4, b=12)
  ids[5] = -1
  audio, text = jnp.asarray(audio), jnp.asarray(text)
  key = jax.random.PRNGKey(3)
  draws = jax.random.uniform(key, (4 * len(ids) * 5,)).reshape(
      4, len(ids), 5)
  lists = losses.positive_lists(ids[None], False)[0] if listed else None
  rows = jnp.arange(len(ids), dtype=jnp.int32)
  blocks = losses.album_blocks(jnp.asarray(ids), rows)
  mode = losses.NegativeMode.parse('sampled:5')
  alone = {}
  for term, (name, a_text, c_text, self_) in enumerate(losses.TERMS):
    alone[name] = float(losses.ranking_term(
        text if a_text else audio, text if c_text else audio, ids, ids,
        0.2, mode, uniform=draws[term], self_index=rows if self_ else None,
        positives=lists, blocks=blocks)[0])
  assert len(set(alone.values())) == 4
  _, terms = losses.ranking_loss(audio, text, ids, margin=0.2,
                                 weights=(1, 1, 1, 1), negatives='sampled:5',
                                 key=key, positives=lists)
  for name, value in alone.items():
    np.testing.assert_allclose(float(terms[name]), value, rtol=1e-6)
  for term, (name, *_) in enumerate(losses.TERMS):
    weights = [0.0] * 4
    weights[term] = 0.5
    loss, terms = losses.ranking_loss(audio, text, ids, margin=0.2,
                                      weights=tuple(weights),
                                      negatives='sampled:5', key=key,
                                      positives=lists)
    np.testing.assert_allclose(float(loss), 0.5 * alone[name], rtol=1e-6)
    assert all(float(v) == 0.0 for k, v in terms.items()
               if k not in (name, 'active_hinges'))


def _searched_blocks(candidate_ids, anchor_ids):
  """The blocks by binary search, as the loss found them before: the
  reference the loop-free `album_blocks` must equal bit for bit."""
  ids = np.sort(candidate_ids, kind='stable')
  start = np.searchsorted(ids, anchor_ids, side='left')
  size = np.searchsorted(ids, anchor_ids, side='right') - start
  return (np.argsort(candidate_ids, kind='stable'), start, size,
          np.searchsorted(ids, 0, side='left'))


@pytest.mark.parametrize('seed,m,albums,padding', [
    (0, 1, 1, 0), (1, 7, 3, 2), (2, 64, 5, 9), (3, 300, 120, 40),
    (4, 16, 16, 16), (5, 33, 1, 0), (6, 40, 8, 39)])
def test_album_blocks_equal_binary_search(seed, m, albums, padding):
  """Each anchor's block start and size, the sorted order and the padding
  count equal those binary search gives, for unsorted ids with padding
  rows (every row padding, one row, one album, albums of one row), and
  the draws and the step's positive lists made from them equal the
  host's."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, albums, m).astype(np.int32)
  ids[rng.permutation(m)[:min(padding, m)]] = -1
  anchor_index = rng.integers(0, m, 2 * m).astype(np.int32)
  blocks = losses.album_blocks(jnp.asarray(ids), jnp.asarray(anchor_index))
  order, start, size, first_real = _searched_blocks(ids, ids[anchor_index])
  np.testing.assert_array_equal(np.asarray(blocks.order), order)
  np.testing.assert_array_equal(np.asarray(blocks.start), start)
  np.testing.assert_array_equal(np.asarray(blocks.size), size)
  assert int(blocks.padding) == first_real
  # The draw made from the blocks, against the same formula on the
  # searched ones.
  u = rng.random((2 * m, 6)).astype(np.float32)
  index, has_neg = losses._sampled_negatives(blocks, ids[anchor_index], u)
  count = np.where(ids[anchor_index] >= 0, m - first_real - size, 0)
  r = np.clip((u * count[:, None].astype(np.float32)).astype(np.int32), 0,
              np.maximum(count - 1, 0)[:, None])
  at = first_real + r
  at = np.where(at >= start[:, None], at + size[:, None], at)
  np.testing.assert_array_equal(np.asarray(index),
                                order[np.minimum(at, m - 1)])
  np.testing.assert_array_equal(np.asarray(has_neg), count > 0)


@pytest.mark.parametrize('across', [False, True])
def test_positive_lists_made_in_the_step_equal_the_hosts(across):
  """`device_positive_lists` from the blocks equals `positive_lists`: each
  row's album's rows in index order, among its device's rows or all
  devices' (numbered d * b + i), padding rows' lists empty; and so does
  the loss, lists passed or their width."""
  rng = np.random.default_rng(7)
  album = rng.integers(0, 6, (4, 10)).astype(np.int32)
  album[1, [2, 7]] = -1
  album[3, :] = -1
  host = losses.positive_lists(album, across, lambda w: 8)
  for d in range(4):
    cands = album.reshape(-1) if across else album[d]
    rows = np.arange(10, dtype=np.int32) + (10 * d if across else 0)
    blocks = losses.album_blocks(jnp.asarray(cands), jnp.asarray(rows))
    made = losses.device_positive_lists(blocks, jnp.asarray(album[d]), 8)
    np.testing.assert_array_equal(np.asarray(made), host[d])
  x, y, _ = _batch(8, b=10)
  kw = dict(margin=0.3, weights=(1, 0.5, 0.25, 0.125), negatives='sampled:4',
            key=jax.random.PRNGKey(1))
  local = losses.positive_lists(album, False, lambda w: 8)[1]
  want = losses.ranking_loss(x, y, album[1], positives=local, **kw)[0]
  got = losses.ranking_loss(x, y, album[1], positives=8, **kw)[0]
  assert float(got) == float(want)


def test_the_negatives_draw_compiles_to_no_loop():
  """The blocks, the draw and the step's positive lists compile to one
  sort and no `while` loop (binary search would add one a search: kernel
  launches in series on an accelerator)."""
  def draw(ids, u):
    rows = jnp.arange(ids.shape[0], dtype=jnp.int32)
    blocks = losses.album_blocks(ids, rows)
    return (losses._sampled_negatives(blocks, ids, u),
            losses.device_positive_lists(blocks, ids, 4))
  hlo = jax.jit(draw).lower(jnp.zeros(512, jnp.int32),
                            jnp.zeros((512, 10))).compile().as_text()
  assert ' while(' not in hlo and 'while' not in hlo.lower().split(
      'entry')[-1], 'a loop in the draw'
  assert hlo.count(' sort(') == 1, hlo.count(' sort(')


@pytest.mark.parametrize('kind', ['ranking', 'infonce', 'sigmoid'])
def test_a_batch_of_padding_rows_only_gives_a_zero_loss(kind):
  """The last batch of a device can hold only padding rows: no pair is
  counted, and the loss is 0, not 0 / 0."""
  x, y, _ = _batch(2, b=4)
  ids = np.full(4, -1, np.int32)
  fn = {'ranking': lambda *a: losses.ranking_loss(
      *a, margin=0.3, weights=(1, 1, 1, 1), negatives='all')[0],
        'infonce': lambda *a: losses.infonce_loss(*a, temperature=0.1),
        'sigmoid': lambda *a: losses.sigmoid_loss(*a, temperature=0.1,
                                                  bias=-1.0)}[kind]
  assert float(fn(x, y, ids)) == 0.0


def test_one_real_row_on_four_devices_is_the_global_mean():
  """Three devices of padding and one real row: the gathered loss's mean
  over devices is still the one pair's loss (the global count is 1)."""
  x, y, _ = _batch(6, b=8)
  ids = np.array([-1, -1, -1, 4, -1, -1, -1, -1], np.int32)

  def per_device(a, t, i):
    return losses.sigmoid_loss(a, t, i, temperature=0.1, bias=-1.0,
                               axis_name='d', gather_across_devices=True)

  per = jax.pmap(per_device, axis_name='d')(
      x.reshape(4, 2, -1), y.reshape(4, 2, -1), ids.reshape(4, 2))
  want = np.log1p(np.exp(-(x[3] @ y[3] / 0.1 - 1.0)))
  np.testing.assert_allclose(float(per.mean()), want, rtol=1e-5)
  # On one device too: the one pair's loss, not half of it.
  one = losses.sigmoid_loss(x, y, ids, temperature=0.1, bias=-1.0)
  np.testing.assert_allclose(float(one), want, rtol=1e-5)
  # Padding on every device: 0, not 0 / 0.
  per = jax.pmap(per_device, axis_name='d')(
      x.reshape(4, 2, -1), y.reshape(4, 2, -1),
      np.full((4, 2), -1, np.int32))
  assert (np.asarray(per) == 0).all()


def test_the_ranking_loss_gathers_only_when_told():
  x, y, ids = _batch(8, b=16, albums=3)
  shard = lambda a: a.reshape(4, -1, *a.shape[1:])

  def run(**kw):
    return jax.pmap(lambda a, t, i: losses.ranking_loss(
        a, t, i, margin=0.3, weights=(1, 1, 0.5, 0.5), negatives='all',
        axis_name='d', **kw)[0], axis_name='d')(shard(x), shard(y),
                                                shard(ids))

  default = run()
  np.testing.assert_array_equal(default, run(gather_across_devices=False))
  assert np.abs(default - run(gather_across_devices=True)).max() > 1e-3


@pytest.mark.parametrize('kind', ['infonce', 'sigmoid'])
def test_without_gathering_each_device_pairs_its_own_rows(kind):
  """gather_across_devices defaults to False: under a device axis each
  device's candidates are its own rows, and the devices' mean is the mean
  of the four local losses (equal shares here)."""
  x, y, ids = _batch(8, b=16, albums=3)
  fn = {'infonce': lambda a, t, i, **kw: losses.infonce_loss(
      a, t, i, temperature=0.1, **kw),
        'sigmoid': lambda a, t, i, **kw: losses.sigmoid_loss(
            a, t, i, temperature=0.1, bias=-1.0, **kw)}[kind]
  shard = lambda a: a.reshape(4, -1, *a.shape[1:])
  per = jax.pmap(lambda a, t, i: fn(a, t, i, axis_name='d'),
                 axis_name='d')(shard(x), shard(y), shard(ids))
  local = [float(fn(a, t, i)) for a, t, i in zip(shard(x), shard(y),
                                                  shard(ids))]
  np.testing.assert_allclose(float(per.mean()), np.mean(local), rtol=1e-5)
  assert abs(np.mean(local) - float(fn(x, y, ids))) > 1e-3


def test_gathered_hardest_negatives_with_listed_positives():
  """Across four devices each device's anchors (4) meet the global batch's
  candidates (16): hardest:6 takes 6 negatives of the 16, more than a
  device holds rows, with the positives listed as training lists them."""
  x, y, ids = _batch(9, b=16, albums=4)
  kw = dict(margin=0.3, weights=(1, 0.5, 0.2, 0.1), negatives='hardest:6')
  lists = losses.positive_lists(ids.reshape(4, 4), True)
  shard = lambda a: a.reshape(4, -1, *a.shape[1:])

  def per_device(a, t, i, p):
    return losses.ranking_loss(a, t, i, axis_name='d',
                               gather_across_devices=True, positives=p,
                               **kw)[0]

  per = jax.pmap(per_device, axis_name='d')(shard(x), shard(y), shard(ids),
                                            lists)
  want = _reference(x, y, ids, 0.3, kw['weights'], hardest_k=6)
  np.testing.assert_allclose(float(per.mean()), want, rtol=1e-5)


def test_config_check_names_the_negatives_field():
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from mardjax.errors import UserError  # pylint: disable=g-import-not-at-top
  config = test_config.get_config().loss
  losses.check_config(config)
  config.negatives = 'hardest:0'
  with pytest.raises(UserError, match=r"config\.loss\.negatives='hardest:0'"):
    losses.check_config(config)


def test_a_parsed_mode_is_an_immutable_value():
  """Modes are compared and hashed as values (equal text, equal mode)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  mode = losses.NegativeMode.parse('hardest:3')
  assert mode == losses.NegativeMode('hardest', 3)
  assert len({mode, losses.NegativeMode.parse('hardest:3')}) == 1
  with pytest.raises(dataclasses.FrozenInstanceError):
    mode.k = 4


def test_a_sampled_term_needs_its_album_blocks():
  """`ranking_term` under sampled:K refuses to run without the candidates'
  album blocks (its draws are made from them), and the other modes need
  none."""
  x, y, ids = _batch(3)
  with pytest.raises(ValueError, match='album blocks'):
    losses.ranking_term(x, y, ids, ids, 0.2,
                        losses.NegativeMode.parse('sampled:3'),
                        uniform=jnp.zeros((len(ids), 3)))
  for mode in ('all', 'hardest:2'):
    loss, _ = losses.ranking_term(x, y, ids, ids, 0.2,
                                  losses.NegativeMode.parse(mode))
    assert np.isfinite(float(loss))
