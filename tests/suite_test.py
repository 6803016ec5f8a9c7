"""The corpus suite: every corpus generated in its style, trained with each
seed, evaluated on dev and test beside the baselines, one table."""

import json
import os

import numpy as np
import pytest

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
    ('scale', 0.0, 'scale')])
def test_bad_suite_fields_fail_before_any_work(tmp_path, field, value,
                                               message):
  config = test_config.get_config()
  config.suite[field] = value
  with pytest.raises(UserError, match=message):
    suite.run_suite(config, str(tmp_path), show_progress=False)
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_the_suite_trains_every_corpus_and_seed_beside_the_baselines(
    tmp_path):
  config = test_config.get_config()
  config.suite.update(corpora='sparse_400', seeds='0,1', scale=0.1)
  config.train.update(num_steps=10, eval_every=5, log_every=5,
                      checkpoint_every=5)
  config.eval.bootstrap = 50
  config.eval.validation_fraction = 0.1  # The default's (tests: dev).
  config.baselines.update(wsabie_steps=50, text_dim=32, cca_dims=(8,))
  out = modes.run_mode('suite', config, str(tmp_path))
  rows = out['rows']
  assert [(r['corpus'], r['split']) for r in rows] == [
      ('sparse_400', 'dev'), ('sparse_400', 'test')]
  with open(tmp_path / 'suite.json') as f:
    (corpus,) = json.load(f)['corpora']
  # The corpus's own data, in its size and style.
  manifest = manifest_lib.load(os.path.join(tmp_path, 'sparse_400', 'data'))
  assert manifest.counts.albums == corpus['albums'] == 40
  assert corpus['style'] == suite.CORPORA['sparse_400'][3]
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
  assert table.count('| sparse_400 |') == 2
