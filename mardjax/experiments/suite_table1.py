"""The paper's Table 1 on the corpus suite (`--mode=suite_table1`): every
row trained on every corpus of the suite, and the orderings the paper
claims for its rows stated as held or not, corpus by corpus.

The paper read its ablations on one corpus (MARD's dev split). Whether a
row's advantage is a property of the method or of that corpus shows when
the same rows train on catalogues that differ where real ones do
(`mardjax.experiments.suite.CORPORA`).

Rows are `experiments.ablation.ROWS` (`config.suite.table1_rows` picks
some; '' all): each is its own config (model switches, loss, optimiser,
schedule and epochs), on the launch config's data, evaluation, baselines,
model sizes and batch (`suite.reference_config`, as the suite trains its
reference). The budget is what each row needs: every row evaluates on the
selection split every `train.eval_every` steps of the launch config and
stops after `train.early_stop_patience` evaluations without a better one,
at most its own epochs (or `config.suite.num_epochs`), and
`config.suite.row_steps` ('row:steps,...') caps a row's steps where its
convergence costs too much (the LSTM's on a CPU). The BERT row needs a
local Hugging Face model (`data.text_encoder_path`) and is skipped
without one.

Runs are the suite's (`suite.train_seed`): each under
`WORKDIR/<corpus>/runs/<fingerprint>/`, read back when done before, so the
launch config's own suite runs (`--mode=suite`, the same workdir) and an
interrupted table are not trained again. Outputs, rewritten after every
run: `WORKDIR/table1_suite.md` (recall@10 of every row, dev / test, mean
over seeds, then the claims per corpus) and `table1_suite.json` (every
run's figures and intervals, and every verdict).

A claim that a row beats another is "held" when its mean recall@10 is
above the other's by more than the larger half width of the two rows'
95% bootstrap intervals (each the mean over seeds), "not held" when it is
below by as much, and "unclear" in between. Claims about which change
gains most compare mean gains, without an interval: held when the change
gains and gains more than each other change that ran.
"""

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from mardjax import config_check
from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.experiments import ablation
from mardjax.experiments import suite

SPLITS = ('dev', 'test')

# What the paper's section 8 says of its Table 1, as (claim, kind, rows):
# 'above': rows[0] beats rows[1]; 'level': rows[0] neither beats nor
# trails rows[1] ("did not tank the model, but also did not provide any
# substantial performance increase"); 'gain': the change rows[0] (a pair
# of rows: with, without) gains something, and more than each other change
# of rows[1:] that ran. 'cca' stands for the best CCA
# baseline of the corpus and split.
CLAIMS = (
    ('Trainable word embeddings beat frozen BERT features', 'above',
     ('bi_nonlinear', 'bert_bi_nonlinear')),
    ('A non-linear model improves over the linear one', 'above',
     ('bi_nonlinear', 'bi_linear')),
    ('The bi-directional loss improves over the uni-directional one',
     'above', ('bi_nonlinear', 'uni_nonlinear')),
    ('... and gains more than non-linearity does', 'gain',
     (('bi_nonlinear', 'uni_nonlinear'), ('bi_nonlinear', 'bi_linear'))),
    ('LSTM text features neither hurt nor help much', 'level',
     ('lstm_bi_nonlinear', 'bi_nonlinear')),
    ('Neighbourhood sampling improves the model', 'above',
     ('bi_nonlinear_ns', 'bi_nonlinear')),
    ('... and is the change that gains most', 'gain',
     (('bi_nonlinear_ns', 'bi_nonlinear'), ('bi_nonlinear', 'uni_nonlinear'),
      ('bi_nonlinear', 'bi_linear'), ('lstm_bi_nonlinear', 'bi_nonlinear'))),
    ('The paper\'s best row beats CCA', 'above', ('bi_nonlinear_ns', 'cca')),
)

# Cheap rows first, so an interrupted table holds most rows.
_SLOW_LAST = ('lstm_bi_nonlinear', 'bert_bi_nonlinear')


def _row_names(config: ml_collections.ConfigDict) -> list[str]:
  known = [r[0] for r in ablation.ROWS]
  names = [r.strip() for r in config.suite.table1_rows.split(',')
           if r.strip()]
  unknown = sorted(set(names) - set(known))
  if unknown:
    raise UserError(f'config.suite.table1_rows: unknown rows {unknown}; '
                    f'choose from {known}.')
  return [n for n in known if not names or n in names]


def row_config(config: ml_collections.ConfigDict, name: str,
               module: str, caps: dict[str, int]
               ) -> ml_collections.ConfigDict:
  """Row `name` (config `module`) as the table trains it beside the launch
  config: its own recipe and epochs on the launch config's data, sizes and
  batch, with the launch config's evaluation cadence and early stopping,
  its steps capped by `caps` (from `config.suite.row_steps`)."""
  cfg = suite.reference_config(config, module)
  cfg.train.eval_every = config.train.eval_every
  cfg.train.early_stop_patience = config.train.early_stop_patience
  if name in caps:
    cfg.train.num_steps = caps[name]
    cfg.train.eval_every = min(cfg.train.eval_every, caps[name])
  return cfg


def _caps(config: ml_collections.ConfigDict) -> dict[str, int]:
  return ablation.parse_row_steps(config.suite.row_steps,
                                  'config.suite.row_steps')


def plan(config: ml_collections.ConfigDict
         ) -> list[tuple[str, ml_collections.ConfigDict | None, str | None]]:
  """[(row, its config or None, why it is skipped or None)] in the order
  they train, every config checked before any work."""
  names, caps = _row_names(config), _caps(config)
  unknown = sorted(set(caps) - set(names))
  if unknown:
    raise UserError(f'config.suite.row_steps: rows {unknown} are not in '
                    'the table (config.suite.table1_rows).')
  modules = {r[0]: r[1] for r in ablation.ROWS}
  out = []
  for name in sorted(names, key=_SLOW_LAST.__contains__):
    cfg = row_config(config, name, modules[name], caps)
    why = ablation.skip_reason(cfg)
    if why is None:
      config_check.validate(cfg, jax.local_device_count(),
                            jax.process_count())
    out.append((name, None if why else cfg, why))
  return out


def _figure(corpus: dict[str, Any], row: str, split: str
            ) -> tuple[float, list[float] | None] | None:
  """(mean recall@10, mean interval) of a row (or 'cca': the best CCA
  baseline) on a corpus and split; None when the row did not run."""
  if row == 'cca':
    ccas = [b for n, b in corpus['baselines'][split].items()
            if n.startswith('cca')]
    if not ccas:
      return None
    best = max(ccas, key=lambda b: b['recall@10'])
    return best['recall@10'], best.get('recall@10_ci95')
  runs = corpus['rows'].get(row)
  return suite.mean_over_seeds(runs, split) if runs else None


def verdict(kind: str, rows: tuple, corpus: dict[str, Any], split: str
            ) -> str:
  """'held', 'not held', 'unclear' or 'not run' for one claim
  (`CLAIMS`) on one corpus and split (module docstring)."""
  if kind == 'gain':
    gains = []
    for a, b in rows:
      x, y = _figure(corpus, a, split), _figure(corpus, b, split)
      gains.append(None if x is None or y is None else x[0] - y[0])
    others = [g for g in gains[1:] if g is not None]
    if gains[0] is None or not others:
      return 'not run'
    # A change that loses gains nothing, whatever the others lose.
    return 'held' if gains[0] > max(0.0, *others) else 'not held'
  a, b = (_figure(corpus, r, split) for r in rows)
  if a is None or b is None:
    return 'not run'
  diff = a[0] - b[0]
  slack = max(suite.half_width(a[1]), suite.half_width(b[1]))
  if kind == 'level':
    return 'held' if abs(diff) <= slack else 'not held'
  if diff > slack:
    return 'held'
  return 'not held' if diff < -slack else 'unclear'


def claims(corpora: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every claim's verdict per corpus and split."""
  return [{'claim': text, 'kind': kind, 'rows': rows,
           'verdicts': {c['corpus']: {s: verdict(kind, rows, c, s)
                                      for s in SPLITS} for c in corpora}}
          for text, kind, rows in CLAIMS]


def _table(corpora: list[dict[str, Any]], found: list[dict[str, Any]],
           config: ml_collections.ConfigDict,
           skipped: dict[str, str]) -> list[str]:
  names = [c['corpus'] for c in corpora]
  pct = lambda x: f'{100 * x:.1f}'
  lines = [
      '# Table 1 on the corpus suite: review -> album recall@10 (%), '
      'dev / test', '',
      f'Seeds {config.suite.seeds}, the mean over seeds; `dev` holds '
      'reviews of training albums, `test` albums never seen in training. '
      'Each row is its own recipe on the suite\'s data, evaluated every '
      f'{config.train.eval_every} steps on held-out training reviews'
      + (f' and stopped after {config.train.early_stop_patience} '
         'evaluations without a better one, at most its own epochs'
         if config.train.early_stop_patience else ' for its own epochs')
      + (f' (steps capped: {config.suite.row_steps})'
         if config.suite.row_steps else '') + '; its model is its best '
      'evaluation. The paper\'s column is its dev R@10 on MARD.', '',
      '| row | BERT | LSTM | non-linear | bi-directional | neighb. sampling '
      '| paper | ' + ' | '.join(names) + ' |',
      '| --- | --- | --- | --- | --- | --- | ---: |' + ' ---: |' * len(names)]
  mark = lambda v: '✓' if v else '-'
  for name, _, columns, paper in ablation.ROWS:
    if name not in {n for c in corpora for n in c['rows']} | set(skipped):
      continue
    cells = []
    for c in corpora:
      figs = [_figure(c, name, s) for s in SPLITS]
      cells.append(' / '.join(pct(f[0]) for f in figs) if all(figs)
                   else 'skipped' if name in skipped else '')
    lines.append(f'| {name} | ' + ' | '.join(
        mark(columns.get(k)) for k in ablation.COLUMNS) +
                 f' | {paper[2] if paper else ""} | ' + ' | '.join(cells)
                 + ' |')
  for baseline in dict.fromkeys(b for c in corpora
                                for b in c['baselines']['dev']):
    lines.append(f'| {baseline} |' + ' |' * 5 + ' ' + (
        str(ablation.PAPER_CCA[baseline][2]) if baseline in
        ablation.PAPER_CCA else '') + ' | ' + ' | '.join(
            ' / '.join(pct(c['baselines'][s][baseline]['recall@10'])
                       if baseline in c['baselines'][s] else '-'
                       for s in SPLITS) for c in corpora) + ' |')
  lines += [f'\n{name} skipped: {why}.' for name, why in skipped.items()]
  chosen = set(_row_names(config))
  left = [r[0] for r in ablation.ROWS if r[0] not in chosen]
  if left:
    lines.append(f'\nNot run (`suite.table1_rows`): {", ".join(left)}; '
                 'claims on them read "not run".')
  lines += [
      '', '## The paper\'s claims, corpus by corpus (dev / test)', '',
      'Held: above by more than the larger half width of the two 95% '
      'intervals (for "neither hurt nor help": within it); not held: below '
      'by as much (outside it); unclear: in between. Claims of the largest '
      'gain compare mean gains: held when the change gains, and more than '
      'each other change that ran.', '',
      '| claim | ' + ' | '.join(names) + ' | held (dev) |',
      '| --- |' + ' --- |' * len(names) + ' ---: |']
  for claim in found:
    v = claim['verdicts']
    held = sum(v[n]['dev'] == 'held' for n in names)
    lines.append(f'| {claim["claim"]} | ' + ' | '.join(
        ' / '.join(v[n][s] for s in SPLITS) for n in names) +
                 f' | {held} of {len(names)} |')
  return lines


def _write(corpora: list[dict[str, Any]], workdir: str,
           config: ml_collections.ConfigDict, skipped: dict[str, str]
           ) -> list[dict[str, Any]]:
  found = claims(corpora)
  with open(os.path.join(workdir, 'table1_suite.md'), 'w') as f:
    f.write('\n'.join(_table(corpora, found, config, skipped)) + '\n')
  suite.write_json(os.path.join(workdir, 'table1_suite.json'), {'corpora': corpora, 'claims': found,
                     'skipped': skipped})
  return found


def run_table1_suite(config: ml_collections.ConfigDict, workdir: str,
                     show_progress: bool = True) -> dict[str, Any]:
  """Every row of `plan` on every corpus and seed of the suite, beside the
  baselines; returns the claims' verdicts and the files written."""
  names, seeds = suite.corpus_names(config), suite.seed_list(config)
  if not config.suite.scale > 0:
    raise UserError(f'config.suite.scale={config.suite.scale}: must be > 0.')
  rows = plan(config)
  skipped = {name: why for name, cfg, why in rows if cfg is None}
  corpora, data_dirs = [], {}
  for corpus in names:
    cfg = suite.corpus_run_config(config, corpus)
    root = os.path.join(workdir, corpus)
    stages.preprocess(cfg, root, show_progress=show_progress)
    data_dirs[corpus] = manifest_lib.data_dir_of(cfg, root)
    corpora.append({'corpus': corpus, 'albums': cfg.data.synth_num_albums,
                    'rows': {}, 'baselines': suite.corpus_baselines(
                        cfg, root, data_dirs[corpus])})
  found = _write(corpora, workdir, config, skipped)
  caps, start = _caps(config), time.time()
  for name, row_cfg, _ in rows:
    if row_cfg is None:
      continue
    for corpus in corpora:
      cfg = suite.corpus_run_config(row_cfg, corpus['corpus'])
      if name in caps:  # config.suite.num_epochs does not lift a cap.
        cfg.train.num_steps = caps[name]
      root = os.path.join(workdir, corpus['corpus'])
      corpus['rows'][name] = [
          suite.train_seed(cfg, root, data_dirs[corpus['corpus']], seed,
                           f'{corpus["corpus"]} ({name})')
          for seed in seeds]
      found = _write(corpora, workdir, config, skipped)
    logging.info('table 1 on the suite: %s done (%.0f s so far)', name,
                 time.time() - start)
  return {'claims': [{'claim': c['claim'], 'verdicts': c['verdicts']}
                     for c in found],
          'skipped': skipped,
          'files': [os.path.join(workdir, f) for f in (
              'table1_suite.md', 'table1_suite.json')]}
