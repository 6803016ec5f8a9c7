"""Deterministic splits by hashing ids: the same split on every run.

Two splits, nested:
  * album level: a fraction of albums is `test`; none of their reviews or
    tracks is seen in training (what the upload page faces);
  * review level: of the other albums' reviews, a fraction is `dev` (the
    paper's 10% of album-review matches); the rest is `train`.

Training carves a third, `validation`, from the `train` reviews at run time
(`in_validation`, `config.eval.validation_fraction`): model selection reads
it, so dev and test only report.

A hash of (salt, id) decides, so an item's split never depends on file order,
on the other items, or on the run.
"""

import hashlib

import numpy as np

TRAIN, DEV, TEST = 'train', 'dev', 'test'
VALIDATION = 'validation'
REVIEW_SPLITS = (TRAIN, DEV, TEST)


def hash_unit(key: str, salt: str) -> float:
  """A stable pseudo-random number in [0, 1) for `key`."""
  digest = hashlib.blake2b(f'{salt}\x00{key}'.encode('utf-8'),
                           digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def album_split(amazon_id: str, test_fraction: float, salt: str) -> str:
  """`test` for albums held out entirely, else `train`."""
  return TEST if hash_unit('album:' + amazon_id, salt) < test_fraction else TRAIN


def review_split(review_id: str, album_split_: str, dev_fraction: float,
                 salt: str) -> str:
  """`test` if the album is held out, else `dev` or `train` by review hash."""
  if album_split_ == TEST:
    return TEST
  return DEV if hash_unit('review:' + review_id, salt) < dev_fraction else TRAIN


def in_validation(review_ids, fraction: float, salt: str) -> np.ndarray:
  """(N,) bool: which training reviews (ids as str or bytes) are held out
  of training for model selection, by review hash (salted apart from the
  dev split's draw, so the two are independent)."""
  if fraction <= 0:
    return np.zeros(len(review_ids), bool)
  return np.fromiter(
      (hash_unit('validation:' + (i.decode() if isinstance(i, bytes) else i),
                 salt) < fraction for i in review_ids), bool,
      count=len(review_ids))
