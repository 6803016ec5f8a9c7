"""Deterministic splits by hashing ids: the same split on every run.

Two splits, nested:
  * album level: a fraction of albums is `test`; none of their reviews or
    tracks is seen in training (what the upload page faces);
  * review level: of the other albums' reviews, a fraction is `dev` (the
    paper's 10% of album-review matches); the rest is `train`.

A hash of (salt, id) decides, so an item's split never depends on file order,
on the other items, or on the run.
"""

import hashlib

TRAIN, DEV, TEST = 'train', 'dev', 'test'
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
