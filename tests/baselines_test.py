"""CCA, WSABIE (WARP), GloVe reading, and the baselines runner."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs import test as test_config
from mardjax.evaluation import baselines
from mardjax.errors import UserError


def test_cca_finds_the_shared_directions():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4000, 2))
  x = np.c_[z, rng.normal(size=(4000, 3))] @ rng.normal(size=(5, 5))
  y = np.c_[z + 0.1 * rng.normal(size=(4000, 2)),
            rng.normal(size=(4000, 4))] @ rng.normal(size=(6, 6))
  cca = baselines.CCA(3, reg=1e-6).fit(x, y)
  assert cca.corr[0] > 0.98 and cca.corr[1] > 0.98 and cca.corr[2] < 0.1
  # Paired rows land close together in the shared space (2 dimensions of
  # signal: an angle; chance of top-1 among 200 is 0.005).
  a, b = cca.audio(x[:200]), cca.text(y[:200])
  sims = a @ b.T
  assert np.mean(np.argmax(sims, 1) == np.arange(200)) > 0.1


def test_warp_loss_hand_computed():
  params = {'text': jnp.eye(2), 'audio': jnp.eye(2)}
  text = jnp.array([[1.0, 0.0]])
  pos = jnp.array([[0.5, 0.0]])  # score 0.5
  pool = jnp.array([[0.0, 1.0], [0.9, 0.0], [0.2, 0.0]])  # 0, 0.9, 0.2
  # Draws: album 0 (no violation: 0.1 - 0.5 + 0 < 0), album 1 (violates by
  # 0.1 - 0.5 + 0.9 = 0.5) on trial 2: rank = floor((3 - 1) / 2) = 1,
  # weight L(1) = 1.
  loss = baselines.warp_loss(params, text, pos, pool, jnp.array([[0, 1, 2]]),
                             margin=0.1, num_candidates=3)
  assert float(loss) == pytest.approx(0.5)
  none = baselines.warp_loss(params, text, pos, pool, jnp.array([[0, 0]]),
                             margin=0.1, num_candidates=3)
  assert float(none) == 0.0


def _glove(tmp_path, lines):
  path = tmp_path / 'glove.txt'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def test_glove_reading_and_its_errors(tmp_path):
  words = ['<pad>', '<unk>', 'good', 'song']
  ok = _glove(tmp_path, ['good 1 0 0', 'other 0 0 1', 'song 0 2 0'])
  g = baselines.GloveMean(ok, 3, words)
  vec = g({'tokens': np.array([[2, 3, 1, 0]]), 'lengths': np.array([3])})
  np.testing.assert_allclose(vec, [[0.5, 1.0, 0.0]])  # <unk> has no vector.
  with pytest.raises(UserError, match=r'glove.txt:2: 2 values.*glove_dim=3'):
    baselines.GloveMean(_glove(tmp_path, ['good 1 0 0', 'song 1 0']), 3,
                        words)
  with pytest.raises(UserError, match='glove.txt:1: a value is not a number'):
    baselines.GloveMean(_glove(tmp_path, ['good 1 x 0']), 3, words)
  with pytest.raises(UserError, match='not a GloVe line'):
    baselines.GloveMean(_glove(tmp_path, ['good']), 3, words)
  with pytest.raises(UserError, match='does not exist'):
    baselines.GloveMean(str(tmp_path / 'missing.txt'), 3, words)


@pytest.mark.slow
def test_runner_reports_every_baseline(tiny_records):
  data_dir, manifest = tiny_records
  config = test_config.get_config()
  config.baselines.text_dim = 16
  config.baselines.cca_dims = (4, 8)
  config.baselines.wsabie_steps = 30
  out = baselines.evaluate_baselines(config, data_dir)
  rows = {r['baseline']: r for r in out['baselines']}
  assert set(rows) == {'text features', 'cca-4', 'cca-8', 'wsabie', 'random'}
  n_albums = rows['random']['num_candidates']
  assert rows['random']['recall@10'] == pytest.approx(min(1, 10 / n_albums))
  assert rows['random']['median_rank'] == pytest.approx((n_albums + 1) / 2)
  for name in ('cca-4', 'cca-8', 'wsabie'):
    r = rows[name]
    assert r['num_queries'] == manifest.counts.reviews['dev']
    assert 0 <= r['recall@1'] <= r['recall@5'] <= r['recall@10'] <= 1
    assert 0 <= r['album_to_review/recall@10'] <= 1
  # On the synthetic corpus text and audio share latent traits: CCA finds
  # them, above chance even on the tiny corpus.
  assert rows['cca-8']['mrr'] > 1.5 * rows['random']['mrr']


@pytest.mark.slow
def test_ablation_writes_the_table(tiny_corpus_master, tmp_path):
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.ablate.num_steps = 4
  config.ablate.evals = 2
  config.ablate.rows = 'uni_nonlinear,bert_bi_nonlinear,bi_nonlinear_ns'
  config.ablate.variants = ('hard: loss.negatives=hardest:3 '
                            'train.learning_rate=3e-3; idf: model.pooling=idf')
  config.eval.bootstrap = 50
  config.baselines.text_dim = 16
  config.baselines.cca_dims = (4,)
  config.baselines.wsabie_steps = 5
  out = ablation.run_table1(config, str(tmp_path), show_progress=False)
  rows = {r['row']: r for r in out['rows']}
  assert 'text_encoder_path' in rows['bert_bi_nonlinear']['skipped']
  assert rows['uni_nonlinear']['steps'] == 4
  assert {'cca-4', 'wsabie', 'random'} <= set(rows)
  # Variant rows trained as asked, after the paper rows.
  assert list(rows)[3:5] == ['hard', 'idf']
  assert rows['hard']['variant'] == (
      'loss.negatives=hardest:3 train.learning_rate=0.003')
  assert rows['hard']['steps'] == 4 and rows['idf']['steps'] == 4
  # Every trained row and baseline has a 95% interval around its R@10,
  # and names the step of its model.
  for name in ('uni_nonlinear', 'hard', 'idf', 'cca-4', 'wsabie'):
    lo, hi = rows[name]['recall@10_ci95']
    assert lo <= rows[name]['recall@10'] <= hi
  assert rows['idf']['model_step'] in (0, 2, 4)
  table = (tmp_path / 'ablation.md').read_text()
  assert '| bi_nonlinear_ns | - | - | ✓ | ✓ | ✓ |' in table
  assert '`hard`: the base config with loss.negatives=hardest:3' in table
  assert '19.95' in table and '39.20' in table  # The paper's figures.
  assert (tmp_path / 'ablation.png').stat().st_size > 10000
  lines = (tmp_path / 'ablation.csv').read_text().splitlines()
  assert lines[0].startswith('row,bert,lstm') and len(lines) == 1 + len(rows)


@pytest.mark.parametrize('variants,message', [
    ('a: loss.margn=0.1', "does not set a config field \\(did you mean "
                          "'loss.margin'\\?\\)"),
    ('a: train.num_steps=ten', "train.num_steps='ten' is not a int"),
    ('a loss.margin=0.1', 'is not "name: field=value'),
    ('a: loss.margin=0.1; a: loss.margin=0.2', 'must be distinct'),
    ('a: loss.kind=magic', 'loss.kind'),
])
def test_bad_ablation_variants_fail_before_training(tmp_path, variants,
                                                    message):
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.mard_dir = str(tmp_path / 'not_read')
  config.ablate.variants = variants
  with pytest.raises(UserError, match=message):
    ablation.run_table1(config, str(tmp_path), show_progress=False)
  assert not (tmp_path / 'data').exists()  # Nothing was preprocessed.


def test_ablation_rows_run_as_the_base_config_computes():
  """A row keeps its own switches (the LSTM row's encoder) and takes the
  base's sizes and how it computes: the LSTM's loop, the update, the
  compute dtype, the batch."""
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  base = test_config.get_config()
  base.model.lstm_loop = 'bidirectional'
  base.train.update(compute_dtype='bfloat16', embedding_update='dense',
                    batch_size=24)
  row = ablation.row_config(base, 'lstm_bi_nonlinear',
                            'configs.table1.lstm_bi_nonlinear')
  assert row.model.text_encoder == 'lstm'
  assert not row.train.neighbourhood_sampling
  assert (row.model.lstm_loop, row.model.lstm_dim) == (
      'bidirectional', base.model.lstm_dim)
  assert (row.train.compute_dtype, row.train.embedding_update,
          row.train.batch_size) == ('bfloat16', 'dense', 24)


def test_unknown_ablation_rows_are_named(tiny_corpus_master, tmp_path):
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.ablate.rows = 'bi_nonlinear,best_row'
  with pytest.raises(UserError, match="unknown rows \\['best_row'\\]"):
    ablation.run_table1(config, str(tmp_path), show_progress=False)


def test_the_fit_reads_the_reviews_the_model_trains_on(tiny_records):
  """The training reviews less the share held out for model selection
  (the same draw as the trainer's), so model and baselines learn from the
  same reviews."""
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.data import splits  # pylint: disable=g-import-not-at-top
  data_dir, manifest = tiny_records
  config = test_config.get_config()
  config.eval.validation_fraction = 0.3
  every = np.arange(manifest.counts.albums)
  pairs = baselines._training_pairs(config, manifest, every)
  train = input_pipeline.load_reviews(manifest, 'train', config.data.max_len)
  held = splits.in_validation(train['review_id'], 0.3,
                              config.data.split_salt)
  assert 0 < held.sum() < len(held)
  np.testing.assert_array_equal(pairs['review_id'],
                                train['review_id'][~held])
  np.testing.assert_array_equal(pairs['tokens'], train['tokens'][~held])
  # Albums without tracks (row -1) are left out too.
  no_tracks = every.copy()
  no_tracks[train['album'][0]] = -1
  pairs = baselines._training_pairs(config, manifest, no_tracks)
  assert train['album'][0] not in pairs['album']


@pytest.mark.slow
def test_one_fit_scores_every_split_as_a_fit_per_split(tiny_records):
  data_dir, _ = tiny_records
  config = test_config.get_config()
  config.baselines.update(text_dim=16, cca_dims=(4,), wsabie_steps=30)
  config.eval.bootstrap = 20
  both = baselines.baselines_on_splits(config, data_dir, ('dev', 'test'))
  for split in ('dev', 'test'):
    config.eval.split = split
    alone = baselines.evaluate_baselines(config, data_dir)
    assert alone['split'] == split
    strip = lambda rows: [{k: v for k, v in r.items() if 'seconds' not in k}
                          for r in rows]
    assert strip(both[split]) == strip(alone['baselines'])
  assert (both['dev'][1]['num_queries'] != both['test'][1]['num_queries'])
