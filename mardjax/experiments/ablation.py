"""The paper's Table 1 (`--mode=ablate`): train and evaluate every row, run
the baselines, write the table beside the paper's.

Rows are the configs in `configs/table1/`, each the default config with only
what differs changed, then `configs/best.py` (the project's recipe, which
keeps its own optimiser, schedule and loss). Every row trains on the same data (the `data` section
and seed of the config given to launch.py) for `config.ablate.num_steps`
steps (a budget: small on a CPU, the paper's 200 epochs on a GPU with
`--config.ablate.num_steps=0`, which keeps each row's own epoch count), and
reports dev recall of its model (the best of its evaluations on the
selection split, `model_step`).
Outputs in the workdir: `ablation.md`, `ablation.csv`, `ablation.png`, one
sub-directory per row.

`config.ablate.variants` adds rows of your own: the config given to
launch.py with some fields changed, e.g.

  --config.ablate.variants='margin_0.2: loss.margin=0.2; hard10:
      loss.negatives=hardest:10 train.learning_rate=3e-3'

(rows separated by ';', a name, ':', then space-separated field=value).
`config.ablate.rows='none'` runs no paper row (only the variants).
"""

import ast
import csv
import difflib
import importlib
import json
import os
import time
from typing import Any

from absl import logging
import ml_collections

from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.evaluation import word_evidence

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
    # The project's recipe (configs/best.py), beyond the paper.
    ('best', 'configs.best',
     dict(bert=False, lstm=False, nonlinear=False, bidirectional=True,
          sampling=True), None),
)
# The paper's CCA figures (its own training data, 10,000 albums).
PAPER_CCA = {'cca-50': (1.77, 5.74, 8.87), 'cca-100': (2.54, 6.90, 9.74)}
COLUMNS = ('bert', 'lstm', 'nonlinear', 'bidirectional', 'sampling')
# Rows that keep their own optimiser, schedule and loss (`row_config`).
OWN_RECIPE = frozenset({'best'})


def parse_row_steps(text: str, field: str) -> dict[str, int]:
  """'row:steps,row:steps' (config field `field`) as {row: steps}."""
  out = {}
  for item in filter(None, text.split(',')):
    name, _, steps = item.partition(':')
    if not steps.isdigit() or int(steps) < 1:
      raise UserError(f'{field}: {item!r} is not "row:steps" with '
                      'steps >= 1.')
    out[name.strip()] = int(steps)
  return out


def skip_reason(config: ml_collections.ConfigDict) -> str | None:
  """Why a row's config cannot train here (None: it can): the BERT row
  reads a local Hugging Face model."""
  if config.model.text_encoder == 'pretrained' and not (
      config.data.text_encoder_path):
    return ('needs config.data.text_encoder_path (a local Hugging Face '
            'model directory, e.g. bert-base-uncased)')
  return None


def row_budgets(base: ml_collections.ConfigDict) -> dict[str, int]:
  """`config.ablate.row_steps` as {row: steps}."""
  return parse_row_steps(base.ablate.row_steps, 'config.ablate.row_steps')


def row_config(base: ml_collections.ConfigDict, name: str, module: str
               ) -> ml_collections.ConfigDict:
  """A row's config, with the base config's data, seed, budget, sizes and
  evaluation (but for the row's own way of reading a review,
  `word_evidence.RECIPE_FIELDS`).

  Paper rows also take the base's learning rate and negatives (the paper
  used one setting for every row); rows in `OWN_RECIPE` keep their own
  optimiser, schedule and loss.
  """
  config = importlib.import_module(module).get_config()
  config.data = base.data
  config.seed = base.seed
  config.eval = word_evidence.with_own_query(base.eval, config.eval)
  # The model's sizes, the batch, the schedule and how the computation
  # runs (the LSTM's loop, the update, the dtype: same function, other
  # speed) follow the base config (e.g. configs/test.py's small sizes);
  # the row's own switches stay.
  for field in ('word_dim', 'hidden_dim', 'embed_dim', 'lstm_dim',
                'max_tracks', 'batch_norm', 'lstm_loop'):
    config.model[field] = base.model[field]
  own = name in OWN_RECIPE
  for field in ('batch_size', 'log_every', 'checkpoint_every',
                'keep_checkpoints', 'vocab_bucket', 'lstm_pack_rows',
                'token_bucket', 'split_bag', 'compute_dtype',
                'embedding_update', 'parallelism', 'eval_every',
                'early_stop_patience') + (() if own else ('learning_rate',)):
    config.train[field] = base.train[field]
  if not own:
    config.loss.negatives = base.loss.negatives
  a = base.ablate
  steps = row_budgets(base).get(name, a.num_steps)
  if steps:
    config.train.num_steps = steps
    config.train.eval_every = max(1, steps // max(1, a.evals))
  return config


def _parse_value(field: str, text: str, current: Any) -> Any:
  """`text` as a value of the type of the field's current value."""
  try:
    if isinstance(current, bool):
      if text.lower() not in ('true', 'false'):
        raise ValueError(text)
      return text.lower() == 'true'
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      return tuple(ast.literal_eval(text))
  except (ValueError, SyntaxError, TypeError):
    raise UserError(f'config.ablate.variants: {field}={text!r} is not a '
                    f'{type(current).__name__}.') from None
  return text


def parse_variants(text: str, base: ml_collections.ConfigDict
                   ) -> list[tuple[str, dict[str, Any]]]:
  """`config.ablate.variants` -> [(row name, {field: value})], every field
  checked against `base` (module docstring for the syntax)."""
  rows = []
  for entry in filter(None, (e.strip() for e in text.split(';'))):
    name, colon, rest = entry.partition(':')
    name = name.strip()
    if not colon or not name or ' ' in name:
      raise UserError(f'config.ablate.variants: {entry!r} is not '
                      '"name: field=value ...".')
    changes = {}
    for item in rest.split():
      field, eq, value = item.partition('=')
      section, dot, key = field.partition('.')
      if not eq or not dot or section not in base or (
          not isinstance(base[section], ml_collections.ConfigDict)) or (
              key not in base[section]):
        known = [f'{s}.{k}' for s in base if isinstance(
            base[s], ml_collections.ConfigDict) for k in base[s]]
        close = difflib.get_close_matches(field, known, 1)
        raise UserError(
            f'config.ablate.variants: row {name!r}: {item!r} does not set '
            'a config field' + (f' (did you mean {close[0]!r}?)'
                                if close else ''))
      changes[field] = _parse_value(field, value, base[section][key])
    rows.append((name, changes))
  names = [n for n, _ in rows]
  if len(set(names)) != len(names) or set(names) & {r[0] for r in ROWS}:
    raise UserError('config.ablate.variants: row names must be distinct '
                    'and differ from the paper rows.')
  return rows


def variant_config(base: ml_collections.ConfigDict, name: str,
                   changes: dict[str, Any]) -> ml_collections.ConfigDict:
  """The base config with `changes` ({'section.field': value}) applied, and
  the ablation's step budget for row `name`."""
  config = base.copy_and_resolve_references()
  for field, value in changes.items():
    section, key = field.split('.')
    config[section][key] = value
  steps = row_budgets(base).get(name, base.ablate.num_steps)
  if steps:
    config.train.num_steps = steps
    config.train.eval_every = max(1, steps // max(1, base.ablate.evals))
  return config


def _fmt(x) -> str:
  return '' if x is None else f'{x:.2f}'


def _plan(config: ml_collections.ConfigDict
          ) -> list[tuple[dict[str, Any], ml_collections.ConfigDict | None]]:
  """[(row record, its config or None when skipped)]: the chosen paper
  rows, then the variants, every config validated before any training."""
  from mardjax import config_check  # pylint: disable=g-import-not-at-top
  only = [r for r in config.ablate.rows.split(',') if r]
  unknown = set(only) - {r[0] for r in ROWS} - {'none'}
  if unknown:
    raise UserError(f'config.ablate.rows: unknown rows {sorted(unknown)}; '
                    f'choose from {[r[0] for r in ROWS]} or none.')
  plan = []
  for name, module, columns, paper in ROWS:
    if only and name not in only:
      continue
    row = {'row': name, **columns, 'paper': paper}
    cfg = row_config(config, name, module)
    why = skip_reason(cfg)
    if why:
      row['skipped'], cfg = why, None
    plan.append((row, cfg))
  variants = parse_variants(config.ablate.variants, config)
  unknown = set(row_budgets(config)) - {r[0] for r in ROWS} - {
      n for n, _ in variants}
  if unknown:
    raise UserError(f'config.ablate.row_steps: unknown rows '
                    f'{sorted(unknown)}.')
  for name, changes in variants:
    cfg = variant_config(config, name, changes)
    config_check.validate_common(cfg)
    plan.append(({'row': name, 'variant': ' '.join(
        f'{k}={v}' for k, v in changes.items()), 'paper': None}, cfg))
  return plan


def run_table1(config: ml_collections.ConfigDict, workdir: str,
               show_progress: bool = True) -> dict[str, Any]:
  """Trains and evaluates every row, runs the baselines, writes the table."""
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  plan = _plan(config)
  stages.preprocess(config, workdir, show_progress=show_progress)
  data_dir = manifest_lib.data_dir_of(config, workdir)
  results = []
  for row, cfg in plan:
    results.append(row)
    if cfg is None:
      logging.warning('ablation: %s skipped: %s', row['row'], row['skipped'])
      continue
    start = time.time()
    logging.info('ablation: training %s', row['row'])
    row_dir = os.path.join(workdir, 'ablation', row['row'])
    _, metrics = stages.train_and_evaluate(cfg, row_dir, data_dir)
    row.update({k: metrics[k] for k in ('steps', 'model_step', 'history')})
    # The row's model on config.eval.split, with the baselines' CIs.
    full = evaluate.evaluate_checkpoint(cfg, row_dir, data_dir)
    row.update({k: v for k, v in full.items() if k.startswith((
        'recall@', 'random_recall@')) or k in ('median_rank', 'mrr')})
    row['seconds'] = round(time.time() - start, 1)
  logging.info('ablation: baselines')
  base = baselines.evaluate_baselines(config, data_dir)
  for b in base['baselines']:
    if b['baseline'].startswith(('cca', 'wsabie', 'random')):
      results.append({'row': b['baseline'], 'baseline': True,
                      'paper': PAPER_CCA.get(b['baseline']),
                      **{k: v for k, v in b.items() if k.startswith(
                          'recall@') or k == 'median_rank'}})
  _write(results, workdir, config)
  best = max((r for r in results if 'recall@10' in r and
              not r.get('baseline')), key=lambda r: r['recall@10'],
             default=None)
  return {'rows': [{k: v for k, v in r.items() if k != 'history'}
                   for r in results],
          'best_row': best['row'] if best else None,
          'files': [os.path.join(workdir, f) for f in (
              'ablation.md', 'ablation.csv', 'ablation.png')]}


def _ci(r: dict[str, Any], k: int = 10) -> str:
  ci = r.get(f'recall@{k}_ci95')
  return f'{100 * ci[0]:.1f}-{100 * ci[1]:.1f}' if ci else ''


def _write(results: list[dict[str, Any]], workdir: str,
           config: ml_collections.ConfigDict) -> None:
  """ablation.md (the paper's layout, ours beside theirs), .csv, .png."""
  mark = lambda v: '✓' if v else '-'
  split = config.eval.split
  lines = [
      f'# Table 1 on {"synthetic" if not config.data.mard_dir else "MARD"} '
      f'data: {split} review -> album recall (%)',
      '',
      f'Budget: {config.ablate.num_steps or "each row’s own"} steps per row'
      + (f' ({config.ablate.row_steps})' if config.ablate.row_steps else '')
      + (f', stopping after {config.train.early_stop_patience} evaluations '
         f'without a better selection R@10' if config.train.early_stop_patience
         else '')
      + f', batch {config.train.batch_size}; each row\'s model is its best '
      f'evaluation on held-out training reviews (or dev, as '
      f'eval.validation_fraction says; step in `model step`), evaluated on '
      f'the {split} split '
      'with a 95% bootstrap interval of R@10; paper figures from its '
      'Table 1 (real MARD, 200 epochs).',
      '',
      '| row | BERT | LSTM | non-linear | bi-directional | neighb. sampling '
      '| R@1 | R@5 | R@10 | R@10 95% CI | model step | paper R@1 | '
      'paper R@5 | paper R@10 |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | '
      '--- | --- | --- |']
  for r in results:
    paper = r.get('paper') or (None, None, None)
    ours = [100 * r[k] if k in r else None
            for k in ('recall@1', 'recall@5', 'recall@10')]
    flags = (['', '', '', '', ''] if r.get('baseline') or 'variant' in r
             else [mark(r.get(c)) for c in COLUMNS])
    name = r['row'] + (' (skipped*)' if 'skipped' in r else '')
    lines.append('| ' + ' | '.join([
        name, *flags, *map(_fmt, ours), _ci(r),
        str(r.get('model_step', '')), *map(_fmt, paper)]) + ' |')
  lines += [f'\n\\* {r["row"]}: {r["skipped"]}.' for r in results
            if 'skipped' in r]
  lines += [f'\n`{r["row"]}`: the base config with {r["variant"]}.'
            for r in results if 'variant' in r]
  chance = next((r['random_recall@10'] for r in results
                 if 'random_recall@10' in r), None)
  if chance is not None:
    lines += ['', f'Chance R@10: {100 * chance:.2f}%.']
  with open(os.path.join(workdir, 'ablation.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(workdir, 'ablation.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['row', *COLUMNS, 'recall@1', 'recall@5', 'recall@10',
                'recall@10_ci_low', 'recall@10_ci_high',
                'paper_recall@1', 'paper_recall@5', 'paper_recall@10',
                'steps', 'model_step', 'variant', 'skipped'])
    for r in results:
      paper = r.get('paper') or ('', '', '')
      ci = r.get('recall@10_ci95') or ('', '')
      w.writerow([r['row'], *[r.get(c, '') for c in COLUMNS],
                  *[r.get(k, '') for k in ('recall@1', 'recall@5',
                                           'recall@10')], *ci,
                  *[p / 100 if p != '' else '' for p in paper],
                  *[r.get(k, '') for k in ('steps', 'model_step', 'variant',
                                           'skipped')]])
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
  curves.set_ylabel('selection R@10 (%)')
  curves.set_title('Recall over training (the split selection reads)')
  curves.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
