"""Retrieval metrics against hand-computed answers."""

import itertools

import numpy as np
import pytest

from mardjax.evaluation import metrics


def _unit(v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


ALBUMS = np.array([10, 11, 12])
ALBUM_EMB = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def test_review_to_album_hand_computed():
  # Review 0 sits on album 10; review 1 is nearer 11 than its own 12;
  # review 2 (album 12) is nearest 10, then 12, then 11.
  queries = _unit([[1, 0.1, 0], [0, 1, 0.5], [1, 0, 0.6]])
  g, t, m = metrics.review_to_album_counts(queries, np.array([10, 12, 12]),
                                           ALBUMS, ALBUM_EMB)
  np.testing.assert_array_equal(g, [0, 1, 1])
  np.testing.assert_array_equal(t, [0, 0, 0])
  out = metrics.summarize(g, t, m, 3, ks=(1, 2, 5))
  assert out['recall@1'] == pytest.approx(1 / 3)
  assert out['recall@2'] == pytest.approx(1.0)
  assert out['recall@5'] == 1.0  # K larger than the candidates.
  assert out['median_rank'] == 2.0
  assert out['mrr'] == pytest.approx((1 + 0.5 + 0.5) / 3)


def test_ties_count_as_a_fair_coin_not_a_win():
  # A collapsed model: every album at the same point.
  same = _unit(np.ones((4, 3)))
  q = _unit([[1, 2, 3]])
  g, t, m = metrics.review_to_album_counts(q, np.array([2]), np.arange(4),
                                           same)
  assert (g[0], t[0], m[0]) == (0, 3, 1)
  out = metrics.summarize(g, t, m, 4, ks=(1, 2, 4, 9))
  assert out['recall@1'] == pytest.approx(0.25)
  assert out['recall@2'] == pytest.approx(0.5)
  assert out['recall@4'] == out['recall@9'] == pytest.approx(1.0)
  assert out['median_rank'] == pytest.approx(2.5)
  assert out['mrr'] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
  assert metrics.random_recall(m, 4, (1, 2))[2] == pytest.approx(0.5)


def test_album_with_several_held_out_reviews():
  # Album 10 has reviews r0 (far) and r1 (near); album 11 has r2.
  reviews = _unit([[0, 0.2, 1], [1, 0.2, 0], [0.9, 1, 0]])
  review_albums = np.array([10, 10, 11])
  g, t, m = metrics.album_to_review_counts(
      ALBUM_EMB[:2], np.array([10, 11]), reviews, review_albums)
  # Album 10: its best review r1 is first. Album 11: r1 (not its own) is
  # closer to e2 than... r2 = (0.9, 1, 0) is closest; nothing above it.
  np.testing.assert_array_equal(g, [0, 0])
  np.testing.assert_array_equal(m, [1, 1])
  far = _unit([[0, 1, 0]])  # Query: album 10 placed on album 11's side.
  g, t, m = metrics.album_to_review_counts(far, np.array([10]), reviews,
                                           review_albums)
  assert g[0] == 1  # r2 (album 11) ranks above both of album 10's reviews.
  out = metrics.summarize(g, t, m, 3, ks=(1, 2))
  assert out['recall@1'] == 0 and out['recall@2'] == 1
  # Random ranking: 2 of 3 reviews are right, so recall@1 = 2/3.
  assert metrics.random_recall(np.array([2]), 3, (1,))[1] == pytest.approx(
      2 / 3)


def test_success_probability_matches_enumeration():
  for g, t, m, k in itertools.product([0, 2], [0, 1, 3], [1, 2, 3],
                                      [1, 2, 4, 7]):
    items = [1] * m + [0] * t
    hits = []
    for perm in set(itertools.permutations(items)):
      first = g + 1 + perm.index(1)
      hits.append(first <= k)
    want = np.mean(hits)
    got = metrics.success_probability(np.array([g]), np.array([t]),
                                      np.array([m]), k)[0]
    assert got == pytest.approx(want), (g, t, m, k)


def test_chunked_equals_unchunked():
  rng = np.random.default_rng(0)
  albums = np.arange(50)
  cand = _unit(rng.normal(size=(50, 8)))
  q = _unit(rng.normal(size=(37, 8)))
  qa = rng.integers(0, 50, 37)
  whole = metrics.review_to_album_counts(q, qa, albums, cand, chunk=1024)
  parts = metrics.review_to_album_counts(q, qa, albums, cand, chunk=5)
  for a, b in zip(whole, parts):
    np.testing.assert_array_equal(a, b)
  ra = np.unique(qa)
  whole = metrics.album_to_review_counts(cand[ra], ra, q, qa, chunk=1024)
  parts = metrics.album_to_review_counts(cand[ra], ra, q, qa, chunk=4)
  for a, b in zip(whole, parts):
    np.testing.assert_array_equal(a, b)


def test_counts_over_several_candidate_blocks_match_brute_force(
    monkeypatch):
  """Candidates counted block by block (`metrics._BLOCK`, the last padded)
  give the counts of every pair at once; planted ties (a wrong candidate
  equal to the right one) count as tied, the right one never."""
  monkeypatch.setattr(metrics, '_BLOCK', 16)  # 50 candidates: 4 blocks.
  rng = np.random.default_rng(1)
  cand = _unit(rng.normal(size=(50, 8)))
  cand[7] = cand[3]  # Album 3's twin.
  q = _unit(rng.normal(size=(37, 8)))
  qa = rng.integers(0, 50, 37)
  qa[:4] = 3
  greater, tied = metrics.review_to_album_counts(q, qa, np.arange(50),
                                                 cand)[:2]
  sims = q.astype(np.float64) @ cand.T.astype(np.float64)
  right = sims[np.arange(37), qa][:, None]
  wrong = np.arange(50)[None, :] != qa[:, None]
  np.testing.assert_array_equal(greater, ((sims > right + 1e-5) & wrong).sum(1))
  np.testing.assert_array_equal(
      tied, ((np.abs(sims - right) <= 1e-5) & wrong).sum(1))
  assert (tied[:4] >= 1).all()


def test_queries_of_albums_without_audio_are_an_error():
  with pytest.raises(ValueError, match='no audio'):
    metrics.review_to_album_counts(_unit([[1, 0, 0]]), np.array([99]),
                                   ALBUMS, ALBUM_EMB)


def test_bootstrap_interval_brackets_the_mean():
  rng = np.random.default_rng(1)
  values = (rng.random((400, 1)) < 0.3).astype(float)
  lo, hi = metrics.bootstrap_ci(values, samples=300, seed=0)
  assert lo[0] < values.mean() < hi[0]
  assert 0.05 < hi[0] - lo[0] < 0.15  # ~ 4 standard errors of 0.023.
