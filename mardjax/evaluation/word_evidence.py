"""Evidence-gated review queries: a review read through the words whose use
in the training reviews follows the albums' sound.

Most of a review's words say nothing about how the album sounds ('great',
'shipping', 'the'), and in the mean of its word vectors they drown the few
that do. A word's evidence comes from the training data alone, not from the
model: with x_a an album's mean track descriptors, standardised over the
training albums (the D columns that vary), and the n training albums whose
reviews use the word,

    score(word) = n * ||mean of x_a over those albums||^2 / D,

about 1 for a word whose use is independent of the sound (the mean of n
random standardised rows has squared norm D / n), and large for a word that
follows it. A review's query is then, for a linear text head, the weighted
sum of its words' vectors through the head,

    query = normalise(sum over words of weight(word) * V[word]),
    weight = max(0, 1 - k / score)   (1 for words of < min_albums albums),
    V = word embedding @ head kernel, scaled as the head's BatchNorm scales
        (not shifted: the training mean it subtracts is the common words').

Words of fewer than `min_albums` training albums (names, titles, rare words)
carry too little evidence either way and keep weight 1; words of no training
album (their vectors never trained) weigh 0. A review with no word left
falls back to the unweighted sum. The cut k is chosen per run,
among `config.eval.evidence_ks` and 'off' (the model's own query), by
recall@10 on the split model selection reads, so it holds on data it was not
read from; the fitted rule is stored beside the run's model
(`RULE_FILE`) and evaluation, export and the listening room read it
(`for_run`).
"""

import json
import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from mardjax.data import tables
from mardjax.errors import UserError
from mardjax.errors import need

RULE_FILE = 'word_evidence.npz'
# BatchNorm's epsilon (flax's default, which `two_branch.Head` keeps).
_BN_EPSILON = 1e-5
# Words whose album sums are formed at once: bounds the (chunk, D) buffer.
_WORD_CHUNK = 2048
# Reviews whose (rows, max_len, E) word vectors are gathered at once.
_REVIEW_CHUNK = 512


class Rule(NamedTuple):
  """A run's fitted query rule.

  Attributes:
    albums: (V,) int64 training albums (with audio) whose reviews use each
      word.
    scores: (V,) float64 evidence of each word (`evidence`).
    k: the cut; 0 means off (the model's own query).
    min_albums: words of fewer albums keep weight 1.
    step: the model's step the cut was chosen for.
    selection: {'off' or str(k): recall@10 on the selection split}.
  """
  albums: np.ndarray
  scores: np.ndarray
  k: float
  min_albums: int
  step: int
  selection: dict[str, float]

  def weights(self, k: float | None = None) -> np.ndarray:
    """(V,) float32 weight of each word at cut `k` (default: the rule's):
    0 for words of no training album, 1 for those of fewer than
    `min_albums`, else max(0, 1 - k / score)."""
    k = self.k if k is None else k
    gated = np.maximum(0.0, 1.0 - k / np.maximum(self.scores, 1e-12))
    kept = np.where(self.albums < self.min_albums, 1.0, gated)
    return np.where(self.albums > 0, kept, 0.0).astype(np.float32)


def parse_ks(value: str) -> tuple[float, ...]:
  """'1,2,4' -> (1.0, 2.0, 4.0); '' -> () (the rule is off).

  Raises:
    UserError: a value that is not a finite number > 0.
  """
  out = []
  for part in str(value).split(','):
    if not part.strip():
      continue
    try:
      k = float(part)
    except ValueError:
      k = float('nan')
    need(np.isfinite(k) and k > 0, 'eval.evidence_ks', value,
         'comma-separated cuts, each a finite number > 0 ("" : off)')
    out.append(k)
  return tuple(out)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The rule needs a linear text head over mean-pooled words.

  Raises:
    UserError: one line naming the field.
  """
  ks = parse_ks(config.eval.evidence_ks)
  need(isinstance(config.eval.evidence_min_albums, int) and
       config.eval.evidence_min_albums >= 1, 'eval.evidence_min_albums',
       config.eval.evidence_min_albums, 'a whole number >= 1')
  if not ks:
    return
  m = config.model
  need(m.linear and m.text_encoder == 'mean' and m.pooling == 'mean',
       'eval.evidence_ks', config.eval.evidence_ks,
       'the evidence-gated query reads a linear text head over mean-pooled '
       "words (model.linear=True, text_encoder='mean', pooling='mean'); "
       "set it to '' for this model")


# The eval fields that belong to a recipe (how its model reads a review),
# not to the evaluation protocol rows and references share.
RECIPE_FIELDS = ('evidence_ks', 'evidence_min_albums')


def with_own_query(protocol: ml_collections.ConfigDict,
                   own: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the eval section `protocol` (the base config's, which a
  reference recipe or a Table 1 row is evaluated with) holding the recipe's
  own `RECIPE_FIELDS` from its eval section `own`."""
  out = protocol.copy_and_resolve_references()
  for field in RECIPE_FIELDS:
    out[field] = own[field]
  return out


def album_sound(audio: tables.AudioTable, albums: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """The standardised mean descriptors of `albums` that have tracks.

  Args:
    audio: every album's tracks.
    albums: (n,) album indices (the training albums).

  Returns:
    (row (num_albums,) int64: each album's row of the matrix, -1 for albums
    not among `albums` or without tracks; (C, D) float64 rows standardised
    per column over those albums, constant columns left out).
  """
  with_tracks, means = audio.album_means(audio.descriptors)
  keep = np.isin(with_tracks, albums)
  chosen, x = with_tracks[keep], means[keep].astype(np.float64)
  row = np.full(audio.counts.shape[0], -1, np.int64)
  row[chosen] = np.arange(len(chosen))
  if not len(chosen):
    return row, np.zeros((0, 0))
  sd = x.std(0)
  varies = sd > 1e-8 * np.maximum(1.0, np.abs(x).max(0))
  return row, (x[:, varies] - x[:, varies].mean(0)) / sd[varies]


def evidence(reviews: tables.ReviewTable, audio: tables.AudioTable,
             vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Each word's training albums and evidence score (module docstring).

  Args:
    reviews: the reviews the model trained on.
    audio: every album's tracks.
    vocab_size: V.

  Returns:
    ((V,) int64 albums with tracks whose reviews use the word, (V,) float64
    scores; 0 for words of no such album).
  """
  row, x = album_sound(audio, np.unique(reviews.album))
  word, album_row = tables.word_albums(reviews, row, vocab_size)
  albums = np.bincount(word, minlength=vocab_size).astype(np.int64)
  scores = np.zeros(vocab_size)
  if not x.size:
    return albums, scores
  # `pairs` are sorted by album row first; by word for the segment sums.
  order = np.argsort(word, kind='stable')
  word, album_row = word[order], album_row[order]
  starts = np.searchsorted(word, np.arange(vocab_size + 1))
  for lo in range(0, vocab_size, _WORD_CHUNK):
    hi = min(vocab_size, lo + _WORD_CHUNK)
    used = np.flatnonzero(albums[lo:hi]) + lo
    if not len(used):
      continue
    sums = np.add.reduceat(x[album_row[starts[lo]:starts[hi]]],
                           starts[used] - starts[lo], axis=0)
    scores[used] = (sums * sums).sum(1) / (albums[used] * x.shape[1])
  return albums, scores


def word_vectors(variables: dict[str, Any]) -> np.ndarray:
  """(V, E) float32: each word's vector through the linear text head,
  scaled as its BatchNorm scales, neither centred nor shifted."""
  params = variables['params']
  table = np.asarray(params['text_features']['embed']['embedding'],
                     np.float64)
  out = table @ np.asarray(params['text_head']['out']['kernel'], np.float64)
  if 'bn' in params['text_head']:
    var = np.asarray(variables['batch_stats']['text_head']['bn']['var'],
                     np.float64)
    out *= np.asarray(params['text_head']['bn']['scale'],
                      np.float64) / np.sqrt(var + _BN_EPSILON)
  return out.astype(np.float32)


def queries(vectors: np.ndarray, weights: np.ndarray,
            reviews: dict[str, np.ndarray]) -> np.ndarray:
  """Evidence-gated query of each review.

  Args:
    vectors: (V, E) `word_vectors`.
    weights: (V,) `Rule.weights`.
    reviews: {'tokens': (N, L), 'lengths': (N,)} (`load_reviews`).

  Returns:
    (N, E) float32 unit queries (zero for a review without words).
  """
  tokens, lengths = reviews['tokens'], reviews['lengths']
  out = np.zeros((tokens.shape[0], vectors.shape[1]), np.float32)
  for lo in range(0, tokens.shape[0], _REVIEW_CHUNK):
    t = tokens[lo:lo + _REVIEW_CHUNK]
    mask = np.arange(t.shape[1])[None, :] < lengths[lo:lo + _REVIEW_CHUNK,
                                                    None]
    w = weights[t] * mask
    # A review whose every word is cut reads all its words instead.
    w = np.where(w.sum(1, keepdims=True) > 0, w, mask.astype(np.float32))
    q = np.einsum('nl,nle->ne', w, vectors[t])
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    out[lo:lo + len(t)] = q / np.maximum(norm, 1e-12)
  return out


def review_embeddings(rule: Rule | None, variables: dict[str, Any], model,
                      reviews: dict[str, np.ndarray]) -> np.ndarray:
  """(N, E) the review queries of the run: the rule's, or the model's own
  when there is no rule or its cut is off."""
  from mardjax.models import embed  # pylint: disable=g-import-not-at-top
  if rule is None or not rule.k:
    return embed.reviews(variables, model, reviews)
  return queries(word_vectors(variables), rule.weights(), reviews)


def fit(variables: dict[str, Any], model, audio: tables.AudioTable,
        trained_on: tables.ReviewTable, selection: dict[str, np.ndarray],
        ks: tuple[float, ...], min_albums: int, step: int,
        max_tracks: int = 0) -> Rule:
  """The cut of `ks` (or off) with the best recall@10 on `selection`.

  Args:
    variables, model: the run's model.
    audio: every album's tracks.
    trained_on: the reviews the model trained on (the evidence).
    selection: the reviews model selection reads (`load_reviews` form).
    ks: the cuts tried beside off.
    min_albums: `Rule.min_albums`.
    step: the model's step.
    max_tracks: the album LSTM's tracks per album (0 for track models).

  Returns:
    The rule; ties go to off, then to the smaller cut.
  """
  from mardjax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  from mardjax.models import embed  # pylint: disable=g-import-not-at-top
  albums, scores = evidence(trained_on, audio, model.vocab_size)
  rule = Rule(albums, scores, 0.0, min_albums, step, {})
  cand, cand_emb = embed.albums(variables, model, audio,
                                max_tracks=max_tracks)
  vectors = word_vectors(variables)
  best, best_recall, recalls = 0.0, -1.0, {}
  for k in (0.0,) + tuple(sorted(ks)):
    emb = (embed.reviews(variables, model, selection) if not k else
           queries(vectors, rule.weights(k), selection))
    out, _ = metrics.report(cand, cand_emb, emb, selection['album'], (10,))
    recalls['off' if not k else f'{k:g}'] = round(out['recall@10'], 5)
    if out['recall@10'] > best_recall:  # Strictly: ties keep the earlier.
      best, best_recall = k, out['recall@10']
  return rule._replace(k=best, selection=recalls)


def save(rule: Rule, workdir: str) -> None:
  """Writes the rule beside the run's model (process 0 only)."""
  if jax.process_index():
    return
  path = os.path.join(workdir, RULE_FILE)
  with open(path + '.tmp', 'wb') as f:
    np.savez(f, albums=rule.albums, scores=rule.scores, k=rule.k,
             min_albums=rule.min_albums, step=rule.step,
             selection=json.dumps(rule.selection))
  os.replace(path + '.tmp', path)


def load(workdir: str) -> Rule | None:
  """The rule stored in `workdir`, or None when there is none.

  Raises:
    UserError: the file is there but unreadable.
  """
  path = os.path.join(workdir, RULE_FILE)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      return Rule(z['albums'], z['scores'], float(z['k']),
                  int(z['min_albums']), int(z['step']),
                  json.loads(str(z['selection'])))
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f'{path}: unreadable ({e}); delete it and it is fitted '
                    'again from the run\'s model.') from e


def for_run(config: ml_collections.ConfigDict, workdir: str, trained,
            audio: tables.AudioTable) -> Rule | None:
  """The rule of the run's model: the stored one when it was fitted for
  this step and these settings, else fitted now on the run's data (and
  stored). None when `config.eval.evidence_ks` lists no cut.

  Args:
    config, workdir: the run's.
    trained: its restored model (`checkpoints.Inference`).
    audio: every album's tracks (`input_pipeline.load_audio_table`).
  """
  ks = parse_ks(config.eval.evidence_ks)
  if not ks:
    return None
  model, manifest = trained.model, trained.manifest
  rule = load(workdir)
  wanted = {'off'} | {f'{k:g}' for k in ks}
  if (rule is not None and rule.step == trained.step and
      rule.min_albums == config.eval.evidence_min_albums and
      set(rule.selection) == wanted and
      rule.albums.shape[0] == model.vocab_size):
    return rule
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top
  # Every process's reviews: the evidence and the cut are the whole run's.
  trained_on, selection = input_pipeline.load_training_reviews(
      manifest, config.data.max_len, config.eval.validation_fraction,
      config.data.split_salt)
  if not config.eval.validation_fraction:  # Selection reads dev.
    selection = input_pipeline.load_reviews(manifest, 'dev',
                                            config.data.max_len)
  if not len(selection['album']) or not len(trained_on):
    raise UserError(
        'config.eval.evidence_ks: the evidence-gated query needs training '
        'reviews and held-out reviews to choose its cut on; this run has '
        f'{len(trained_on)} and {len(selection["album"])}. Set it to "".')
  rule = fit(trained.variables, model, audio, trained_on, selection, ks,
             config.eval.evidence_min_albums, trained.step,
             two_branch.album_tracks(config))
  logging.info('Evidence-gated query: cut %s (selection recall@10 %s)',
               rule.k or 'off', json.dumps(rule.selection))
  save(rule, workdir)
  return rule
