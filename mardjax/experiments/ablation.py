"""The paper's Table 1 (`--mode=ablate`): train and evaluate every row, run
the baselines, write the table beside the paper's.

Rows are the configs in `configs/table1/`, each the default config with only
what differs changed. Every row trains on the same data (the `data` section
and seed of the config given to launch.py) for `config.ablate.num_steps`
steps (a budget: small on a CPU, the paper's 200 epochs on a GPU with
`--config.ablate.num_steps=0`, which keeps each row's own epoch count), and
reports dev recall of the final parameters. Outputs in the workdir:
`ablation.md`, `ablation.csv`, `ablation.png`, one sub-directory per row.
"""

import csv
import importlib
import json
import os
import time
from typing import Any

from absl import logging
import ml_collections

from mardjax import modes
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError

# (row, config module, Table 1 columns, paper's dev R@1 / R@5 / R@10).
ROWS = (
    ('uni_nonlinear', 'configs.table1.uni_nonlinear',
     dict(bert=False, lstm=False, nonlinear=True, bidirectional=False,
          sampling=False), (5.68, 10.97, 15.36)),
    ('bi_linear', 'configs.table1.bi_linear',
     dict(bert=False, lstm=False, nonlinear=False, bidirectional=True,
          sampling=False), (8.46, 15.37, 22.30)),
    ('bert_bi_nonlinear', 'configs.table1.bert_bi_nonlinear',
     dict(bert=True, lstm=False, nonlinear=True, bidirectional=True,
          sampling=False), (1.99, 4.22, 6.4)),
    ('bi_nonlinear', 'configs.table1.bi_nonlinear',
     dict(bert=False, lstm=False, nonlinear=True, bidirectional=True,
          sampling=False), (10.0, 16.74, 22.22)),
    ('lstm_bi_nonlinear', 'configs.table1.lstm_bi_nonlinear',
     dict(bert=False, lstm=True, nonlinear=True, bidirectional=True,
          sampling=False), (9.6, 17.34, 22.39)),
    ('bi_nonlinear_ns', 'configs.table1.bi_nonlinear_ns',
     dict(bert=False, lstm=False, nonlinear=True, bidirectional=True,
          sampling=True), (19.95, 31.3, 39.2)),
    ('no_constraints', 'configs.table1.no_constraints',
     dict(bert=False, lstm=False, nonlinear=True, bidirectional=True,
          sampling=True, constraints=False), None),
    ('infonce', 'configs.table1.infonce',
     dict(bert=False, lstm=False, nonlinear=True, bidirectional=True,
          sampling=True, loss='infonce'), None),
)
# The paper's CCA figures (its own training data, 10,000 albums).
PAPER_CCA = {'cca-50': (1.77, 5.74, 8.87), 'cca-100': (2.54, 6.90, 9.74)}
COLUMNS = ('bert', 'lstm', 'nonlinear', 'bidirectional', 'sampling')


def row_config(base: ml_collections.ConfigDict, module: str
               ) -> ml_collections.ConfigDict:
  """A row's config, with the base config's data, seed, budget and sizes."""
  config = importlib.import_module(module).get_config()
  config.data = base.data
  config.seed = base.seed
  config.eval = base.eval
  # The model's sizes, the batch and the schedule follow the base config
  # (e.g. configs/test.py's small sizes); the row's own switches stay.
  for field in ('word_dim', 'hidden_dim', 'embed_dim', 'lstm_dim',
                'max_tracks', 'batch_norm'):
    config.model[field] = base.model[field]
  for field in ('batch_size', 'learning_rate', 'log_every',
                'checkpoint_every', 'keep_checkpoints', 'vocab_bucket',
                'lstm_pack_rows', 'embedding_update', 'parallelism'):
    config.train[field] = base.train[field]
  config.loss.negatives = base.loss.negatives
  a = base.ablate
  if a.num_steps:
    config.train.num_steps = a.num_steps
    config.train.eval_every = max(1, a.num_steps // max(1, a.evals))
  return config


def _fmt(x) -> str:
  return '' if x is None else f'{x:.2f}'


def run(config: ml_collections.ConfigDict, workdir: str,
        show_progress: bool = True) -> dict[str, Any]:
  """Trains and evaluates every row, runs the baselines, writes the table."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  modes.run_mode('preprocess', config, workdir, show_progress=show_progress)
  data_dir = manifest_lib.data_dir_of(config, workdir)
  only = [r for r in config.ablate.rows.split(',') if r]
  unknown = set(only) - {r[0] for r in ROWS}
  if unknown:
    raise UserError(f'config.ablate.rows: unknown rows {sorted(unknown)}; '
                    f'choose from {[r[0] for r in ROWS]}.')
  results = []
  for name, module, columns, paper in ROWS:
    if only and name not in only:
      continue
    row = {'row': name, **columns, 'paper': paper}
    cfg = row_config(config, module)
    if cfg.model.text_encoder == 'pretrained' and not (
        cfg.data.text_encoder_path):
      row['skipped'] = ('needs config.data.text_encoder_path (a local '
                        'Hugging Face model directory, e.g. bert-base-'
                        'uncased)')
      results.append(row)
      logging.warning('ablation: %s skipped: %s', name, row['skipped'])
      continue
    start = time.time()
    logging.info('ablation: training %s', name)
    _, metrics = modes.train_and_evaluate(
        cfg, os.path.join(workdir, 'ablation', name), data_dir)
    row.update({k: metrics[k] for k in (
        'recall@1', 'recall@5', 'recall@10', 'random_recall@10',
        'median_rank', 'mrr', 'steps', 'history')})
    row['seconds'] = round(time.time() - start, 1)
    results.append(row)
  logging.info('ablation: baselines')
  base = baselines.run(config, data_dir)
  for b in base['baselines']:
    if b['baseline'].startswith(('cca', 'wsabie', 'random')):
      results.append({'row': b['baseline'], 'baseline': True,
                      'paper': PAPER_CCA.get(b['baseline']),
                      **{k: b[k] for k in ('recall@1', 'recall@5',
                                           'recall@10', 'median_rank')}})
  _write(results, workdir, config)
  best = max((r for r in results if 'recall@10' in r and
              not r.get('baseline')), key=lambda r: r['recall@10'],
             default=None)
  return {'rows': [{k: v for k, v in r.items() if k != 'history'}
                   for r in results],
          'best_row': best['row'] if best else None,
          'files': [os.path.join(workdir, f) for f in (
              'ablation.md', 'ablation.csv', 'ablation.png')]}


def _write(results: list[dict[str, Any]], workdir: str,
           config: ml_collections.ConfigDict) -> None:
  """ablation.md (the paper's layout, ours beside theirs), .csv, .png."""
  mark = lambda v: '✓' if v else '-'
  lines = [
      f'# Table 1 on {"synthetic" if not config.data.mard_dir else "MARD"} '
      f'data: dev review -> album recall (%)',
      '',
      f'Budget: {config.ablate.num_steps or "each row’s own"} steps per row, '
      f'batch {config.train.batch_size}; ours are the final parameters on '
      'the dev split; paper figures from its Table 1 (real MARD, 200 '
      'epochs).',
      '',
      '| row | BERT | LSTM | non-linear | bi-directional | neighb. sampling '
      '| R@1 | R@5 | R@10 | paper R@1 | paper R@5 | paper R@10 |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | '
      '--- |']
  for r in results:
    paper = r.get('paper') or (None, None, None)
    ours = [100 * r[k] if k in r else None
            for k in ('recall@1', 'recall@5', 'recall@10')]
    flags = (['', '', '', '', ''] if r.get('baseline') else
             [mark(r.get(c)) for c in COLUMNS])
    name = r['row'] + (' (skipped*)' if 'skipped' in r else '')
    lines.append('| ' + ' | '.join([name, *flags, *map(_fmt, ours),
                                    *map(_fmt, paper)]) + ' |')
  lines += [f'\n\\* {r["row"]}: {r["skipped"]}.' for r in results
            if 'skipped' in r]
  chance = next((r['random_recall@10'] for r in results
                 if 'random_recall@10' in r), None)
  if chance is not None:
    lines += ['', f'Chance R@10: {100 * chance:.2f}%.']
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(workdir, 'ablation.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['row', *COLUMNS, 'recall@1', 'recall@5', 'recall@10',
                'paper_recall@1', 'paper_recall@5', 'paper_recall@10',
                'steps', 'skipped'])
    for r in results:
      paper = r.get('paper') or ('', '', '')
      w.writerow([r['row'], *[r.get(c, '') for c in COLUMNS],
                  *[r.get(k, '') for k in ('recall@1', 'recall@5',
                                           'recall@10')],
                  *[p / 100 if p != '' else '' for p in paper],
                  r.get('steps', ''), r.get('skipped', '')])
  with open(os.path.join(workdir, 'ablation.json'), 'w') as f:
    json.dump(results, f, indent=1)
  _plot(results, os.path.join(workdir, 'ablation.png'))


def _plot(results: list[dict[str, Any]], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  done = [r for r in results if 'recall@10' in r]
  fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 4.5))
  width = 0.27
  for i, k in enumerate((1, 5, 10)):
    bars.bar([j + (i - 1) * width for j in range(len(done))],
             [100 * r[f'recall@{k}'] for r in done], width, label=f'R@{k}')
  bars.set_xticks(range(len(done)))
  bars.set_xticklabels([r['row'] for r in done], rotation=35, ha='right',
                       fontsize=8)
  bars.set_ylabel('dev recall (%)')
  bars.legend()
  bars.set_title('Review -> album recall per row')
  for r in done:
    if r.get('history'):
      curves.plot([h['step'] for h in r['history']],
                  [100 * h['recall@10'] for h in r['history']],
                  marker='o', label=r['row'])
  curves.set_xlabel('training step')
  curves.set_ylabel('dev R@10 (%)')
  curves.set_title('Dev recall over training')
  curves.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
