"""A suite of MARD-format corpora (`--mode=suite`): one config trained on
every corpus with several seeds, beside the baselines on the same splits.

A recipe chosen on one corpus learns that corpus's habits. Real catalogues
differ in ways that decide which recipe wins: how many albums have a single
review, how often reviews name the artist, the album or its songs (words a
new album never shares), how much of a review is off-topic, how many albums
hold one track, how closely the words follow the sound. `CORPORA` spans
those (`mardjax.data.synth.Style`) at 400 to 9,000 albums.

For each corpus of `config.suite.corpora` (default: all): the corpus is
generated and preprocessed under `WORKDIR/<corpus>/`; for each seed of
`config.suite.seeds` the launch config trains there (seed = that seed) and
its model is evaluated on dev and test (both with 95% bootstrap intervals,
`evaluate.evaluate_checkpoint`); the baselines run once on each split. The
table (`WORKDIR/suite.md`, rows per corpus and split: the config's mean
recall@10 over seeds, the mean of the seeds' intervals, the best baseline
and the ratio) and every figure (`suite.json`) are written as each corpus
ends, so an interrupted suite keeps what it measured.

`config.suite.scale` multiplies every corpus's sizes (tests use a small
one); `config.suite.num_epochs` (> 0) sets each run's epochs, else the
config's `train.num_epochs` / `train.num_steps` apply.
"""

import json
import os
import time
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError

# name -> (albums, reviews, tracks, style fields). The first keeps every
# style default: the quick start's corpus at its sizes.
CORPORA = {
    'small': (2000, 9000, 10500, {}),
    # Most albums with one review and one track, as in MARD; reviews
    # rarely name the album.
    'sparse_400': (400, 1200, 900, dict(review_tail=2.2, single_track=0.6,
                                        naming=0.02)),
    # Reviews that often name the artist, the title or songs: words that
    # identify one album and that a new album never shares.
    'named_1000': (1000, 4500, 5000, dict(naming=0.3, trait=0.35)),
    # Much off-topic talk and a weak link between sound and words.
    'chatty_2000': (2000, 8000, 9000, dict(offtopic=0.35, trait=0.3,
                                           impression_noise=1.0)),
    # A strong link: reviews mostly about the sound.
    'sonic_4000': (4000, 16000, 18000, dict(trait=0.6, offtopic=0.05,
                                            impression_noise=0.35)),
    # Large and heavy-tailed, many single-track albums.
    'large_9000': (9000, 30000, 30000, dict(review_tail=1.8,
                                            single_track=0.4)),
}


def corpus_config(config: ml_collections.ConfigDict, name: str,
                  scale: float = 1.0) -> ml_collections.ConfigDict:
  """`config` generating corpus `name` (sizes times `scale`, at least two
  reviews and tracks per album), its own synthetic data."""
  albums, reviews, tracks, style = CORPORA[name]
  cfg = config.copy_and_resolve_references()
  n = max(4, int(round(albums * scale)))
  cfg.data.mard_dir = ''
  cfg.data.synth_num_albums = n
  cfg.data.synth_num_reviews = max(2 * n, int(round(reviews * scale)))
  cfg.data.synth_num_tracks = max(2 * n, int(round(tracks * scale)))
  for field, value in style.items():
    cfg.data.synth_style[field] = value
  return cfg


def _names(config: ml_collections.ConfigDict) -> list[str]:
  names = [c.strip() for c in config.suite.corpora.split(',') if c.strip()]
  unknown = sorted(set(names) - set(CORPORA))
  if unknown:
    raise UserError(f'config.suite.corpora: unknown corpora {unknown}; '
                    f'choose from {list(CORPORA)}.')
  return names or list(CORPORA)


def _seeds(config: ml_collections.ConfigDict) -> list[int]:
  try:
    seeds = [int(s) for s in config.suite.seeds.split(',') if s.strip()]
  except ValueError:
    seeds = []
  if not seeds:
    raise UserError(f'config.suite.seeds={config.suite.seeds!r}: '
                    'comma-separated whole numbers, e.g. 0,1,2.')
  return seeds


def _figures(result: dict[str, Any]) -> dict[str, Any]:
  return {k: result[k] for k in ('recall@1', 'recall@5', 'recall@10',
                                 'recall@10_ci95', 'num_queries')
          if k in result}


def run_corpus(config: ml_collections.ConfigDict, name: str, workdir: str,
               show_progress: bool = True) -> dict[str, Any]:
  """One corpus: generated, preprocessed, trained with each seed and
  evaluated on dev and test, and the baselines on both splits."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  cfg = corpus_config(config, name, config.suite.scale)
  if config.suite.num_epochs > 0:
    cfg.train.num_steps = 0
    cfg.train.num_epochs = config.suite.num_epochs
  root = os.path.join(workdir, name)
  stages.preprocess(cfg, root, show_progress=show_progress)
  data_dir = manifest_lib.data_dir_of(cfg, root)
  out = {'corpus': name, 'albums': cfg.data.synth_num_albums,
         'reviews': cfg.data.synth_num_reviews,
         'style': dict(CORPORA[name][3]), 'runs': [], 'baselines': {}}
  for seed in _seeds(config):
    start = time.time()
    run_cfg = cfg.copy_and_resolve_references()
    run_cfg.seed = seed
    run_dir = os.path.join(root, f'seed{seed}')
    logging.info('suite: %s, seed %d', name, seed)
    _, metrics = stages.train_and_evaluate(run_cfg, run_dir, data_dir)
    run = {'seed': seed, 'model_step': metrics['model_step'],
           'steps': metrics['steps'], 'selection': metrics['selection']}
    for split in ('dev', 'test'):
      run_cfg.eval.split = split
      run[split] = _figures(evaluate.evaluate_checkpoint(run_cfg, run_dir,
                                                         data_dir))
    run['seconds'] = round(time.time() - start, 1)
    out['runs'].append(run)
  for split in ('dev', 'test'):
    base_cfg = cfg.copy_and_resolve_references()
    base_cfg.eval.split = split
    rows = baselines.evaluate_baselines(base_cfg, data_dir)['baselines']
    out['baselines'][split] = {
        r['baseline']: _figures(r) for r in rows
        if 'recall@10' in r and r['baseline'] != 'random'}
  return out


def summarize(corpus: dict[str, Any], split: str) -> dict[str, Any]:
  """One table row: the config's mean recall@10 over seeds, the mean of
  its seeds' 95% intervals, the best baseline's and the ratio."""
  recalls = [r[split]['recall@10'] for r in corpus['runs']]
  cis = [r[split]['recall@10_ci95'] for r in corpus['runs']
         if 'recall@10_ci95' in r[split]]
  best_name, best = max(corpus['baselines'][split].items(),
                        key=lambda kv: kv[1]['recall@10'])
  mean = float(np.mean(recalls))
  return {'corpus': corpus['corpus'], 'split': split, 'recall@10': mean,
          'seeds': len(recalls),
          'ci95': [float(np.mean([c[0] for c in cis])),
                   float(np.mean([c[1] for c in cis]))] if cis else None,
          'best_baseline': best_name,
          'best_baseline_recall@10': best['recall@10'],
          'ratio': mean / best['recall@10'] if best['recall@10'] else None}


def _write(corpora: list[dict[str, Any]], workdir: str,
           config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  rows = [summarize(c, s) for c in corpora for s in ('dev', 'test')]
  pct = lambda x: f'{100 * x:.1f}'
  lines = [
      '# The corpus suite: review -> album recall@10 (%)', '',
      f'Seeds {config.suite.seeds}; each run\'s model is its best '
      'evaluation on held-out training reviews (or dev, as '
      '`eval.validation_fraction` says); `dev` holds reviews of training '
      'albums, `test` albums never seen in training. The interval is the '
      'mean over seeds of each seed\'s 95% bootstrap interval.', '',
      '| corpus | albums | split | config R@10 | 95% interval | best '
      'baseline | its R@10 | ratio |',
      '| --- | ---: | --- | ---: | --- | --- | ---: | ---: |']
  albums = {c['corpus']: c['albums'] for c in corpora}
  for r in rows:
    ci = (f'{pct(r["ci95"][0])}-{pct(r["ci95"][1])}' if r['ci95'] else '')
    ratio = f'{r["ratio"]:.2f}x' if r['ratio'] is not None else '-'
    lines.append(
        f'| {r["corpus"]} | {albums[r["corpus"]]:,} | {r["split"]} | '
        f'{pct(r["recall@10"])} | {ci} | {r["best_baseline"]} | '
        f'{pct(r["best_baseline_recall@10"])} | {ratio} |')
  with open(os.path.join(workdir, 'suite.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(workdir, 'suite.json'), 'w') as f:
    json.dump({'corpora': corpora, 'rows': rows}, f, indent=1)
  return rows


def run_suite(config: ml_collections.ConfigDict, workdir: str,
              show_progress: bool = True) -> dict[str, Any]:
  """Every corpus of `config.suite.corpora` (checked, with the seeds,
  before any work); returns the table's rows and the files written."""
  names, _ = _names(config), _seeds(config)
  if not config.suite.scale > 0:
    raise UserError(f'config.suite.scale={config.suite.scale}: must be > 0.')
  corpora, rows = [], []
  for name in names:
    corpora.append(run_corpus(config, name, workdir, show_progress))
    rows = _write(corpora, workdir, config)
  return {'rows': rows, 'files': [os.path.join(workdir, f)
                                  for f in ('suite.md', 'suite.json')]}
