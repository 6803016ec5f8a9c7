"""Exact and HNSW top-k search over unit vectors."""

import numpy as np
import pytest

from mardjax.serve import search_index
from mardjax.errors import UserError


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_by_hand():
  bank = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], np.float32)
  idx, scores = search_index.ExactIndex(bank).search(
      np.array([[0.8, 0.6]], np.float32), k=3)
  # Dot products: 0.8, 0.6, -0.8, 0.96.
  np.testing.assert_array_equal(idx, [[3, 0, 1]])
  np.testing.assert_allclose(scores, [[0.96, 0.8, 0.6]], rtol=1e-6)
  idx, _ = search_index.ExactIndex(bank).search(bank[:1], k=10)
  assert idx.shape == (1, 4)  # k beyond the bank: every row, ranked.


def test_hnsw_recall_against_exact(tmp_path):
  rng = np.random.default_rng(0)
  bank, queries = _unit(rng, 20000, 32), _unit(rng, 200, 32)
  description = {'kind': 'hnsw', 'm': 16, 'ef_construction': 100}
  search_index.write(str(tmp_path), 'albums', bank, description)
  approx = search_index.load(str(tmp_path), 'albums', bank, description,
                             ef_search=128)
  exact, _ = search_index.ExactIndex(bank).search(queries, 10)
  found, scores = approx.search(queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])
  assert recall > 0.9, recall
  # Scores are the inner products of the rows returned, best first.
  np.testing.assert_allclose(scores, np.einsum('qe,qke->qk', queries,
                                               bank[found]), atol=1e-5)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_bad_indexes_are_clear_errors(tmp_path):
  rng = np.random.default_rng(1)
  bank = _unit(rng, 50, 8)
  description = {'kind': 'hnsw', 'm': 8, 'ef_construction': 20}
  with pytest.raises(UserError, match='missing'):
    search_index.load(str(tmp_path), 'albums', bank, description, 16)
  search_index.write(str(tmp_path), 'albums', bank, description)
  with pytest.raises(UserError, match='holds 50 vectors but the bank 49'):
    search_index.load(str(tmp_path), 'albums', bank[:49], description, 16)
  (tmp_path / 'albums.hnsw.faiss').write_bytes(b'garbage')
  with pytest.raises(UserError, match='not a readable faiss index'):
    search_index.load(str(tmp_path), 'albums', bank, description, 16)
  with pytest.raises(UserError, match='unknown index kind'):
    search_index.load(str(tmp_path), 'albums', bank, {'kind': 'lsh'}, 16)


def test_settings_refuse_unknown_kinds():
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({'index': 'annoy', 'hnsw_m': 8,
                                   'hnsw_ef_construction': 20})
  with pytest.raises(UserError, match='config.export.index'):
    search_index.settings(cfg)
  cfg.index = 'exact'
  assert search_index.settings(cfg) == {'kind': 'exact'}
