"""The evidence-gated review query: scores, the query, the fitted rule."""

import os
import shutil

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import test as test_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax import config_check  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax import modes  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.data import tables  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.evaluation import word_evidence  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.models import embed  # pylint: disable=g-import-not-at-top,wrong-import-position
from mardjax.models import two_branch  # pylint: disable=g-import-not-at-top,wrong-import-position


def _review_table(reviews):
  """[(album, [word ids])] -> ReviewTable."""
  lengths = np.array([len(w) for _, w in reviews], np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  return tables.ReviewTable(
      tokens=np.concatenate([w for _, w in reviews]).astype(np.int32),
      offsets=offsets, lengths=lengths,
      album=np.array([a for a, _ in reviews], np.int32))


def test_evidence_scores_by_hand():
  # Album 0: two tracks (means 2); albums 1-3 one track each; album 4 has
  # no tracks (its words count for nothing).
  audio = tables.AudioTable(
      descriptors=np.array([[1.], [3.], [0.], [-2.], [0.]], np.float32),
      offsets=np.array([0, 2, 3, 4, 5]), counts=np.array([2, 1, 1, 1, 0]))
  # Album means 2, 0, -2, 0: mean 0, sd 2**0.5, standardised
  # 2**0.5, 0, -2**0.5, 0.
  reviews = _review_table([
      (0, [1, 2, 1]),  # Word 1 twice in one review: album 0 once.
      (0, [1]),
      (2, [1, 3]),
      (1, [2]), (3, [2]), (2, [2]),
      (4, [3, 4]),
  ])
  albums, scores = word_evidence.evidence(reviews, audio, vocab_size=6)
  np.testing.assert_array_equal(albums, [0, 2, 4, 1, 0, 0])
  # Word 1: albums 0 and 2, mean 0: score 0. Word 2: all four, mean 0.
  # Word 3: album 2 only: 1 * 2 / 1 = 2.
  np.testing.assert_allclose(scores, [0, 0, 0, 2, 0, 0], atol=1e-12)
  reviews = _review_table([(0, [1]), (1, [1]), (1, [2])])
  albums, scores = word_evidence.evidence(reviews, audio, vocab_size=3)
  # Training albums 0 and 1 (means 2, 0): standardised +1, -1.
  np.testing.assert_array_equal(albums, [0, 2, 1])
  np.testing.assert_allclose(scores, [0, 0, 1], atol=1e-12)


def test_weights_cut_and_keep_rare_words():
  rule = word_evidence.Rule(albums=np.array([10, 10, 10, 2, 0]),
                            scores=np.array([8.0, 2.0, 4.0, 0.5, 0.0]),
                            k=4.0, min_albums=5, step=0, selection={})
  # Rare words keep weight 1; words no training album used (their vectors
  # never trained) weigh nothing.
  np.testing.assert_allclose(rule.weights(), [0.5, 0, 0, 1, 0])
  np.testing.assert_allclose(rule.weights(2.0), [0.75, 0, 0.5, 1, 0])


def _linear_model(vocab=40, seed=0):
  config = test_config.get_config()
  config.model.linear = True
  config.model.batch_norm = True
  model = two_branch.build(config.model, vocab)
  variables = model.init(jax.random.PRNGKey(seed),
                         audio=np.zeros((2, 7), np.float32),
                         tokens=np.zeros((2, 5), np.int32),
                         lengths=np.ones(2, np.int32))
  return model, jax.tree_util.tree_map(np.asarray, variables)


def test_query_without_cut_is_the_model_read_without_its_shift():
  model, variables = _linear_model()
  rng = np.random.default_rng(0)
  bn = variables['params']['text_head']['bn']
  bn['scale'] = rng.uniform(0.5, 2, bn['scale'].shape).astype(np.float32)
  stats = variables['batch_stats']['text_head']['bn']
  stats['var'] = rng.uniform(0.1, 3, stats['var'].shape).astype(np.float32)
  tokens = rng.integers(1, 40, (9, 12)).astype(np.int32)
  lengths = np.array([1, 12, 5, 3, 7, 2, 12, 9, 4], np.int32)
  tokens[np.arange(12)[None, :] >= lengths[:, None]] = 0
  reviews = {'tokens': tokens, 'lengths': lengths,
             'album': np.zeros(9, np.int32)}
  ours = word_evidence.queries(word_evidence.word_vectors(variables),
                               np.ones(40, np.float32), reviews)
  # With the BatchNorm's mean and shift at zero the model's own query is
  # the same sum, read through the same scale.
  stats['mean'] = np.zeros_like(stats['mean'])
  bn['bias'] = np.zeros_like(bn['bias'])
  theirs = embed.reviews(variables, model, reviews)
  np.testing.assert_allclose(ours, theirs, atol=1e-5)
  # Weights reweight the words: one word of weight 1, the rest 0, reads
  # that word alone.
  weights = np.zeros(40, np.float32)
  weights[tokens[1, 0]] = 1.0
  one = word_evidence.queries(word_evidence.word_vectors(variables),
                              weights, reviews)
  alone = embed.reviews(variables, model, {
      'tokens': tokens[1:2, :1], 'lengths': np.array([1], np.int32),
      'album': np.zeros(1, np.int32)})
  np.testing.assert_allclose(one[1], alone[0], atol=1e-5)
  # A review whose every word is cut reads all of them.
  np.testing.assert_allclose(one[0], ours[0], atol=1e-5)


def test_check_config_refuses_what_the_rule_cannot_read():
  config = test_config.get_config()
  config.eval.evidence_ks = '1,2'
  with pytest.raises(UserError, match='eval.evidence_ks'):
    config_check.validate_common(config)  # A non-linear head.
  config.model.linear = True
  config_check.validate_common(config)
  for bad in ('1,x', '0', '-1', 'nan'):
    config.eval.evidence_ks = bad
    with pytest.raises(UserError, match='eval.evidence_ks'):
      config_check.validate_common(config)
  config.eval.evidence_ks = '4'
  config.eval.evidence_min_albums = 0
  with pytest.raises(UserError, match='eval.evidence_min_albums'):
    config_check.validate_common(config)


def test_unreadable_rule_is_a_clear_error(tmp_path):
  with open(tmp_path / word_evidence.RULE_FILE, 'wb') as f:
    f.write(b'not a rule')
  with pytest.raises(UserError, match='unreadable'):
    word_evidence.load(str(tmp_path))
  assert word_evidence.load(str(tmp_path / 'none')) is None


@pytest.fixture(scope='module')
def gated_run(tiny_corpus_master, tmp_path_factory):
  """(config, workdir, train metrics) of a linear model with the rule."""
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.model.linear = True
  config.model.batch_norm = True
  config.eval.evidence_ks = '0.5,1,2,4'
  config.train.update(num_steps=40, eval_every=20, checkpoint_every=20)
  workdir = str(tmp_path_factory.mktemp('gated'))
  metrics = modes.run_mode('train', config, workdir, show_progress=False)
  return config, workdir, metrics


def test_training_fits_the_rule_and_evaluation_reads_it(gated_run):
  config, workdir, metrics = gated_run
  rule = word_evidence.load(workdir)
  assert rule is not None and rule.step == metrics['model_step']
  table = metrics['query_rule']['selection_recall@10']
  assert set(table) == {'off', '0.5', '1', '2', '4'}
  # The cut is the best on the selection split; ties go to off.
  best = max(table.values())
  chosen = 'off' if not rule.k else f'{rule.k:g}'
  assert table[chosen] == best
  assert table['off'] == best or rule.k
  mtime = os.path.getmtime(os.path.join(workdir, word_evidence.RULE_FILE))
  config = config.copy_and_resolve_references()
  result = modes.run_mode('eval', config, workdir, show_progress=False)
  assert result['query_rule'] == metrics['query_rule']
  assert result['recall@10'] == pytest.approx(metrics['recall@10'])
  # Read back, not fitted again.
  assert os.path.getmtime(os.path.join(workdir,
                                       word_evidence.RULE_FILE)) == mtime


def _copy_run(gated_run, tmp_path):
  """(config, copy of the run's workdir, its rule): a test may change both."""
  config, workdir, _ = gated_run
  run = str(tmp_path / 'run')
  shutil.copytree(workdir, run)
  config = config.copy_and_resolve_references()
  config.data.tfrecord_dir = os.path.join(workdir, 'data')
  return config, run, word_evidence.load(workdir)


def test_evaluation_applies_the_stored_cut(gated_run, tmp_path):
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from mardjax.evaluation import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mardjax.train import checkpoints  # pylint: disable=g-import-not-at-top
  config, run, rule = _copy_run(gated_run, tmp_path)
  metrics = gated_run[2]
  config.eval.update(bootstrap=0, split='test')
  off = config.copy_and_resolve_references()
  off.eval.evidence_ks = ''
  own = modes.run_mode('eval', off, run, show_progress=False)
  manifest = manifest_lib.load(config.data.tfrecord_dir)
  trained = checkpoints.load_for_inference(config, run, manifest)
  test = input_pipeline.load_reviews(manifest, 'test', config.data.max_len)
  albums, album_emb = embed.albums(trained.variables, trained.model,
                                   input_pipeline.load_audio_table(manifest))
  gated = word_evidence.queries(word_evidence.word_vectors(
      trained.variables), rule.weights(2.0), test)
  expected, _ = metrics_lib.report(albums, album_emb, gated, test['album'],
                                   both_directions=False)
  assert expected['mrr'] != pytest.approx(own['mrr'])  # Else no test.
  for k, want in ((0.0, own), (2.0, expected)):
    word_evidence.save(rule._replace(k=k), run)
    result = modes.run_mode('eval', config, run, show_progress=False)
    assert result['query_rule']['k'] == k
    assert result['mrr'] == pytest.approx(want['mrr'])
  # A rule fitted for another step is stale: fitted again.
  word_evidence.save(rule._replace(step=rule.step + 1, k=99.0), run)
  result = modes.run_mode('eval', config, run, show_progress=False)
  assert result['query_rule'] == metrics['query_rule']
  assert word_evidence.load(run).step == rule.step


def test_room_reads_texts_through_the_stored_cut(gated_run, tmp_path):
  from mardjax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from mardjax.serve import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  config, run, rule = _copy_run(gated_run, tmp_path)
  data_dir = config.data.tfrecord_dir
  word_evidence.save(rule._replace(k=2.0), run)
  room = embedder_lib.Embedder(config, run, data_dir)
  vocab = manifest_lib.read_vocabulary(room.manifest)
  # Words the rule cuts and words it keeps.
  weights = rule.weights(2.0)
  ids = np.concatenate([np.flatnonzero(weights[2:] == 0)[:5],
                        np.flatnonzero(weights[2:] > 0)[:5]]) + 2
  assert len(ids) == 10
  text = ' '.join(vocab.words[i] for i in ids)
  emb, known, _ = room.embed_text(text)
  ids, _ = vocab.encode(text.split(), config.data.max_len)
  tokens = np.zeros((1, config.data.max_len), np.int32)
  tokens[0, :len(ids)] = ids
  want = word_evidence.queries(
      word_evidence.word_vectors(room.variables), rule.weights(2.0),
      {'tokens': tokens, 'lengths': np.array([len(ids)], np.int32)})
  assert known == 10
  np.testing.assert_allclose(emb, want, atol=1e-6)
  # Off (or a rule fitted for another model): the model's own reading.
  word_evidence.save(rule._replace(k=0.0), run)
  own, _, _ = embedder_lib.Embedder(config, run, data_dir).embed_text(text)
  np.testing.assert_allclose(
      own, embed.text(room.model, room.variables, tokens,
                      np.array([len(ids)], np.int32)), atol=1e-6)
  assert not np.allclose(own, want, atol=1e-3)


def test_room_explains_a_text_as_the_rule_read_it(gated_run, tmp_path):
  """'Why these words' takes each word out of the text and reads the rest
  through the rule, as the room read the text: a word the rule cuts
  weighs 0, and a text left with cut words only reads them all."""
  from mardjax.serve import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  from mardjax.serve import explain  # pylint: disable=g-import-not-at-top
  config, run, rule = _copy_run(gated_run, tmp_path)
  word_evidence.save(rule._replace(k=2.0), run)
  room = embedder_lib.Embedder(config, run, config.data.tfrecord_dir)
  weights = rule.weights(2.0)
  cut, kept = (np.flatnonzero(weights[2:] == 0)[:3] + 2,
               np.flatnonzero(weights[2:] > 0)[:3] + 2)
  ids = np.array([cut[0], kept[0], cut[1], kept[1], kept[0], cut[2],
                  kept[2]], np.int32)
  target = np.asarray(room.embed_text(
      ' '.join(room.vocab.words[i] for i in kept[::-1]))[0])[0]

  def read(ts):
    tokens = np.zeros((1, config.data.max_len), np.int32)
    tokens[0, :len(ts)] = ts
    return word_evidence.queries(*room.gated, {
        'tokens': tokens, 'lengths': np.array([len(ts)], np.int32)})[0]

  words, got = explain.Explainer(room)._word_weights(ids, target[None])
  assert sorted(words) == sorted(set(ids))
  full = read(ids) @ target
  for w, weight in zip(words, got[:, 0]):
    np.testing.assert_allclose(weight, full - read(ids[ids != w]) @ target,
                               atol=2e-5)
    if w in cut:
      assert weight == pytest.approx(0.0, abs=2e-5)
  # Without its kept words the text reads its cut ones (the fallback).
  words, got = explain.Explainer(room)._word_weights(
      np.array([cut[0], kept[0], cut[1]], np.int32), target[None])
  np.testing.assert_allclose(
      got[list(words).index(kept[0]), 0],
      read([cut[0], kept[0], cut[1]]) @ target - read([cut[0], cut[1]])
      @ target, atol=2e-5)


def test_references_and_rows_keep_their_own_query():
  from configs import best  # pylint: disable=g-import-not-at-top
  from mardjax.experiments import ablation  # pylint: disable=g-import-not-at-top
  from mardjax.experiments import suite  # pylint: disable=g-import-not-at-top
  base = best.get_config()
  base.eval.bootstrap = 7
  assert base.eval.evidence_ks
  reference = suite.reference_config(base, 'configs.default')
  row = ablation.row_config(base, 'bi_nonlinear',
                            'configs.table1.bi_nonlinear')
  for config in (reference, row):
    assert config.eval.evidence_ks == ''
    assert config.eval.bootstrap == 7  # The protocol is the base's.
    config_check.validate_common(config)
  assert base.eval.evidence_ks  # The base's own is left alone.
