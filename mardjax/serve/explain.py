"""Why the room answers what it answers: the words and sounds behind a match.

Every explanation is leave-one-out, computed with the served model itself:
an input part (a distinct word of a review or a query, or a group of
descriptors of a recording) is taken out, the input embedded again, and the
part's weight is how much the similarity (cosine) to the matched item falls.
A positive weight pulled the two together; a negative one pushed them apart.
All the variants of one input are embedded in one program call.

Taking a word out removes each of its occurrences; taking a descriptor group
out sets its values to the training mean (0 in standardised units). When
nothing of a text is left without a word, its weight is the whole similarity:
an empty text has no direction. Where the run reads texts through its
evidence-gated query rule (`word_evidence`), the variants are read through
it too: a word the rule cuts moved nothing and weighs 0.
"""

import functools
import re
from typing import Any, Sequence

import jax
import numpy as np

from mardjax.data import descriptors as desc_lib
from mardjax.data import text as text_lib
from mardjax.models import embed

# Descriptor groups, by AcousticBrainz path (first prefix that matches):
# what a listener would name. A path no entry matches is its own group.
GROUPS = (
    ('timbre (MFCC means)', ('lowlevel.mfcc.mean', 'lowlevel.gfcc.mean')),
    ('timbre variation (MFCC covariance)', ('lowlevel.mfcc.',
                                            'lowlevel.gfcc.')),
    ('brightness (spectral shape)', ('lowlevel.spectral_', 'lowlevel.hfc',
                                     'lowlevel.pitch_salience')),
    ('noisiness (zero crossings, dissonance)', ('lowlevel.zerocrossingrate',
                                                'lowlevel.dissonance')),
    ('band energies (Bark, mel, ERB)', ('lowlevel.barkbands',
                                        'lowlevel.melbands',
                                        'lowlevel.erbbands')),
    ('loudness and dynamics', ('lowlevel.average_loudness',
                               'lowlevel.dynamic_complexity',
                               'lowlevel.loudness', 'lowlevel.silence_rate')),
    ('rhythm and tempo', ('rhythm.',)),
    ('tonal and key', ('tonal.',)),
)
# Words and groups listed per item, strongest first.
TOP_WORDS = 8
TOP_GROUPS = 5
# A group's values shown: those furthest from the training mean.
GROUP_VALUES = 3
# Variants embedded per call are padded to one of a few sizes (powers of
# two from this), so that a handful of compiled programs serves every text.
_MIN_ROWS = 16


def group_of(name: str) -> str:
  """A descriptor value's group, from its name (`lowlevel.mfcc.cov[0,1]`)."""
  for group, prefixes in GROUPS:
    if name.startswith(prefixes):
      return group
  return re.sub(r'(\.(' + '|'.join(desc_lib.STATS) + r'))?(\[[\d,]*\])?$',
                '', name)


def _bucket(n: int, floor: int) -> int:
  return max(floor, 1 << (n - 1).bit_length())


class Explainer:
  """Leave-one-out explanations for one served model (`embedder.Embedder`).

  Args:
    embedder: the served model, its vocabulary and descriptor statistics.
  """

  def __init__(self, embedder):
    self.embedder = embedder
    self.max_len = embedder.config.data.max_len
    self.words_available = embedder.text_encoder is None
    self.groups = [group_of(n) for n in embedder.names]
    self.group_names = list(dict.fromkeys(self.groups))
    index = {g: i for i, g in enumerate(self.group_names)}
    self.group_index = np.array([index[g] for g in self.groups])
    # The mean encoder's pooling is a (weighted) mean of word vectors: a
    # text without a word is the sums less that word's share, so only the
    # branch's head runs per variant (`_pooled_without_each_word`).
    model = embedder.model
    self.table = None
    if self.words_available and model.text_encoder == 'mean':
      self.table = np.asarray(embedder.variables['params']['text_features'][
          'embed']['embedding'])
      self.weighted = model.pooling == 'idf'

  # Words.

  def _token_ids(self, words: Sequence[str]) -> np.ndarray:
    ids, _ = self.embedder.vocab.encode(words, self.max_len)
    return ids

  def _embed_token_rows(self, rows: np.ndarray, lengths: np.ndarray
                        ) -> np.ndarray:
    """(R, max_len) token ids + (R,) lengths -> (R, E), in one call.

    Rows and positions are both padded to one power of two, b (positions
    to at most max_len): a text of n tokens has at most n + 1 variants, so
    one b serves both, and a handful of programs every text
    (`warm_up`). A short text costs what its length does: the encoders
    read each row up to its length only, so the answer is the one at
    max_len positions.
    """
    r = rows.shape[0]
    size = _bucket(max(r, int(lengths.max())), _MIN_ROWS)
    width = min(self.max_len, size)
    tokens = np.zeros((size, width), np.int32)
    tokens[:r] = rows[:, :width]
    lens = np.ones(size, np.int32)
    lens[:r] = lengths
    e = self.embedder
    return np.asarray(embed.text(e.model, e.variables, tokens, lens))[:r]

  def _head_rows(self, pooled: np.ndarray) -> np.ndarray:
    """(R, D) pooled word vectors -> (R, E) through the text branch's head,
    rows padded to a power of two; one call."""
    r = pooled.shape[0]
    rows = np.zeros((_bucket(r, _MIN_ROWS), pooled.shape[1]), np.float32)
    rows[:r] = pooled
    e = self.embedder
    return np.asarray(_text_head(e.model, e.variables, rows))[:r]

  def warm_up(self) -> None:
    """Compiles the programs the word weights use (one per size), so that
    the first explained answers do not wait for them."""
    if not self.words_available:
      return
    size = _MIN_ROWS
    while True:  # Up to max_len + 1 rows: a text of max_len distinct words.
      if self.table is not None:
        self._head_rows(np.zeros((size, self.table.shape[1] - self.weighted),
                                 np.float32))
      else:
        self._embed_token_rows(np.zeros((size, self.max_len), np.int32),
                               np.ones(size, np.int32))
      if size >= self.max_len + 1:
        break
      size *= 2

  def _pooled_without_each_word(self, ids: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray,
                                           np.ndarray]:
    """The mean encoder's pooled vectors of `_without_each_word`'s rows,
    from the text's sums (in float64): (words (U,), (U + 1, D) pooled
    vectors, (U + 1,) lengths)."""
    words = np.unique(ids[ids > text_lib.UNK_ID])
    counts = (ids[None, :] == words[:, None]).sum(1)  # (U,)
    rows = self.table[ids].astype(np.float64)  # (n, D [+ score])
    own = self.table[words].astype(np.float64)  # (U, D [+ score])
    if self.weighted:  # Softmax of each word's score over the text's words.
      top = rows[:, -1].max() if len(ids) else 0.0
      mass, own_mass = np.exp(rows[:, -1] - top), np.exp(own[:, -1] - top)
      rows, own = rows[:, :-1], own[:, :-1]
    else:
      mass, own_mass = np.ones(len(ids)), np.ones(len(words))
    total, weight = mass @ rows, mass.sum()
    sums = np.concatenate([total[None], total - (counts * own_mass)[:, None]
                           * own])
    weights = np.concatenate([[weight], weight - counts * own_mass])
    lengths = np.concatenate([[len(ids)], len(ids) - counts])
    pooled = sums / np.where(lengths > 0, weights, 1.0)[:, None]
    return words, pooled.astype(np.float32), lengths

  def _without_each_word(self, ids: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids (n,) of a text -> (its distinct known words (U,), (U + 1, max_len)
    rows: the text, then the text without each word, (U + 1,) lengths)."""
    words, keep = _word_variants(ids)
    # Each row's kept tokens moved to its front, in order (stable sort).
    order = np.argsort(~keep, axis=1, kind='stable')
    lengths = keep.sum(1).astype(np.int32)
    rows = np.zeros((len(words) + 1, self.max_len), np.int32)
    packed = ids[order]
    packed[np.arange(len(ids))[None, :] >= lengths[:, None]] = 0
    rows[:, :len(ids)] = packed
    return words, rows, lengths

  def _gated_without_each_word(self, ids: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's evidence-gated reading (`word_evidence.queries`, what
    the room served) of the text and of the text without each word, from
    the text's weighted sums (in float64): (words (U,), (U + 1, E) unit
    queries, (U + 1,) lengths). A variant whose every remaining word is cut
    reads them all, as the served query does."""
    vectors, weights = self.embedder.gated
    words, keep = _word_variants(ids)
    rows = vectors[ids].astype(np.float64)  # (n, E)
    w = weights[ids].astype(np.float64)
    gated = (keep * w) @ rows
    plain = keep.astype(np.float64) @ rows
    # Exactly 0 where every kept word weighs 0 (weights are >= 0).
    q = np.where((keep * w).sum(1, keepdims=True) > 0, gated, plain)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return words, q.astype(np.float32), keep.sum(1)

  def _word_weights(self, ids: np.ndarray, targets: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(distinct known words (U,), (U, T) weights against each of the
    (T, E) unit targets)."""
    if self.embedder.gated is not None:  # The run's query rule.
      words, emb, lengths = self._gated_without_each_word(ids)
    elif self.table is not None:
      words, pooled, lengths = self._pooled_without_each_word(ids)
      emb = self._head_rows(pooled)
    else:
      words, rows, lengths = self._without_each_word(ids)
      emb = self._embed_token_rows(rows, np.maximum(lengths, 1))
    sims = emb @ targets.T  # (U + 1, T)
    # Nothing left without the word: the text had no other direction.
    sims[1:][lengths[1:] == 0] = 0.0
    return words, sims[0][None, :] - sims[1:]

  def review_words(self, text: str | None, body_start: int,
                   query: np.ndarray, excerpt_chars: int) -> dict[str, Any]:
    """Why a review matched a query embedding (E,): its words' weights and
    an excerpt around the strongest ones.

    Args:
      text: the review as the export keeps it (summary line, then body).
      body_start: where the body starts in it: the word encoders read the
        body only (`ingest`).
      query: (E,) the query's unit embedding.
      excerpt_chars: the excerpt's length.

    Returns:
      {'why': [{'word', 'weight'}] strongest first, or None with
      'why_unavailable'; 'excerpt'; 'highlights': [[start, end]] in the
      excerpt of the shown words that pulled it towards the query}.
    """
    if not text:
      return {'why': None, 'why_unavailable': 'the review text is missing',
              'excerpt': '', 'highlights': []}
    shown, _ = text_lib.word_spans(text)
    if not self.words_available:
      return dict(_excerpt(shown, [], excerpt_chars), why=None,
                  why_unavailable='a pretrained text encoder reads word '
                  'pieces in context: leaving one word out is not defined '
                  'for it')
    body = text[body_start:]
    body_shown, spans = text_lib.word_spans(body)
    offset = len(shown) - len(body_shown)
    tokens = text_lib.tokenize(body)[:self.max_len]  # What the model read.
    words, weights = self._word_weights(self._token_ids(tokens),
                                        query[None, :])
    why = _ranked(self.embedder.vocab.words, words, weights[:, 0], TOP_WORDS)
    pulled = {w['word'] for w in why if w['weight'] > 0}
    marks = [(s + offset, e + offset) for w, (s, e) in zip(tokens, spans)
             if w in pulled]
    return dict(_excerpt(shown, marks, excerpt_chars), why=why)

  def query_words(self, text: str, targets: np.ndarray
                  ) -> tuple[list[list[dict[str, Any]]], list[str]]:
    """Why each of (T, E) targets matched a typed query: per target its
    words' weights, strongest first; and the query's words the vocabulary
    does not know."""
    words = text_lib.tokenize(text)
    unknown = sorted({w for w in words[:self.max_len]
                      if self.embedder.vocab.encode([w], 1)[0][0]
                      == text_lib.UNK_ID})
    if not self.words_available:
      return [None] * len(targets), unknown
    ids = self._token_ids(words)
    found, weights = self._word_weights(ids, targets)
    return [_ranked(self.embedder.vocab.words, found, weights[:, t],
                    TOP_WORDS) for t in range(len(targets))], unknown

  # Sounds.

  def sound_groups(self, raw: np.ndarray, z: np.ndarray, targets: np.ndarray
                   ) -> list[list[dict[str, Any]]]:
    """Why each of (T, E) targets matched a recording's (F,) raw and
    standardised descriptors: per target, the groups by weight (each set
    to its training mean in turn), with the recording's own values of the
    group furthest from the mean, in training standard deviations."""
    g = len(self.group_names)
    variants = np.repeat(z[None, :], g + 1, 0)
    variants[1:][self.group_index[None, :] == np.arange(g)[:, None]] = 0.0
    emb = self.embedder.embed_audio(variants)
    sims = emb @ targets.T  # (G + 1, T)
    weights = sims[0][None, :] - sims[1:]
    values = []
    for i in range(g):
      members = np.flatnonzero(self.group_index == i)
      far = members[np.argsort(-np.abs(z[members]), kind='stable')][
          :GROUP_VALUES]
      values.append([{'name': self.embedder.names[j],
                      'value': _finite(raw[j]), 'sd': _finite(z[j])}
                     for j in far])
    out = []
    for t in range(len(targets)):
      order = np.argsort(-weights[:, t], kind='stable')[:TOP_GROUPS]
      out.append([{'group': self.group_names[i],
                   'weight': _finite(weights[i, t]), 'values': values[i]}
                  for i in order])
    return out


def _word_variants(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """ids (n,) of a text -> (its distinct known words (U,), (U + 1, n) the
  tokens each variant keeps: all, then all but each word's)."""
  words = np.unique(ids[ids > text_lib.UNK_ID])
  return words, np.concatenate([np.ones((1, len(ids)), bool),
                                ids[None, :] != words[:, None]])


def _head(module, pooled: jax.Array) -> jax.Array:
  return module.text_head(pooled, False)


@functools.partial(jax.jit, static_argnums=0)
def _text_head(model, variables: dict[str, Any], pooled: jax.Array
               ) -> jax.Array:
  """(R, D) pooled word vectors -> (R, E) unit text embeddings: the text
  branch of `model` after its pooling."""
  return model.apply(variables, pooled, method=_head)


def _finite(x) -> float:
  x = float(x)
  return round(x, 6) if np.isfinite(x) else 0.0


def _ranked(vocab_words: Sequence[str], ids: np.ndarray, weights: np.ndarray,
            top: int) -> list[dict[str, Any]]:
  """The `top` words by |weight| (ties: the first word id), signed."""
  order = np.argsort(-np.abs(weights), kind='stable')[:top]
  return [{'word': vocab_words[ids[i]], 'weight': _finite(weights[i])}
          for i in order]


def _excerpt(text: str, marks: list[tuple[int, int]], chars: int
             ) -> dict[str, Any]:
  """At most `chars` characters of `text` (about) around the densest of
  its marked words, cut at spaces, with the marks inside it moved to the
  excerpt's offsets."""
  if len(text) <= chars:
    start, end = 0, len(text)
  else:
    # The window that holds the most marks, starting at one of them.
    starts = [s for s, _ in marks] or [0]
    best = max(starts, key=lambda s: sum(s <= a < s + chars
                                         for a, _ in marks))
    start = max(0, min(best - chars // 4, len(text) - chars))
    end = start + chars
    if start:
      cut = text.find(' ', start, start + 40)
      start = cut + 1 if cut >= 0 else start
    if end < len(text):
      cut = text.rfind(' ', end - 40, end)
      end = cut if cut > start else end
  excerpt = ('…' if start else '') + text[start:end] + (
      '…' if end < len(text) else '')
  shift = start - (1 if start else 0)
  return {'excerpt': excerpt,
          'highlights': [[a - shift, b - shift] for a, b in marks
                         if a >= start and b <= end]}
