"""Deterministic, nested splits."""

import random

import numpy as np

from mardjax.data import splits


def test_hash_unit_is_stable_and_uniform():
  assert splits.hash_unit('x', 's') == splits.hash_unit('x', 's')
  assert splits.hash_unit('x', 's') != splits.hash_unit('x', 't')
  values = [splits.hash_unit(str(i), 's') for i in range(20000)]
  assert 0 <= min(values) and max(values) < 1
  assert abs(sum(v < 0.1 for v in values) / 20000 - 0.1) < 0.01


def test_splits_do_not_depend_on_order_or_run():
  ids = [f'B{i:09d}' for i in range(2000)]
  first = {i: splits.album_split(i, 0.1, 'salt') for i in ids}
  shuffled = ids[:]
  random.Random(0).shuffle(shuffled)
  assert {i: splits.album_split(i, 0.1, 'salt') for i in shuffled} == first
  assert 150 < sum(s == 'test' for s in first.values()) < 250


def test_review_split_is_nested_in_album_split():
  assert splits.review_split('r1', splits.TEST, 0.99, 's') == splits.TEST
  dev = sum(splits.review_split(f'B1/A{i}', splits.TRAIN, 0.1, 's') ==
            splits.DEV for i in range(5000))
  assert 400 < dev < 600
  assert splits.review_split('B1/A1', splits.TRAIN, 0.0, 's') == splits.TRAIN


def test_fractions_are_half_open(monkeypatch):
  # [0, fraction): a fraction of 0 holds nothing out, even an id whose hash
  # is exactly 0, and an id hashed exactly at the fraction stays in train.
  for value, fraction in ((0.0, 0.0), (0.25, 0.25)):
    monkeypatch.setattr(splits, 'hash_unit', lambda *_, v=value: v)
    assert splits.album_split('B1', fraction, 's') == splits.TRAIN
    assert splits.review_split('r1', splits.TRAIN, fraction, 's') == \
        splits.TRAIN
  monkeypatch.setattr(splits, 'hash_unit', lambda *_: 0.2499)
  assert splits.album_split('B1', 0.25, 's') == splits.TEST
  assert splits.review_split('r1', splits.TRAIN, 0.25, 's') == splits.DEV
  assert splits.in_validation(['r1'], 0.25, 's').tolist() == [True]
  monkeypatch.setattr(splits, 'hash_unit', lambda *_: 0.25)
  assert splits.in_validation(['r1'], 0.25, 's').tolist() == [False]


def test_validation_is_a_stable_draw_apart_from_the_dev_split():
  ids = [f'B{i % 300:04d}/A{i:07d}' for i in range(6000)]
  held = splits.in_validation(ids, 0.1, 's')
  assert held.dtype == bool and held.shape == (6000,)
  assert 500 < held.sum() < 700
  # The same answer for bytes ids (as records hold them), in any order.
  np.testing.assert_array_equal(
      splits.in_validation([i.encode() for i in ids], 0.1, 's'), held)
  order = np.random.default_rng(0).permutation(6000)
  np.testing.assert_array_equal(
      splits.in_validation([ids[j] for j in order], 0.1, 's'), held[order])
  # Its own draw: not the dev split's reviews, nor another salt's.
  dev = np.array([splits.review_split(i, splits.TRAIN, 0.1, 's') ==
                  splits.DEV for i in ids])
  assert 0 < (held & dev).sum() < 0.03 * len(ids)
  assert (splits.in_validation(ids, 0.1, 't') != held).sum() > 500
  assert not splits.in_validation(ids, 0.0, 's').any()
  assert splits.in_validation(ids, 0.9999999, 's').all()
  assert splits.in_validation([], 0.1, 's').shape == (0,)
