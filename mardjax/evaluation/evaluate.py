"""Evaluation: embed albums and held-out reviews, then retrieval metrics.

Candidates are every album with audio (album embedding = the L2-normalised
mean of its tracks' embeddings, or the album LSTM's); queries are the
held-out reviews of a split (`dev`: reviews of training albums held out
review by review; `test`: reviews of albums never seen in training). The
ranking math (exact, chunked, tie-aware, bootstrap CIs) is
`mardjax.evaluation.metrics`.
"""

import json
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from mardjax import progress
from mardjax.data import input_pipeline
from mardjax.data import manifest as manifest_lib
from mardjax.data import tables
from mardjax.errors import UserError
from mardjax.evaluation import metrics
from mardjax.evaluation import word_evidence
from mardjax.models import embed
from mardjax.models import two_branch
from mardjax.train import checkpoints

DEFAULT_KS = metrics.DEFAULT_KS


def evaluate(variables: dict[str, Any], model: two_branch.TwoBranch,
             audio: tables.AudioTable, reviews: dict[str, np.ndarray],
             ks: tuple[int, ...] = DEFAULT_KS, max_tracks: int = 0,
             full: bool = False, genres: np.ndarray | None = None,
             bootstrap: int = 1000, seed: int = 0,
             rule: word_evidence.Rule | None = None) -> dict[str, Any]:
  """Retrieval metrics of held-out `reviews` against every album with audio.

  Args:
    variables, model: the trained model.
    audio: every album's tracks (candidates: albums with at least one).
    reviews: `input_pipeline.load_reviews` output of the split.
    ks: the K of recall@K.
    max_tracks: the album LSTM's tracks per album (0 for track models).
    full: also album -> review, bootstrap CIs and the per-genre breakdown
      (what --mode=eval reports); otherwise review -> album only (the
      training loop's periodic check).
    genres: (num_albums,) root genre of each album (full only).
    bootstrap: resamples for the CIs.
    seed: seeds the bootstrap.
    rule: the run's evidence-gated query rule (`word_evidence.for_run`);
      None: the model's own review embeddings.

  Returns:
    review -> album 'recall@K', 'random_recall@K', 'median_rank', 'mrr',
    'num_queries', 'num_candidates'; with `full` also 'recall@K_ci95',
    'album_to_review/...' and 'per_genre'.
  """
  if not len(reviews['album']):
    raise ValueError('No held-out reviews to evaluate.')
  albums, album_emb = embed.albums(variables, model, audio,
                                   max_tracks=max_tracks)
  review_emb = word_evidence.review_embeddings(rule, variables, model,
                                                reviews)
  out, counts = metrics.report(albums, album_emb, review_emb,
                               reviews['album'], ks, both_directions=full,
                               bootstrap=bootstrap if full else 0, seed=seed)
  if full and genres is not None:
    out['per_genre'] = per_genre(counts, genres[reviews['album']], ks)
  return out


def per_genre(counts: tuple[np.ndarray, ...], query_genres: np.ndarray,
              ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, dict[str, Any]]:
  """review -> album recall@K of the queries of each root genre."""
  out = {}
  for genre in sorted(set(query_genres.tolist())):
    sel = query_genres == genre
    out[genre or '(none)'] = {
        'num_queries': int(sel.sum()),
        **{f'recall@{k}': float(metrics.success_probability(
            *(c[sel] for c in counts), k).mean()) for k in ks}}
  return out


def dev_evaluator(config: ml_collections.ConfigDict,
                  model: two_branch.TwoBranch,
                  manifest: manifest_lib.Manifest, audio: tables.AudioTable,
                  reviews: dict[str, np.ndarray] | None = None
                  ) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """The training loop's periodic check: variables -> review -> album
  metrics on `reviews` (the training reviews held out for model selection,
  `trainer.TrainingData.validation`), or with None on the dev split (read
  once, here); with `config.eval.train_sample` > 0 also 'train_recall@K'
  on that many training reviews (a seeded sample), to tell learning from
  memorising."""
  dev = (input_pipeline.load_reviews(manifest, 'dev', config.data.max_len)
         if reviews is None else reviews)
  max_tracks = two_branch.album_tracks(config)
  sample = None
  if config.eval.train_sample:
    train = input_pipeline.load_reviews(manifest, 'train',
                                        config.data.max_len)
    pick = np.sort(np.random.default_rng(config.seed).permutation(
        len(train['album']))[:config.eval.train_sample])
    sample = {k: v[pick] for k, v in train.items()}

  def evaluator(variables):
    out = evaluate(variables, model, audio, dev, max_tracks=max_tracks)
    if sample is not None:
      seen = evaluate(variables, model, audio, sample, max_tracks=max_tracks)
      out.update({f'train_{k}': v for k, v in seen.items()
                  if k.startswith('recall@')})
    return out

  return evaluator


def rule_summary(rule: word_evidence.Rule) -> dict[str, Any]:
  """What a report says of the run's query rule: its cut (0: off) and the
  selection split's recall@10 at each cut tried."""
  return {'k': rule.k, 'selection_recall@10': rule.selection}


def with_query_rule(config: ml_collections.ConfigDict, workdir: str,
                    data_dir: str, metrics: dict[str, Any]
                    ) -> dict[str, Any]:
  """A training run's metrics with its dev figures read through the
  evidence-gated query rule, fitted now on the run's model
  (`word_evidence.for_run`), and 'query_rule' (`rule_summary`); the
  metrics as they are when the config lists no cut."""
  manifest = manifest_lib.load(data_dir)
  trained = checkpoints.load_for_inference(config, workdir, manifest)
  audio = input_pipeline.load_audio_table(manifest)
  rule = word_evidence.for_run(config, workdir, trained, audio)
  if rule is None:
    return metrics
  if not rule.k:  # The model's own query: the dev figures already given.
    return dict(metrics, query_rule=rule_summary(rule))
  dev = input_pipeline.load_reviews(manifest, 'dev', config.data.max_len)
  out = evaluate(trained.variables, trained.model, audio, dev,
                 max_tracks=two_branch.album_tracks(config), rule=rule)
  logging.info('step %d (the model, cut %g) dev %s', trained.step, rule.k,
               json.dumps(out))
  return dict(metrics, **out, query_rule=rule_summary(rule))


def load_genres(manifest: manifest_lib.Manifest) -> np.ndarray:
  """(num_albums,) root genre of each album, from albums.jsonl."""
  genres = np.full(manifest.counts.albums, '', object)
  for index, album in manifest_lib.read_albums(manifest).items():
    genres[index] = album.get('genre') or ''
  return genres


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                        data_dir: str | None = None) -> dict[str, Any]:
  """Full evaluation of the run's model: its best-by-recall checkpoint
  when it kept one (what training reports, export and serving use), else
  its newest readable checkpoint.

  Split `config.eval.split`: both directions, bootstrap CIs, per-genre
  recall (`evaluate(full=True)`); the numbers also go to TensorBoard under
  `workdir/eval`. The records: `data_dir`, else the run's
  (`manifest.data_dir_of`).
  """
  split = config.eval.split
  if split not in ('dev', 'test'):
    raise UserError(f"config.eval.split={split!r}: choose 'dev' or 'test'.")
  manifest = manifest_lib.load(data_dir or
                               manifest_lib.data_dir_of(config, workdir))
  checkpoints.require_checkpoints(workdir)  # Before minutes of loading.
  reviews = input_pipeline.load_reviews(manifest, split, config.data.max_len)
  if not len(reviews['album']):
    raise UserError(f'The {split!r} split holds no held-out reviews '
                    f'(manifest counts: {manifest.counts.reviews}); '
                    'choose another config.eval.split or preprocess with a '
                    'larger config.data.dev_fraction / test_album_fraction.')
  trained = checkpoints.load_for_inference(config, workdir, manifest)
  audio = input_pipeline.load_audio_table(manifest)
  rule = word_evidence.for_run(config, workdir, trained, audio)
  start = time.time()
  result = evaluate(
      trained.variables, trained.model, audio, reviews,
      max_tracks=two_branch.album_tracks(config), full=True,
      genres=load_genres(manifest), bootstrap=config.eval.bootstrap,
      seed=config.seed, rule=rule)
  if rule is not None:
    result['query_rule'] = rule_summary(rule)
  result = dict(result, step=trained.step, split=split,
                checkpoint=trained.source,
                eval_seconds=round(time.time() - start, 2))
  if jax.process_index() == 0:
    writer = progress.metric_writer(os.path.join(workdir, 'eval'))
    writer.write_scalars(trained.step, {
        f'{split}/{k}': v for k, v in result.items()
        if isinstance(v, (int, float))})
    writer.flush()
  return result
