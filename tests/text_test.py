"""Tokenizer and vocabulary."""

import collections

import numpy as np
import pytest

from mardjax.data import text


@pytest.mark.parametrize('raw,words', [
    ('Great ALBUM!!! 5/5', ['great', 'album', '5', '5']),
    ("Don't miss it, it's rock'n'roll", ["don't", 'miss', 'it', "it's",
                                        "rock'n'roll"]),
    ('&quot;Best&quot; record &amp; more', ['best', 'record', 'more']),
    ('Björk — Homogénic', ['björk', 'homogénic']),
    ('it’s great', ["it's", 'great']),
    ('snake_case and dashes-between', ['snake', 'case', 'and', 'dashes',
                                       'between']),
    ('   \n\t ', []),
])
def test_tokenize(raw, words):
  assert text.tokenize(raw) == words


def test_vocabulary_order_ties_min_count_and_size():
  counts = collections.Counter({'b': 3, 'a': 3, 'c': 5, 'd': 1, 'e': 2})
  v = text.Vocabulary.from_counts(counts, size=3, min_count=2)
  # Most frequent first; ties alphabetical; 'd' is below min_count.
  assert v.words == ['<pad>', '<unk>', 'c', 'a', 'b']
  assert len(v) == 5
  v_all = text.Vocabulary.from_counts(counts, size=100, min_count=1)
  assert v_all.words[2:] == ['c', 'a', 'b', 'e', 'd']
  with pytest.raises(ValueError):
    text.Vocabulary.from_counts(counts, size=0)


def test_encode_truncates_keeps_full_length_and_maps_unknown():
  v = text.Vocabulary(['<pad>', '<unk>', 'good', 'album'])
  ids, full = v.encode(['good', 'album', 'zzz', 'good'], max_len=3)
  np.testing.assert_array_equal(ids, [2, 3, text.UNK_ID])
  assert ids.dtype == np.int32 and full == 4
  ids, full = v.encode([], max_len=3)
  assert ids.shape == (0,) and full == 0
  assert v.decode([2, 3, 0, 0]) == ['good', 'album']


def test_save_load_round_trip_and_stable_hash(tmp_path):
  v = text.Vocabulary.from_counts(collections.Counter('abcabcaab'), 10)
  h1 = v.save(str(tmp_path / 'v1.txt'))
  h2 = text.Vocabulary.load(str(tmp_path / 'v1.txt')).save(
      str(tmp_path / 'v2.txt'))
  assert h1 == h2
  assert text.Vocabulary.load(str(tmp_path / 'v2.txt')).words == v.words


def test_bad_vocabularies_are_rejected():
  with pytest.raises(ValueError):
    text.Vocabulary(['a', 'b'])
  with pytest.raises(ValueError):
    text.Vocabulary(['<pad>', '<unk>', 'a', 'a'])
