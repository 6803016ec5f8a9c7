"""Retrieval metrics against hand-computed answers."""

import itertools

import numpy as np
import pytest

from mardjax.errors import UserError
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
  # Between two candidates: the error names the first three missing.
  with pytest.raises(ValueError, match=r'4 query albums have no audio, '
                     r'e\.g\. \[1, 3, 5\]\.'):
    metrics.review_to_album_counts(_unit(np.ones((5, 3))),
                                   np.array([7, 3, 5, 1, 3]), np.array([2, 4]),
                                   ALBUM_EMB[:2])
  # Beyond the only candidate, and with no candidate at all.
  for albums in ([10], []):
    with pytest.raises(ValueError, match='1 query albums have no audio'):
      metrics.review_to_album_counts(_unit([[1, 0, 0]]), np.array([11]),
                                     np.array(albums, int),
                                     ALBUM_EMB[:len(albums)])


def test_bootstrap_interval_brackets_the_mean():
  rng = np.random.default_rng(1)
  values = (rng.random((400, 1)) < 0.3).astype(float)
  lo, hi = metrics.bootstrap_ci(values, samples=300, seed=0)
  assert lo[0] < values.mean() < hi[0]
  assert 0.05 < hi[0] - lo[0] < 0.15  # ~ 4 standard errors of 0.023.


def test_default_ks_are_1_5_10():
  # Four of twenty candidates, the right one at ranks 1, 4, 8 and 13.
  g = np.array([0, 3, 7, 12])
  out = metrics.summarize(g, np.zeros(4, int), np.ones(4, int), 20)
  recalls = {k: v for k, v in out.items() if k.startswith('recall@')}
  assert recalls == {'recall@1': 0.25, 'recall@5': 0.5, 'recall@10': 0.75}
  assert metrics.random_recall(np.ones(4, int), 20) == {
      1: pytest.approx(0.05), 5: pytest.approx(0.25), 10: pytest.approx(0.5)}


def test_ties_at_exactly_the_tolerance_in_every_block(monkeypatch):
  """A score exactly TIE_TOLERANCE from the threshold is tied, one float32
  step further is not; the padding of the last candidate block (score 0,
  wrong for every query) counts nowhere, whatever the query's id."""
  tol = np.float32(metrics.TIE_TOLERANCE)
  above_tol = np.nextafter(tol, np.float32(1))
  # Query (1, 0) scores each candidate exactly its first coordinate.
  x = np.array([0.5, tol, -tol, 0, 2 * tol, above_tol, -0.5], np.float32)
  candidates = np.stack([x, np.zeros_like(x)], 1)
  thresholds = np.array([0, 0, tol, -tol, -0.25, 2 * tol], np.float32)
  # Ids 0 and 1 exclude a candidate; 99 has no right candidate.
  query_ids = np.array([0, 1, 99, 99, 99, 2])
  queries = np.tile(np.array([[1, 0]], np.float32), (6, 1))
  # Above threshold + tol | within tol of the threshold:
  #   thr 0, id 0:     2 tol, above_tol    | tol, -tol, 0
  #   thr 0, id 1:     0.5, 2 tol, above_tol | -tol, 0
  #   thr tol:         0.5                 | tol, 0, 2 tol, above_tol
  #   thr -tol:        0.5, tol, 2 tol, above_tol | -tol, 0
  #   thr -0.25:       all but -0.5        | none
  #   thr 2 tol, id 2: 0.5                 | tol, 2 tol, above_tol
  want_greater = [2, 3, 1, 4, 6, 1]
  want_tied = [3, 2, 4, 2, 0, 3]
  # 7 candidates in blocks of 4 (one padding row), and in one block.
  for block in (4, 2048):
    monkeypatch.setattr(metrics, '_BLOCK', block)
    greater, tied = metrics.count_wrong_above(
        queries, thresholds, query_ids, candidates, np.arange(7), chunk=4)
    np.testing.assert_array_equal(greater, want_greater, err_msg=str(block))
    np.testing.assert_array_equal(tied, want_tied, err_msg=str(block))


def test_album_queries_must_be_sorted_without_repeats():
  reviews = _unit([[1, 0, 0], [0, 1, 0]])
  for albums in ([10, 10], [11, 10]):
    with pytest.raises(ValueError, match='sorted, without repeats'):
      metrics.album_to_review_counts(ALBUM_EMB[:2], np.array(albums), reviews,
                                     np.array([10, 11]))


def test_reviews_within_tolerance_of_the_best_are_all_right():
  # Own scores are exactly the first coordinates: the best 0.5, one review
  # exactly TIE_TOLERANCE below it (right), one a float32 step lower.
  tol = np.float32(metrics.TIE_TOLERANCE)
  edge = np.float32(0.5) - tol
  below = np.nextafter(edge, np.float32(0))
  reviews = np.array([[0.5, 0, 0], [edge, 0, 0], [below, 0, 0], [0, 1, 0]],
                     np.float32)
  g, t, m = metrics.album_to_review_counts(
      np.array([[1, 0, 0]], np.float32), np.array([10]), reviews,
      np.array([10, 10, 10, 11]))
  assert (g[0], t[0], m[0]) == (0, 0, 2)


def _bootstrap_by_hand(values, samples, seed, level):
  """Percentiles (1 - level) / 2 and (1 + level) / 2 of the means of
  resampled queries, drawn 100 resamples at a time from one generator."""
  rng = np.random.default_rng(seed)
  q = len(values)
  draws = np.concatenate([rng.integers(0, q, (min(100, samples - s), q))
                          for s in range(0, samples, 100)])
  means = values[draws].mean(1)
  assert means.shape == (samples, values.shape[1])
  tail = 100 * (1 - level) / 2
  return (np.percentile(means, tail, axis=0),
          np.percentile(means, 100 - tail, axis=0))


def test_bootstrap_ci_is_the_percentile_interval_of_resampled_means():
  rng = np.random.default_rng(2)
  values = rng.random((60, 3))
  values[:, 2] = values[:, 2] > 0.5  # Another distribution: 0 or 1.
  for samples, seed, level in ((250, 3, 0.95), (130, 0, 0.8)):
    lo, hi = metrics.bootstrap_ci(values, samples, seed, level)
    want_lo, want_hi = _bootstrap_by_hand(values, samples, seed, level)
    assert lo.shape == hi.shape == (3,)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-12)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-12)
    assert (lo < values.mean(0)).all() and (values.mean(0) < hi).all()


def test_bootstrap_defaults_are_the_evaluators():
  """1000 resamples, 95%, seed 0 unless told otherwise, in every entry point:
  the baselines leave the seed out and compare their intervals with the
  evaluator's row to row."""
  rng = np.random.default_rng(4)
  values = rng.random((40, 1))
  lo, hi = metrics.bootstrap_ci(values)
  want_lo, want_hi = _bootstrap_by_hand(values, 1000, 0, 0.95)
  np.testing.assert_allclose(lo, want_lo, rtol=1e-12)
  np.testing.assert_allclose(hi, want_hi, rtol=1e-12)
  g = rng.integers(0, 12, 40)
  t = rng.integers(0, 3, 40)
  counts = (g, t, np.ones(40, int))
  assert (metrics.summarize(*counts, 20, bootstrap=200) ==
          metrics.summarize(*counts, 20, bootstrap=200, seed=0))
  assert (metrics.summarize(*counts, 20, bootstrap=200) !=
          metrics.summarize(*counts, 20, bootstrap=200, seed=1))
  albums, album_emb, reviews, review_albums = _random_split()
  assert (metrics.report(albums, album_emb, reviews, review_albums,
                         bootstrap=200)[0] ==
          metrics.report(albums, album_emb, reviews, review_albums,
                         bootstrap=200, seed=0)[0])


def test_summarize_refuses_no_queries():
  with pytest.raises(ValueError, match='No queries'):
    metrics.summarize(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), 3)


def _random_split():
  """40 candidate albums, 150 reviews of 30 of them (several each)."""
  rng = np.random.default_rng(5)
  albums = np.arange(40)
  album_emb = _unit(rng.normal(size=(40, 6)))
  review_albums = rng.choice(30, 150)
  reviews = _unit(album_emb[review_albums] + rng.normal(size=(150, 6)))
  return albums, album_emb, reviews, review_albums


def test_report_hand_computed_both_directions():
  # r0, r1 review album 10, r2 album 11; album 12 has no review.
  reviews = _unit([[1, 0.1, 0], [0.2, 1, 0], [0, 1, 0.3]])
  review_albums = np.array([10, 10, 11])
  out, counts = metrics.report(ALBUMS, ALBUM_EMB, reviews, review_albums)
  # r1 ranks album 11 above its own.
  np.testing.assert_array_equal(counts[0], [0, 1, 0])
  assert out['recall@1'] == pytest.approx(2 / 3)
  assert out['recall@5'] == out['recall@10'] == 1
  assert out['random_recall@1'] == pytest.approx(1 / 3)
  assert out['num_queries'] == 3 and out['num_candidates'] == 3
  # Album 10 finds r0 first; album 11 finds r1 (album 10's) above r2.
  back = 'album_to_review/'
  assert out[back + 'recall@1'] == 0.5 and out[back + 'recall@5'] == 1
  assert out[back + 'num_queries'] == 2
  assert out[back + 'num_candidates'] == 3
  # Random: album 10 has 2 of the 3 reviews, album 11 one.
  assert out[back + 'random_recall@1'] == pytest.approx((2 / 3 + 1 / 3) / 2)
  assert out[back + 'random_recall@5'] == 1
  assert not [k for k in out if 'ci95' in k]  # No bootstrap unless asked.
  one_way, _ = metrics.report(ALBUMS, ALBUM_EMB, reviews, review_albums,
                              both_directions=False)
  assert {k: v for k, v in out.items() if not k.startswith(back)} == one_way


def test_report_intervals_of_each_direction():
  """Each direction's intervals are `summarize`'s of its counts, album ->
  review with seed + 1 (resamples independent of review -> album's)."""
  albums, album_emb, reviews, review_albums = _random_split()
  out, counts = metrics.report(albums, album_emb, reviews, review_albums,
                               ks=(1, 3), bootstrap=150, seed=2)
  forward = metrics.summarize(*counts, 40, (1, 3), bootstrap=150, seed=2)
  query_albums = np.unique(review_albums)
  back = metrics.album_to_review_counts(album_emb[query_albums], query_albums,
                                        reviews, review_albums)
  backward = metrics.summarize(*back, 150, (1, 3), prefix='album_to_review/',
                               bootstrap=150, seed=3)
  for k in (1, 3):
    assert out[f'recall@{k}_ci95'] == forward[f'recall@{k}_ci95']
    key = f'album_to_review/recall@{k}_ci95'
    assert out[key] == backward[key]


def test_no_queries_give_empty_counts():
  g, t, m = metrics.review_to_album_counts(np.zeros((0, 3), np.float32),
                                           np.zeros(0, int), ALBUMS, ALBUM_EMB)
  assert g.shape == t.shape == m.shape == (0,)


def test_no_candidates_count_nothing():
  greater, tied = metrics.count_wrong_above(
      _unit([[1, 0, 0], [0, 1, 0]]), np.array([0.5, -0.5]), np.array([1, 2]),
      np.zeros((0, 3), np.float32), np.zeros(0, int))
  np.testing.assert_array_equal(greater, [0, 0])
  np.testing.assert_array_equal(tied, [0, 0])


def test_non_finite_embeddings_and_repeated_candidates_are_refused():
  queries = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
  queries[1:3, 0] = [np.nan, np.inf]  # Two bad rows, one bad column.
  with pytest.raises(UserError, match='2 of 4 review embeddings'):
    metrics.review_to_album_counts(queries, np.array([10, 11, 12, 10]),
                                   ALBUMS, ALBUM_EMB)
  with pytest.raises(ValueError, match='1 repeated album ids'):
    metrics.review_to_album_counts(ALBUM_EMB, np.array([10, 11, 12]),
                                   np.array([10, 11, 11]), ALBUM_EMB)


def test_album_queries_without_a_review_are_an_error():
  with pytest.raises(ValueError, match='has no review'):
    metrics.album_to_review_counts(ALBUM_EMB, ALBUMS, _unit([[1, 0, 0]]),
                                   np.array([10]))


def test_mrr_only_for_one_right_answer_per_query():
  counts = (np.array([0, 1]), np.array([0, 0]), np.array([2, 1]))
  out = metrics.summarize(*counts, 5, ks=(1,))
  assert 'mrr' not in out and out['recall@1'] == 0.5
  assert metrics.summarize(counts[0], counts[1], np.ones(2, int), 5,
                           ks=(1,))['mrr'] == pytest.approx(0.75)


def test_reviews_of_albums_not_queried_are_wrong_answers():
  # Album 12 is queried, 11 not: 11's review sits on 12's embedding.
  reviews = _unit([[0, 0.1, 1], [0, 1, 0.5], [1, 0, 0]])
  g, t, m = metrics.album_to_review_counts(
      ALBUM_EMB[[0, 2]], np.array([10, 12]), reviews, np.array([12, 11, 10]))
  assert (g[1], t[1], m[1]) == (0, 0, 1)  # Album 12's own review first.
  g, t, m = metrics.album_to_review_counts(
      ALBUM_EMB[[0, 2]], np.array([10, 12]), reviews[[1, 0, 2]],
      np.array([12, 11, 10]))
  assert (g[1], t[1], m[1]) == (1, 0, 1)  # 11's review above 12's.


def test_one_compiled_shape_for_every_chunk(monkeypatch):
  """The last, shorter chunk of queries is padded to the chunk's shape, so
  an evaluation compiles the scoring once, not again for its remainder, and
  a second evaluation of the same shapes (training evaluates every few
  steps) not at all."""
  traces = []
  count_block = metrics._count_block

  def counting(*args):
    traces.append(args[1].shape)  # Runs only when _count_chunk is traced.
    return count_block(*args)

  monkeypatch.setattr(metrics, '_count_block', counting)
  rng = np.random.default_rng(6)
  # A width of 11 no other test uses: its shapes are traced here first.
  q = _unit(rng.normal(size=(7, 11)))
  cand = _unit(rng.normal(size=(5, 11)))
  for _ in range(2):
    greater, _ = metrics.count_wrong_above(q, np.zeros(7), np.arange(7), cand,
                                           np.arange(5) + 10, chunk=4)
  assert len(traces) <= 1, traces
  np.testing.assert_array_equal(greater, ((q @ cand.T) > 1e-5).sum(1))
