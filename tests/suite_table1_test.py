"""Table 1 on the corpus suite: every row on every corpus, each row its own
recipe at the budget it needs, and the paper's claims judged per corpus."""

import json
import os

import pytest

from configs import best as best_config
from configs import default as default_config
from configs import test as test_config
from mardjax import modes
from mardjax.errors import UserError
from mardjax.experiments import ablation
from mardjax.experiments import suite_table1


def _runs(*recalls_and_intervals):
  """Runs with dev figures (recall, interval) and test figures at half."""
  return [{'dev': {'recall@10': r, 'recall@10_ci95': ci},
           'test': {'recall@10': r / 2}} for r, ci in recalls_and_intervals]


def _corpus(**rows):
  return {'corpus': 'small', 'rows': rows,
          'baselines': {'dev': {'cca-50': {'recall@10': 0.10,
                                           'recall@10_ci95': [0.08, 0.12]},
                                'cca-100': {'recall@10': 0.12,
                                            'recall@10_ci95': [0.10, 0.14]},
                                'wsabie': {'recall@10': 0.5}},
                        'test': {'wsabie': {'recall@10': 0.5}}}}


def test_claims_are_judged_against_the_intervals():
  corpus = _corpus(
      # Two seeds: mean 0.30, interval 0.26-0.34 (half width 0.04).
      bi_nonlinear=_runs((0.28, [0.24, 0.32]), (0.32, [0.28, 0.36])),
      bi_linear=_runs((0.25, [0.22, 0.28])),      # 0.05 below: held.
      uni_nonlinear=_runs((0.27, [0.24, 0.30])),  # 0.03 below: unclear.
      lstm_bi_nonlinear=_runs((0.35, [0.30, 0.40])),  # 0.05 above.
      bi_nonlinear_ns=_runs((0.20, [0.17, 0.23])))  # 0.10 below.
  verdict = lambda kind, rows, split='dev': suite_table1.verdict(
      kind, rows, corpus, split)
  assert verdict('above', ('bi_nonlinear', 'bi_linear')) == 'held'
  assert verdict('above', ('bi_nonlinear', 'uni_nonlinear')) == 'unclear'
  assert verdict('above', ('bi_nonlinear_ns', 'bi_nonlinear')) == 'not held'
  # The larger half width counts: the LSTM's 0.05 is not more than 0.05.
  assert verdict('level', ('lstm_bi_nonlinear', 'bi_nonlinear')) == 'held'
  assert verdict('level', ('bi_nonlinear_ns', 'bi_nonlinear')) == 'not held'
  # Gains: bi-directional +0.03, non-linear +0.05, sampling -0.10.
  assert verdict('gain', (('bi_nonlinear', 'bi_linear'),
                          ('bi_nonlinear', 'uni_nonlinear'))) == 'held'
  assert verdict('gain', (('bi_nonlinear', 'uni_nonlinear'),
                          ('bi_nonlinear', 'bi_linear'))) == 'not held'
  # More than every other change, not merely more than one.
  assert verdict('gain', (('bi_nonlinear', 'uni_nonlinear'),
                          ('bi_nonlinear_ns', 'bi_nonlinear'),
                          ('bi_nonlinear', 'bi_linear'))) == 'not held'
  # A change that loses gains nothing, even if the others lose more.
  assert verdict('gain', (('bi_nonlinear', 'lstm_bi_nonlinear'),
                          ('bi_nonlinear_ns', 'bi_nonlinear'))) == 'not held'
  # The other changes that did not run are left out; the claimed one not.
  assert verdict('gain', (('bi_nonlinear', 'bi_linear'),
                          ('bert_bi_nonlinear', 'bi_nonlinear'),
                          ('bi_nonlinear', 'uni_nonlinear'))) == 'held'
  assert verdict('gain', (('bert_bi_nonlinear', 'bi_nonlinear'),
                          ('bi_nonlinear', 'uni_nonlinear'))) == 'not run'
  assert verdict('gain', (('bi_nonlinear', 'bi_linear'),
                          ('bert_bi_nonlinear', 'bi_nonlinear'))) == 'not run'
  # 'cca': the best CCA row (cca-100, 0.12 with half width 0.02).
  assert verdict('above', ('bi_nonlinear_ns', 'cca')) == 'held'
  # Without intervals (the test split here) any lead holds.
  assert verdict('above', ('bi_nonlinear', 'uni_nonlinear'), 'test') == 'held'
  assert verdict('above', ('bi_nonlinear_ns', 'cca'), 'test') == 'not run'
  assert verdict('above', ('bi_nonlinear', 'bert_bi_nonlinear')) == 'not run'
  found = suite_table1.claims([corpus])
  assert [c['claim'] for c in found] == [c[0] for c in suite_table1.CLAIMS]
  assert all(set(c['verdicts']['small']) == {'dev', 'test'} for c in found)


def test_every_claim_names_rows_of_table1():
  rows = {r[0] for r in ablation.ROWS} | {'cca'}
  for _, kind, names in suite_table1.CLAIMS:
    assert kind in ('above', 'level', 'gain')
    flat = [n for pair in names for n in pair] if kind == 'gain' else names
    assert set(flat) <= rows


def test_a_row_keeps_its_recipe_with_the_launch_configs_stopping():
  base = best_config.get_config()
  base.data.synth_num_albums = 321
  paper = suite_table1.row_config(base, 'bi_nonlinear_ns',
                                  'configs.table1.bi_nonlinear_ns', {})
  default = default_config.get_config()
  # The paper's optimiser, loss, model and epochs ...
  assert paper.train.learning_rate == default.train.learning_rate
  assert paper.loss.negatives == default.loss.negatives
  assert paper.loss.margin == default.loss.margin
  assert not paper.model.linear and paper.train.num_epochs == 200
  # ... on the launch config's data, stopped as it stops.
  assert paper.data.synth_num_albums == 321
  assert (paper.train.eval_every, paper.train.early_stop_patience) == (
      base.train.eval_every, base.train.early_stop_patience)
  capped = suite_table1.row_config(base, 'lstm_bi_nonlinear',
                                   'configs.table1.lstm_bi_nonlinear',
                                   {'lstm_bi_nonlinear': 300})
  assert capped.model.text_encoder == 'lstm'
  assert (capped.train.num_steps, capped.train.eval_every) == (300, 300)
  # The recipe's row, from the recipe's own config: the same run.
  best = suite_table1.row_config(base, 'best', 'configs.best', {})
  assert best.to_json(sort_keys=True) == base.to_json(sort_keys=True)


@pytest.mark.parametrize('field,value,match', [
    ('table1_rows', 'uni_nonlinear,bogus', 'unknown rows'),
    ('row_steps', 'bi_linear:0', 'row:steps'),
    ('row_steps', 'lstm_bi_nonlinear:50', 'not in the table'),
])
def test_bad_table1_fields_fail_before_any_work(tmp_path, field, value,
                                                match):
  config = test_config.get_config()
  config.suite.table1_rows = 'uni_nonlinear,bi_linear'
  config.suite[field] = value
  with pytest.raises(UserError, match=match):
    modes.run_mode('suite_table1', config, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_table1_trains_every_row_on_every_corpus(tmp_path, monkeypatch):
  config = test_config.get_config()
  config.suite.update(corpora='sparse_400,named_1000', seeds='0',
                      scale=0.1, num_epochs=2,
                      table1_rows='uni_nonlinear,bert_bi_nonlinear,'
                      'bi_nonlinear,best', row_steps='bi_nonlinear:4')
  # 16 rows a device: room for the paper's 10 sampled negatives.
  config.train.update(batch_size=64, eval_every=5, log_every=5,
                      checkpoint_every=5)
  config.eval.bootstrap = 50
  config.baselines.update(wsabie_steps=50, text_dim=32, cca_dims=(8,))
  out = modes.run_mode('suite_table1', config, str(tmp_path))
  assert 'bert_bi_nonlinear' in out['skipped']
  with open(tmp_path / 'table1_suite.json') as f:
    record = json.load(f)
  assert [c['corpus'] for c in record['corpora']] == ['sparse_400',
                                                      'named_1000']
  for corpus in record['corpora']:
    assert set(corpus['rows']) == {'uni_nonlinear', 'bi_nonlinear', 'best'}
    for row, runs in corpus['rows'].items():
      (run,) = runs
      assert run['seed'] == 0 and 'recall@10_ci95' in run['dev']
      # The capped row stops at its cap; the others run their 2 epochs.
      if row == 'bi_nonlinear':
        assert run['steps'] == 4
    assert len({r[0]['run_dir'] for r in corpus['rows'].values()}) == 3
    assert set(corpus['baselines']['test']) == {'cca-8', 'wsabie'}
  bidir = next(c for c in out['claims']
               if c['claim'].startswith('The bi-directional'))
  assert set(bidir['verdicts']) == {'sparse_400', 'named_1000'}
  assert all(v in ('held', 'not held', 'unclear')
             for v in bidir['verdicts']['sparse_400'].values())
  table = (tmp_path / 'table1_suite.md').read_text()
  assert '| uni_nonlinear |' in table and '| cca-8 |' in table
  assert 'bert_bi_nonlinear skipped' in table
  assert ('Not run (`suite.table1_rows`): bi_linear, lstm_bi_nonlinear, '
          'bi_nonlinear_ns, no_constraints, infonce;') in table
  assert table.count('| The bi-directional loss') == 1

  # Again: every run and fit is read back, the same verdicts.
  from mardjax import stages  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  def refuse(*args, **kwargs):
    raise AssertionError('trained or fitted again')
  monkeypatch.setattr(stages, 'train_and_evaluate', refuse)
  monkeypatch.setattr(baselines, 'baselines_on_splits', refuse)
  again = modes.run_mode('suite_table1', config, str(tmp_path))
  assert again['claims'] == out['claims']
