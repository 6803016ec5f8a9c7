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
`evaluate.evaluate_checkpoint`); so does the reference recipe
(`config.suite.reference`, the paper's by default: `reference_config`);
the baselines are fitted once, on the reviews the models train on, and
scored on both splits. The table (`WORKDIR/suite.md`, rows per corpus and
split: the config's mean recall@10 over seeds, the mean of the seeds'
intervals, the best baseline and the ratio, the reference's mean and
interval) and every figure (`suite.json`) are written as each corpus ends,
so an interrupted suite keeps what it measured.

Each run lives under `WORKDIR/<corpus>/runs/<fingerprint of its config>/`
and each corpus's baselines in `baselines-<fingerprint>.json`: a suite run
again, or another config's suite in the same workdir (the next recipe
tried), reads back every run and fit it shares (the reference's, the
baselines) instead of training it again, and an interrupted run resumes
from its checkpoints. A run made before a field was added to the configs
is read back too while that field keeps its default (`same_run`; each
run's `suite_config.json`, or its checkpoints' record, holds its fields).

`config.suite.scale` multiplies every corpus's sizes (tests use a small
one); `config.suite.num_epochs` (> 0) sets each run's epochs, else the
config's `train.num_epochs` / `train.num_steps` apply.
"""

import hashlib
import importlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from mardjax import config_check
from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.evaluation import word_evidence

# Beside each run's suite_run.json: the config it trained with.
CONFIG_FILE = 'suite_config.json'

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


def corpus_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [c.strip() for c in config.suite.corpora.split(',') if c.strip()]
  unknown = sorted(set(names) - set(CORPORA))
  if unknown:
    raise UserError(f'config.suite.corpora: unknown corpora {unknown}; '
                    f'choose from {list(CORPORA)}.')
  return names or list(CORPORA)


def seed_list(config: ml_collections.ConfigDict) -> list[int]:
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


def _digest(config: ml_collections.ConfigDict) -> str:
  """A config's fingerprint, less the suite's own fields (they shape which
  runs happen, not what one run does)."""
  cfg = config.copy_and_resolve_references()
  if 'suite' in cfg:
    with cfg.unlocked():
      del cfg['suite']
  return hashlib.sha256(cfg.to_json(sort_keys=True).encode()).hexdigest()[:12]


def _fields(config: ml_collections.ConfigDict | dict[str, Any]
            ) -> dict[str, Any]:
  """{'section.field': value} of a config (or its JSON), less the suite's
  own fields, values as JSON reads them back."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.copy_and_resolve_references().to_json())
  out = {}
  def walk(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        out[prefix + key] = value
  walk({k: v for k, v in config.items() if k != 'suite'}, '')
  return out


def same_run(stored: dict[str, Any], wanted: dict[str, Any],
             defaults: dict[str, Any]) -> bool:
  """Whether a run trained with the fields `stored` is the run the fields
  `wanted` ask for (all three `_fields` dicts): equal in every field the
  run had, and every field added to the configs since at its default
  (`defaults`, `configs.default`'s), which keeps what runs did before the
  field existed. A field the run had that the configs dropped: not the
  same (what it did may be gone)."""
  if not stored.keys() <= wanted.keys():
    return False
  return all(stored[k] == v if k in stored else
             (k in defaults and defaults[k] == v) for k, v in wanted.items())


def _default_fields() -> dict[str, Any]:
  try:
    return _fields(importlib.import_module('configs.default').get_config())
  except ImportError:  # Not run from the repository: exact matches only.
    return {}


def _run_fields(run_dir: str) -> dict[str, Any] | None:
  """The fields a finished run trained with: its `CONFIG_FILE`, else (runs
  from before the file) its checkpoints' record."""
  from mardjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  config = _read_json(os.path.join(run_dir, CONFIG_FILE))
  if config is None:
    config = checkpoints.run_config(run_dir)
  return None if config is None else _fields(config)


def _earlier_run(run_cfg: ml_collections.ConfigDict, root: str
                 ) -> dict[str, Any] | None:
  """A finished run under `root` of the run `run_cfg` asks for, made
  before a field of the configs existed (so under another fingerprint):
  adding a field at its old behaviour keeps every run trained before."""
  runs = os.path.join(root, 'runs')
  if not os.path.isdir(runs):
    return None
  wanted, defaults = _fields(run_cfg), _default_fields()
  for name in sorted(os.listdir(runs)):
    run_dir = os.path.join(runs, name)
    done = _read_json(os.path.join(run_dir, 'suite_run.json'))
    # Another seed's run is another run: its config is not read.
    if done is None or done['seed'] != run_cfg.seed:
      continue
    stored = _run_fields(run_dir)
    if stored is not None and same_run(stored, wanted, defaults):
      return done
  return None


def reference_config(base: ml_collections.ConfigDict, module: str
                     ) -> ml_collections.ConfigDict:
  """The reference recipe (`config.suite.reference`, e.g. the paper's,
  'configs.default') as the suite trains it beside `base`: its own
  model switches, loss, optimiser, schedule, budget and way of reading a
  review (`word_evidence.RECIPE_FIELDS`), with the base's
  data, evaluation, baselines, seed, model sizes and batch (as Table 1's
  rows take them: configs/test.py's in tests), and the base's settings
  that change only how fast a run goes."""
  try:
    config = importlib.import_module(module).get_config()
  except (ImportError, AttributeError) as e:
    raise UserError(f'config.suite.reference={module!r}: not a config '
                    f'module with get_config() ({e}).') from e
  for section in ('data', 'baselines', 'suite'):
    config[section] = base[section].copy_and_resolve_references()
  config.eval = word_evidence.with_own_query(base.eval, config.eval)
  config.seed = base.seed
  for field in ('word_dim', 'hidden_dim', 'embed_dim', 'lstm_dim',
                'max_tracks', 'lstm_loop'):
    config.model[field] = base.model[field]
  for field in ('batch_size', 'compute_dtype', 'parallelism',
                'steps_per_dispatch',
                'prefetch_batches', 'log_every', 'checkpoint_every',
                'keep_checkpoints'):
    config.train[field] = base.train[field]
  return config


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: dict[str, Any]) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


def train_seed(cfg: ml_collections.ConfigDict, root: str, data_dir: str,
               seed: int, name: str) -> dict[str, Any]:
  """One seed's run of `cfg` on the corpus under `root`, evaluated on dev
  and test; a run of the same config and seed done before (by this suite
  or another config's: a reference) is read back, not trained again."""
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  run_cfg = cfg.copy_and_resolve_references()
  run_cfg.seed = seed
  run_dir = os.path.join(root, 'runs', _digest(run_cfg))
  done = (_read_json(os.path.join(run_dir, 'suite_run.json'))
          or _earlier_run(run_cfg, root))
  if done is not None:
    logging.info('suite: %s, seed %d: done before (%s)', name, seed,
                 os.path.join(root, done['run_dir']))
    return done
  start = time.time()
  logging.info('suite: %s, seed %d (%s)', name, seed, run_dir)
  os.makedirs(run_dir, exist_ok=True)
  write_json(os.path.join(run_dir, CONFIG_FILE),
             json.loads(run_cfg.to_json()))
  _, metrics = stages.train_and_evaluate(run_cfg, run_dir, data_dir)
  run = {'seed': seed, 'model_step': metrics['model_step'],
         'steps': metrics['steps'], 'selection': metrics['selection'],
         'run_dir': os.path.relpath(run_dir, root)}
  for split in ('dev', 'test'):
    run_cfg.eval.split = split
    run[split] = _figures(evaluate.evaluate_checkpoint(run_cfg, run_dir,
                                                       data_dir))
  run['seconds'] = round(time.time() - start, 1)
  write_json(os.path.join(run_dir, 'suite_run.json'), run)
  return run


def corpus_baselines(cfg: ml_collections.ConfigDict, root: str,
                     data_dir: str) -> dict[str, dict[str, Any]]:
  """The baselines fitted once on the corpus and scored on dev and test
  (read back when fitted before with the same data and settings)."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  key = ml_collections.ConfigDict({
      'data': cfg.data, 'baselines': cfg.baselines, 'seed': cfg.seed,
      'validation_fraction': cfg.eval.validation_fraction,
      'bootstrap': cfg.eval.bootstrap})
  path = os.path.join(root, f'baselines-{_digest(key)}.json')
  done = _read_json(path)
  if done is None:
    rows = baselines.baselines_on_splits(cfg, data_dir, ('dev', 'test'))
    done = {split: {r['baseline']: _figures(r) for r in split_rows
                    if 'recall@10' in r and r['baseline'] != 'random'}
            for split, split_rows in rows.items()}
    write_json(path, done)
  return done


def corpus_generator_ranking(cfg: ml_collections.ConfigDict, root: str,
                             data_dir: str) -> dict[str, dict[str, Any]]:
  """recall@K of the generator's own ranking on dev and test
  (`generator_ranking`), computed once per corpus and read back."""
  from mardjax.evaluation import generator_ranking  # pylint: disable=g-import-not-at-top
  key = ml_collections.ConfigDict({'data': cfg.data, 'version': 1})
  path = os.path.join(root, f'generator-{_digest(key)}.json')
  done = _read_json(path)
  if done is None:
    done = generator_ranking.recall(data_dir, stages.mard_dir(cfg, root),
                                    ('dev', 'test'), cfg.data.max_len)
    write_json(path, done)
  return done


def corpus_run_config(config: ml_collections.ConfigDict, name: str
                      ) -> ml_collections.ConfigDict:
  """`config` on corpus `name` at the suite's scale and epochs."""
  cfg = corpus_config(config, name, config.suite.scale)
  if config.suite.num_epochs > 0:
    cfg.train.num_steps = 0
    cfg.train.num_epochs = config.suite.num_epochs
  return cfg


def run_corpus(config: ml_collections.ConfigDict, name: str, workdir: str,
               show_progress: bool = True) -> dict[str, Any]:
  """One corpus: generated, preprocessed, trained with each seed and
  evaluated on dev and test, the reference recipe likewise
  (`config.suite.reference`, unless ''), and the baselines on both
  splits."""
  cfg = corpus_run_config(config, name)
  root = os.path.join(workdir, name)
  stages.preprocess(cfg, root, show_progress=show_progress)
  data_dir = manifest_lib.data_dir_of(cfg, root)
  out = {'corpus': name, 'albums': cfg.data.synth_num_albums,
         'reviews': cfg.data.synth_num_reviews,
         'style': dict(CORPORA[name][3]), 'runs': [], 'baselines': {}}
  out['runs'] = [train_seed(cfg, root, data_dir, seed, name)
                 for seed in seed_list(config)]
  if config.suite.reference:
    ref = corpus_run_config(reference_config(config,
                                             config.suite.reference), name)
    out['reference'] = {
        'config': config.suite.reference,
        'runs': [train_seed(ref, root, data_dir, seed,
                            f'{name} ({config.suite.reference})')
                 for seed in seed_list(config)]}
  out['baselines'] = corpus_baselines(cfg, root, data_dir)
  out['generator'] = corpus_generator_ranking(cfg, root, data_dir)
  return out


def mean_over_seeds(runs: list[dict[str, Any]], split: str
                    ) -> tuple[float, list[float] | None]:
  """(mean recall@10 over the runs, the mean of their 95% intervals)."""
  recalls = [r[split]['recall@10'] for r in runs]
  cis = [r[split]['recall@10_ci95'] for r in runs
         if 'recall@10_ci95' in r[split]]
  ci = ([float(np.mean([c[0] for c in cis])),
         float(np.mean([c[1] for c in cis]))] if cis else None)
  return float(np.mean(recalls)), ci


def half_width(ci: list[float] | None) -> float:
  """Half the width of a (low, high) interval; 0 without one."""
  return (ci[1] - ci[0]) / 2 if ci else 0.0


def summarize(corpus: dict[str, Any], split: str) -> dict[str, Any]:
  """One table row: the config's mean recall@10 over seeds, the mean of
  its seeds' 95% intervals, the best baseline's and the ratio; with a
  reference recipe, its mean and interval too, and whether the config is
  at most the half width of the reference's interval below it
  ('within_reference')."""
  mean, ci = mean_over_seeds(corpus['runs'], split)
  best_name, best = max(corpus['baselines'][split].items(),
                        key=lambda kv: kv[1]['recall@10'])
  row = {'corpus': corpus['corpus'], 'split': split, 'recall@10': mean,
         'seeds': len(corpus['runs']), 'ci95': ci,
         'best_baseline': best_name,
         'best_baseline_recall@10': best['recall@10'],
         'ratio': mean / best['recall@10'] if best['recall@10'] else None}
  if 'generator' in corpus:
    row['generator_recall@10'] = corpus['generator'][split]['recall@10']
  if 'reference' in corpus:
    ref, ref_ci = mean_over_seeds(corpus['reference']['runs'], split)
    slack = half_width(ref_ci)
    row.update({'reference': corpus['reference']['config'],
                'reference_recall@10': ref, 'reference_ci95': ref_ci,
                'within_reference': bool(mean >= ref - slack)})
  return row


def _table(rows: list[dict[str, Any]], albums: dict[str, int],
           config: ml_collections.ConfigDict) -> list[str]:
  pct = lambda x: f'{100 * x:.1f}'
  interval = lambda ci: f'{pct(ci[0])}-{pct(ci[1])}' if ci else ''
  reference = config.suite.reference
  lines = [
      '# The corpus suite: review -> album recall@10 (%)', '',
      f'Seeds {config.suite.seeds}; each run\'s model is its best '
      'evaluation on held-out training reviews (or dev, as '
      '`eval.validation_fraction` says); `dev` holds reviews of training '
      'albums, `test` albums never seen in training. The interval is the '
      'mean over seeds of each seed\'s 95% bootstrap interval.']
  head = ('| corpus | albums | split | config R@10 | 95% interval | best '
          'baseline | its R@10 | ratio |')
  rule = '| --- | ---: | --- | ---: | --- | --- | ---: | ---: |'
  if reference:
    lines[-1] += (f' `{reference}` is the reference recipe, trained with the '
                  'same seeds on the same data; "within" when the config is '
                  'no more than the half width of its interval below it.')
    head += ' reference R@10 | its interval | vs reference |'
    rule += ' ---: | --- | --- |'
  generator = any('generator_recall@10' in r for r in rows)
  if generator:
    lines[-1] += (' "generator" ranks the albums by the likelihood the '
                  "corpus's generator gives a review's words about the "
                  'sound and genre, from the traits each album\'s tracks '
                  'carry (mardjax/evaluation/generator_ranking.py): about '
                  'the best a model reading the audio can do on albums it '
                  'never trained on.')
    head += ' generator R@10 |'
    rule += ' ---: |'
  lines += ['', head, rule]
  for r in rows:
    ratio = f'{r["ratio"]:.2f}x' if r['ratio'] is not None else '-'
    line = (f'| {r["corpus"]} | {albums[r["corpus"]]:,} | {r["split"]} | '
            f'{pct(r["recall@10"])} | {interval(r["ci95"])} | '
            f'{r["best_baseline"]} | {pct(r["best_baseline_recall@10"])} | '
            f'{ratio} |')
    if reference:
      line += (f' {pct(r["reference_recall@10"])} | '
               f'{interval(r["reference_ci95"])} | '
               f'{"within" if r["within_reference"] else "below"} |')
    if generator:
      line += f' {pct(r["generator_recall@10"])} |'
    lines.append(line)
  return lines


def _write(corpora: list[dict[str, Any]], workdir: str,
           config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  rows = [summarize(c, s) for c in corpora for s in ('dev', 'test')]
  albums = {c['corpus']: c['albums'] for c in corpora}
  with open(os.path.join(workdir, 'suite.md'), 'w') as f:
    f.write('\n'.join(_table(rows, albums, config)) + '\n')
  with open(os.path.join(workdir, 'suite.json'), 'w') as f:
    json.dump({'corpora': corpora, 'rows': rows}, f, indent=1)
  return rows


def run_suite(config: ml_collections.ConfigDict, workdir: str,
              show_progress: bool = True) -> dict[str, Any]:
  """Every corpus of `config.suite.corpora` (checked, with the seeds,
  before any work); returns the table's rows and the files written."""
  names, _ = corpus_names(config), seed_list(config)
  if not config.suite.scale > 0:
    raise UserError(f'config.suite.scale={config.suite.scale}: must be > 0.')
  # Both recipes checked as training will check them, before any corpus.
  recipes = [config]
  if config.suite.reference:
    recipes.append(reference_config(config, config.suite.reference))
  for recipe in recipes:
    config_check.validate(recipe, jax.local_device_count(),
                          jax.process_count())
  corpora, rows = [], []
  for name in names:
    corpora.append(run_corpus(config, name, workdir, show_progress))
    rows = _write(corpora, workdir, config)
  return {'rows': rows, 'files': [os.path.join(workdir, f)
                                  for f in ('suite.md', 'suite.json')]}
