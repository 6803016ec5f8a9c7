"""Top-k search over a bank of unit vectors: exact, or approximate (HNSW).

Cosine similarity of unit vectors is their dot product, so both kinds rank
by inner product. `exact` is a (Q, E) x (E, N) product and a partial sort:
right for the MARD catalogue (65k albums, 300k reviews). `hnsw` is faiss's
hierarchical navigable small-world graph, for catalogues of millions, where
a query visits a few thousand vectors instead of all of them.
"""

import os
from typing import Any, Protocol

import numpy as np

from mardjax.errors import need_choice
from mardjax.errors import UserError

KINDS = ('exact', 'hnsw')


class Index(Protocol):
  kind: str

  def search(self, queries: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """(indices (Q, k'), scores (Q, k')), best first; k' = min(k, N)."""


class ExactIndex:
  """Brute-force inner product over the bank."""
  kind = 'exact'

  def __init__(self, vectors: np.ndarray):
    self.vectors = np.asarray(vectors, np.float32)

  def search(self, queries: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, self.vectors.shape[0])
    scores = np.asarray(queries, np.float32) @ self.vectors.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, 1)
    order = np.argsort(-top_scores, axis=1, kind='stable')
    return (np.take_along_axis(top, order, 1),
            np.take_along_axis(top_scores, order, 1))


class HnswIndex:
  """faiss `IndexHNSWFlat` with the inner-product metric."""
  kind = 'hnsw'

  def __init__(self, index, ef_search: int):
    self.index = index
    self.ef_search = int(ef_search)

  @classmethod
  def build(cls, vectors: np.ndarray, m: int, ef_construction: int,
            ef_search: int) -> 'HnswIndex':
    import faiss  # pylint: disable=g-import-not-at-top
    vectors = np.ascontiguousarray(vectors, np.float32)
    index = faiss.IndexHNSWFlat(vectors.shape[1], int(m),
                                faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = int(ef_construction)
    index.add(vectors)
    return cls(index, ef_search)

  def search(self, queries: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, self.index.ntotal)
    # A search must look at no fewer candidates than it returns.
    self.index.hnsw.efSearch = max(self.ef_search, k)
    scores, idx = self.index.search(
        np.ascontiguousarray(queries, np.float32), k)
    return idx.astype(np.int64), scores

  def save(self, path: str) -> None:
    import faiss  # pylint: disable=g-import-not-at-top
    faiss.write_index(self.index, path)

  @classmethod
  def load(cls, path: str, rows: int, ef_search: int) -> 'HnswIndex':
    import faiss  # pylint: disable=g-import-not-at-top
    try:
      index = faiss.read_index(path)
    except RuntimeError as e:
      raise UserError(f'{path}: not a readable faiss index ({str(e)[:200]}); '
                      'export again.') from None
    if index.ntotal != rows:
      raise UserError(f'{path}: the index holds {index.ntotal} vectors but '
                      f'the bank {rows}; export again.')
    return cls(index, ef_search)


def check_config(export_config) -> None:
  """`config.export.index` names one of `KINDS` (UserError: one line)."""
  need_choice('export.index', export_config.index, KINDS)


def settings(export_config) -> dict[str, Any]:
  """The index description export.json records (`config.export`)."""
  check_config(export_config)
  kind = export_config.index
  if kind == 'exact':
    return {'kind': kind}
  return {'kind': kind, 'm': int(export_config.hnsw_m),
          'ef_construction': int(export_config.hnsw_ef_construction)}


def index_file(directory: str, name: str) -> str:
  return os.path.join(directory, f'{name}.hnsw.faiss')


def write(directory: str, name: str, vectors: np.ndarray,
          description: dict[str, Any]) -> Index:
  """Builds `name`'s index as `description` says; saves it when it is a
  file of its own (the exact index is the .npy itself)."""
  if description['kind'] == 'exact':
    return ExactIndex(vectors)
  index = HnswIndex.build(vectors, description['m'],
                          description['ef_construction'],
                          ef_search=description['ef_construction'])
  index.save(index_file(directory, name))
  return index


def load(directory: str, name: str, vectors: np.ndarray,
         description: dict[str, Any], ef_search: int) -> Index:
  """The index `write` left, as `description` (`settings`) says."""
  kind = description['kind']
  if kind == 'exact':
    return ExactIndex(vectors)
  if kind == 'hnsw':
    path = index_file(directory, name)
    if not os.path.isfile(path):
      raise UserError(f'{path} is missing; export again.')
    return HnswIndex.load(path, vectors.shape[0], ef_search)
  raise UserError(f'{directory}: unknown index kind {kind!r}; export again.')
