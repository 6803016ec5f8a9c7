"""The corpus suite: every corpus generated in its style, trained with each
seed, evaluated on dev and test beside the baselines, one table."""

import json
import os

import numpy as np
import pytest

from configs import best as best_config
from configs import test as test_config
from mardjax import modes
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.experiments import suite


def test_corpora_differ_where_catalogues_do():
  """At least five corpora from 400 to 9,000 albums, each but the
  original's varying the style, every style field a real one."""
  from mardjax.data import synth  # pylint: disable=g-import-not-at-top
  assert len(suite.CORPORA) >= 5
  albums = [a for a, _, _, _ in suite.CORPORA.values()]
  assert min(albums) == 400 and max(albums) == 9000
  fields = set(synth.Style.__dataclass_fields__)
  for name, (a, reviews, tracks, style) in suite.CORPORA.items():
    assert reviews >= a and tracks >= a, name
    assert set(style) <= fields, name
    synth.Style(**style).check()
  varied = {f for _, _, _, style in suite.CORPORA.values() for f in style}
  assert {'review_tail', 'single_track', 'naming', 'offtopic',
          'impression_noise'} <= varied


def test_a_corpus_config_scales_sizes_and_sets_its_style():
  config = test_config.get_config()
  config.data.mard_dir = '/somewhere/else'
  cfg = suite.corpus_config(config, 'named_1000', 0.1)
  assert (cfg.data.synth_num_albums, cfg.data.synth_num_reviews,
          cfg.data.synth_num_tracks) == (100, 450, 500)
  assert cfg.data.mard_dir == '' and cfg.data.synth_style.naming == 0.3
  assert config.data.synth_style.naming == -1.0  # The original untouched.
  tiny = suite.corpus_config(config, 'sparse_400', 0.001)
  assert tiny.data.synth_num_albums == 4 and (
      tiny.data.synth_num_reviews == tiny.data.synth_num_tracks == 8)


@pytest.mark.parametrize('field,value,message', [
    ('corpora', 'small,huge', 'unknown corpora'),
    ('seeds', 'a,b', 'seeds'), ('seeds', '', 'seeds'),
    ('scale', 0.0, 'scale'),
    ('reference', 'configs.nowhere', 'suite.reference'),
    # The paper's 10 sampled negatives among 32 / 4 devices' rows.
    ('reference', 'configs.default', 'loss.negatives')])
def test_bad_suite_fields_fail_before_any_work(tmp_path, field, value,
                                               message):
  config = test_config.get_config()
  config.suite[field] = value
  with pytest.raises(UserError, match=message):
    suite.run_suite(config, str(tmp_path), show_progress=False)
  assert not os.listdir(tmp_path)


def test_the_reference_keeps_its_recipe_on_the_base_data_and_sizes():
  base = test_config.get_config()
  base.seed = 7
  base.data.synth_num_albums = 123
  ref = suite.reference_config(base, 'configs.best')
  best = best_config.get_config()
  # Its own recipe ...
  for field in ('negatives', 'weights', 'margin'):
    assert ref.loss[field] == best.loss[field]
  assert ref.model.word_dropout == best.model.word_dropout == 0.7
  assert ref.model.linear and best.model.linear
  assert (ref.train.learning_rate, ref.train.num_epochs,
          ref.train.early_stop_patience) == (
              best.train.learning_rate, best.train.num_epochs,
              best.train.early_stop_patience)
  # ... with its own way of reading a review ...
  assert ref.eval.evidence_ks == best.eval.evidence_ks != base.eval.evidence_ks
  # ... on the base's data, evaluation, seed and model sizes.
  assert ref.data.synth_num_albums == 123 and ref.seed == 7
  assert ref.data.to_dict() == base.data.to_dict()
  assert ({k: v for k, v in ref.eval.items() if k != 'evidence_ks'} ==
          {k: v for k, v in base.eval.items() if k != 'evidence_ks'})
  assert (ref.model.word_dim, ref.model.embed_dim) == (16, 16)
  assert ref.train.batch_size == base.train.batch_size == 32
  assert base.loss.negatives == 'sampled:5'  # The base untouched.


def _corpus(runs, reference_runs=None):
  def run(dev, dev_ci):  # No interval without a bootstrap, as on test.
    return {'dev': {'recall@10': dev, **(
        {'recall@10_ci95': dev_ci} if dev_ci else {})},
            'test': {'recall@10': dev / 2}}
  corpus = {'corpus': 'small', 'runs': [run(*r) for r in runs],
            'baselines': {'dev': {'cca-50': {'recall@10': 0.2},
                                  'wsabie': {'recall@10': 0.25}},
                          'test': {'wsabie': {'recall@10': 0.1}}}}
  if reference_runs:
    corpus['reference'] = {'config': 'configs.default',
                           'runs': [run(*r) for r in reference_runs]}
  return corpus


def test_a_row_against_the_baselines_and_the_reference():
  corpus = _corpus([(0.30, [0.25, 0.35]), (0.40, [0.33, 0.47])],
                   [(0.36, [0.30, 0.42]), (0.38, [0.32, 0.44])])
  row = suite.summarize(corpus, 'dev')
  assert row['recall@10'] == pytest.approx(0.35)
  assert row['ci95'] == pytest.approx([0.29, 0.41])
  assert row['best_baseline'] == 'wsabie'
  assert row['ratio'] == pytest.approx(0.35 / 0.25)
  # Reference 0.37 with interval 0.31-0.43: 0.35 is within its half width.
  assert row['reference_recall@10'] == pytest.approx(0.37)
  assert row['reference_ci95'] == pytest.approx([0.31, 0.43])
  assert row['within_reference']
  # 0.32 against 0.37 with 0.33-0.41: within the whole width, not the half.
  below = _corpus([(0.32, [0.25, 0.39])], [(0.37, [0.33, 0.41])])
  assert not suite.summarize(below, 'dev')['within_reference']
  assert 'reference' not in suite.summarize(_corpus([(0.3, None)]), 'dev')
  # Without intervals (no bootstrap), the test split's row.
  test_row = suite.summarize(corpus, 'test')
  assert test_row['ci95'] is None
  assert test_row['ratio'] == pytest.approx(0.175 / 0.1)


def test_a_run_from_before_a_field_existed_is_the_same_run():
  defaults = {'train.lr': 1e-3, 'loss.new': 'off'}
  stored = {'train.lr': 1e-3, 'model.dim': 8}
  wanted = {'train.lr': 1e-3, 'model.dim': 8}
  assert suite.same_run(stored, wanted, defaults)
  # A field added since, at its default: what the run did then.
  assert suite.same_run(stored, dict(wanted, **{'loss.new': 'off'}), defaults)
  # Set otherwise, or with no default to read: another run.
  assert not suite.same_run(stored, dict(wanted, **{'loss.new': 'on'}),
                            defaults)
  assert not suite.same_run(stored, dict(wanted, **{'loss.other': 1}),
                            defaults)
  # A value that differs, or a field the configs dropped: another run.
  assert not suite.same_run(stored, dict(wanted, **{'train.lr': 3e-3}),
                            defaults)
  assert not suite.same_run(dict(stored, **{'loss.gone': 1}), wanted,
                            defaults)


def test_fields_flatten_a_config_less_the_suite():
  config = test_config.get_config()
  fields = suite._fields(config)
  assert fields['loss.weights'] == list(config.loss.weights)
  assert fields['train.batch_size'] == config.train.batch_size
  assert not any(k.startswith('suite.') for k in fields)
  assert suite._fields(json.loads(config.to_json())) == fields


@pytest.mark.slow
def test_the_suite_trains_every_corpus_and_seed_beside_the_baselines(
    tmp_path, monkeypatch):
  config = test_config.get_config()
  # The reference: the paper's recipe at the same budget (2 epochs).
  config.suite.update(corpora='named_1000', seeds='0,1', scale=0.1,
                      num_epochs=2, reference='configs.default')
  # 16 rows a device: room for the paper's 10 sampled negatives.
  config.train.update(batch_size=64, eval_every=5, log_every=5,
                      checkpoint_every=5)
  config.eval.bootstrap = 50
  config.eval.validation_fraction = 0.1  # The default's (tests: dev).
  config.baselines.update(wsabie_steps=50, text_dim=32, cca_dims=(8,))
  out = modes.run_mode('suite', config, str(tmp_path))
  rows = out['rows']
  assert [(r['corpus'], r['split']) for r in rows] == [
      ('named_1000', 'dev'), ('named_1000', 'test')]
  with open(tmp_path / 'suite.json') as f:
    (corpus,) = json.load(f)['corpora']
  # The corpus's own data, in its size and style.
  manifest = manifest_lib.load(os.path.join(tmp_path, 'named_1000', 'data'))
  assert manifest.counts.albums == corpus['albums'] == 100
  assert corpus['style'] == suite.CORPORA['named_1000'][3]
  assert [r['seed'] for r in corpus['runs']] == [0, 1]
  assert all(r['selection']['split'] == 'validation' for r in corpus['runs'])
  for row in rows:
    split = row['split']
    recalls = [r[split]['recall@10'] for r in corpus['runs']]
    assert row['recall@10'] == pytest.approx(np.mean(recalls))
    best = max(corpus['baselines'][split].values(),
               key=lambda b: b['recall@10'])
    assert row['best_baseline_recall@10'] == best['recall@10']
    assert row['ratio'] == pytest.approx(row['recall@10'] /
                                         best['recall@10'])
    assert set(corpus['baselines'][split]) == {'cca-8', 'wsabie'}
  assert (corpus['runs'][0]['dev']['num_queries'] !=
          corpus['runs'][0]['test']['num_queries'])
  table = (tmp_path / 'suite.md').read_text()
  assert table.count('| named_1000 |') == 2
  # The reference: its own runs, seeds and figures beside the config's.
  ref_runs = corpus['reference']['runs']
  assert [r['seed'] for r in ref_runs] == [0, 1]
  assert {r['run_dir'] for r in ref_runs}.isdisjoint(
      r['run_dir'] for r in corpus['runs'])
  for row in rows:
    assert row['reference_recall@10'] == pytest.approx(np.mean(
        [r[row['split']]['recall@10'] for r in ref_runs]))
  assert 'configs.default' in table
  assert table.count('| within |') + table.count('| below |') == 2
  # The generator's own ranking beside them, from the same reviews.
  for row in rows:
    got = corpus['generator'][row['split']]
    assert row['generator_recall@10'] == got['recall@10'] > 0
    assert got['num_queries'] == corpus['runs'][0][row['split']][
        'num_queries']
  assert 'generator R@10' in table

  # Again in the same workdir: every run and the baselines are read back,
  # nothing trained or fitted, the same figures.
  from mardjax import stages  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import baselines  # pylint: disable=g-import-not-at-top
  def refuse(*args, **kwargs):
    raise AssertionError('trained or fitted again')
  monkeypatch.setattr(stages, 'train_and_evaluate', refuse)
  monkeypatch.setattr(baselines, 'baselines_on_splits', refuse)
  from mardjax.evaluation import generator_ranking  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(generator_ranking, 'recall', refuse)
  assert modes.run_mode('suite', config, str(tmp_path))['rows'] == rows

  # Runs made before a field existed (under other fingerprints, their
  # configs without it) are read back while the field keeps its default:
  # one by the config file beside it, one (older still) by its checkpoints.
  runs = tmp_path / 'named_1000' / 'runs'
  for i, name in enumerate(sorted(os.listdir(runs))):
    path = runs / name / suite.CONFIG_FILE
    if i == 0:
      path.unlink()
    else:
      stored = json.loads(path.read_text())
      assert stored['model']['linear_path'] is False  # The default.
      del stored['model']['linear_path']
      path.write_text(json.dumps(stored))
    old = runs / f'old{i}'
    os.rename(runs / name, old)
    record = json.loads((old / 'suite_run.json').read_text())
    record['run_dir'] = os.path.relpath(old, tmp_path / 'named_1000')
    (old / 'suite_run.json').write_text(json.dumps(record))
  again = modes.run_mode('suite', config, str(tmp_path))['rows']
  assert [{k: v for k, v in r.items() if k != 'run_dir'} for r in again] == [
      {k: v for k, v in r.items() if k != 'run_dir'} for r in rows]
