"""Word-level tokenizer and vocabulary, fitted on training reviews only.

Ids: 0 is padding, 1 is unknown, then the `vocab_size` most frequent training
words, most frequent first (ties broken alphabetically, so the vocabulary is the
same on every run).
"""

import collections
import hashlib
import html
import re
from typing import Iterable

import numpy as np

PAD, UNK = '<pad>', '<unk>'
PAD_ID, UNK_ID = 0, 1
# Words are runs of letters/digits (any script), with inner apostrophes kept
# ("don't", "rock'n'roll"); underscores and punctuation split words.
_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def tokenize(text: str) -> list[str]:
  """Lower-cased words of a review; HTML entities (&quot;) are decoded."""
  return _WORD_RE.findall(html.unescape(text).lower().replace('’', "'"))


def word_spans(text: str) -> tuple[str, list[tuple[int, int]]]:
  """(the text as read, HTML entities decoded; (start, end) in it of each
  of `tokenize`'s words), or no spans where lower-casing moves them (a
  few letters lower-case to two characters)."""
  shown = html.unescape(text)
  spans = [m.span() for m in _WORD_RE.finditer(shown)]
  if len(spans) != len(tokenize(text)):
    return shown, []
  return shown, spans


class Vocabulary:
  """Maps words to ids and back.

  Attributes:
    words: list of words; words[i] has id i (words[0] = PAD, words[1] = UNK).
  """

  def __init__(self, words: list[str]):
    if words[:2] != [PAD, UNK]:
      raise ValueError('A vocabulary starts with <pad>, <unk>.')
    if len(set(words)) != len(words):
      raise ValueError('A vocabulary repeats a word.')
    self.words = words
    self._ids = {w: i for i, w in enumerate(words)}

  @classmethod
  def from_counts(cls, counts: collections.Counter, size: int,
                  min_count: int = 1) -> 'Vocabulary':
    """The `size` most frequent words seen at least `min_count` times."""
    if size <= 0:
      raise ValueError(f'vocab_size must be positive, got {size}.')
    ranked = sorted((w for w, c in counts.items() if c >= min_count),
                    key=lambda w: (-counts[w], w))
    return cls([PAD, UNK] + ranked[:size])

  def __len__(self) -> int:
    return len(self.words)

  def encode(self, tokens: Iterable[str], max_len: int
             ) -> tuple[np.ndarray, int]:
    """Ids of the first `max_len` tokens.

    Returns:
      (ids, full_length): int32 array of shape (min(len(tokens), max_len),)
      and the number of tokens before truncation.
    """
    tokens = list(tokens)
    ids = np.fromiter((self._ids.get(t, UNK_ID) for t in tokens[:max_len]),
                      dtype=np.int32)
    return ids, len(tokens)

  def decode(self, ids: Iterable[int]) -> list[str]:
    return [self.words[i] for i in ids if i != PAD_ID]

  def save(self, path: str) -> str:
    """Writes one word per line; returns the file's sha256."""
    data = ('\n'.join(self.words) + '\n').encode('utf-8')
    with open(path, 'wb') as f:
      f.write(data)
    return hashlib.sha256(data).hexdigest()

  @classmethod
  def load(cls, path: str) -> 'Vocabulary':
    with open(path, encoding='utf-8') as f:
      return cls(f.read().split('\n')[:-1])
