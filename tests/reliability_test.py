"""Never report a broken model as a good one; hostile input and filesystem
faults get one line, never a traceback or a silent success."""

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default as default_config
from configs import test as test_config
from mardjax import config_check
from mardjax import modes
from mardjax import stages
from mardjax.data import mard_io
from mardjax.errors import UserError
from mardjax.evaluation import metrics
from mardjax.train import checkpoints
from tests.conftest import ROOT


def _config(**train):
  config = test_config.get_config()
  config.train.update(train)
  return config


def _all_finite(tree):
  return all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree_util.tree_leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


# 1. A diverging run stops, and nothing non-finite is saved or promoted.

@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_its_good_checkpoints(tiny_records,
                                                              tmp_path):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=5, log_every=1000)
  stages.train_and_evaluate(_config(num_steps=10, **kw), str(tmp_path),
                            data_dir)
  best_before = sorted(os.listdir(tmp_path / checkpoints.BEST_DIR))
  # A learning rate that is finite but absurd: the state goes non-finite.
  with pytest.raises(UserError, match=r'loss became .* at step 1[1-9]\b.*'
                     r'The last good checkpoint is step 10'):
    stages.train_and_evaluate(_config(num_steps=40, learning_rate=1e6, **kw),
                              str(tmp_path), data_dir)
  steps = sorted(int(d) for d in os.listdir(
      tmp_path / checkpoints.CHECKPOINT_DIR) if d.isdigit())
  assert steps[-1] == 10
  assert sorted(os.listdir(tmp_path / checkpoints.BEST_DIR)) == best_before
  config = _config(num_steps=10, **kw)
  config.data.tfrecord_dir = data_dir
  trained = checkpoints.load_for_inference(config, str(tmp_path))
  assert _all_finite(trained.variables)


# 2. A checkpoint damaged on disk that still restores is set aside.

@pytest.mark.slow
def test_a_damaged_checkpoint_that_restores_is_set_aside(tiny_records,
                                                          tmp_path):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=1000)
  state, _ = stages.train_and_evaluate(_config(num_steps=10, **kw),
                                       str(tmp_path), data_dir)
  # What a damaged file that still decodes gives back: a NaN and an absurd
  # value in the parameters of the newest checkpoint.
  ckpt = checkpoints.Checkpoints(str(tmp_path / checkpoints.CHECKPOINT_DIR),
                                 keep=3, async_save=False)
  step, good, meta = ckpt.restore_latest(state)
  assert step == 10
  kernel = np.array(good.params['audio_head']['out']['kernel'])
  kernel.flat[0], kernel.flat[1] = np.nan, 4.9e35
  params = jax.tree_util.tree_map(np.asarray, good.params)
  params['audio_head']['out']['kernel'] = kernel
  ckpt.save(step, good.replace(params=params), meta)
  ckpt.close()
  resumed, result = stages.train_and_evaluate(_config(num_steps=12, **kw),
                                              str(tmp_path), data_dir)
  assert result['resumed_from'] == 5
  assert os.listdir(tmp_path / 'unreadable_checkpoints')
  assert _all_finite(resumed.params)


# 3. Metrics never score non-finite embeddings.

def test_metrics_refuse_non_finite_embeddings_and_repeated_albums():
  albums = np.arange(4)
  album_emb = np.eye(4, dtype=np.float32)
  reviews = np.eye(4, dtype=np.float32)[[0, 1, 2]]
  review_albums = np.array([0, 1, 2])
  out, _ = metrics.report(albums, album_emb, reviews, review_albums)
  assert out['recall@1'] == 1.0
  for bad_reviews, bad_albums, count in (
      (np.full_like(reviews, np.nan), album_emb, '3 of 3 review'),
      (reviews, np.where(np.arange(4)[:, None] == 2, np.inf, album_emb),
       '1 of 4 album')):
    with pytest.raises(UserError, match=count + ' embeddings are not finite'):
      metrics.report(albums, bad_albums, bad_reviews, review_albums)
  with pytest.raises(ValueError, match='repeated album ids'):
    metrics.review_to_album_counts(reviews, review_albums,
                                   np.array([0, 1, 2, 2]), album_emb)


# 4. Numbers beyond any float are a counted skip.

def test_a_huge_integer_in_a_descriptor_is_a_counted_skip(tiny_corpus,
                                                          tmp_path):
  from mardjax.data import preprocess  # pylint: disable=g-import-not-at-top
  docs = sorted(glob.glob(os.path.join(
      tiny_corpus, mard_io.EXPANDED_DESCRIPTOR_DIR, 'lowlevel', '**',
      '*.json'), recursive=True))
  with open(docs[0]) as f:
    doc = json.load(f)
  # Valid JSON: a 400-digit integer where a float is expected.
  doc['lowlevel']['zerocrossingrate']['max'] = int('9' * 400)
  with open(docs[0], 'w') as f:
    json.dump(doc, f)
  report = preprocess.preprocess_corpus(
      _config(), tiny_corpus, str(tmp_path / 'out'), show_progress=False)
  assert report['skipped']['tracks'].get('non_finite', 0) >= 1
  assert all(report['reconcile'].values())


def test_embed_counts_a_document_with_a_huge_integer(trained_room,
                                                    trained_config, tmp_path):
  _, workdir, _ = trained_room
  config = trained_config
  folder = tmp_path / 'in'
  folder.mkdir()
  doc = {'lowlevel': {'mfcc': {'mean': [int('9' * 400)] * 13}},
         'metadata': {'version': {'essentia': '2.1'}}}
  (folder / 'huge.json').write_text(json.dumps(doc))
  result = modes.run_mode('embed', config, workdir, show_progress=False,
                          input_dir=str(folder),
                          output_dir=str(tmp_path / 'out'))
  assert result['tracks'] == 0 and result['skipped'] == 1
  assert 'too large' in json.dumps(result['skipped_reasons'])


# 5. Filesystem faults are found before any work, in one line.

def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  workdir = tmp_path / 'run'
  workdir.write_text('not a directory')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
       os.path.join(ROOT, 'configs', 'test.py'), '--workdir', str(workdir),
       '--mode=eval'], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'), timeout=300)
  assert proc.returncode == 2
  assert f'error: {workdir} is a file' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_checkpoints_that_are_a_file_fail_before_training(tiny_corpus,
                                                          tmp_path):
  config = _config(num_steps=5)
  config.data.mard_dir = tiny_corpus
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / checkpoints.CHECKPOINT_DIR).write_text('oops')
  with pytest.raises(UserError, match='checkpoints is a file'):
    modes.run_mode('train', config, str(workdir), show_progress=False)
  assert not (workdir / 'data').exists()  # Nothing was preprocessed.


def test_a_descriptor_directory_that_is_a_file_is_an_error(tiny_corpus,
                                                           tmp_path):
  from mardjax.data import preprocess  # pylint: disable=g-import-not-at-top
  original = os.path.join(tiny_corpus, mard_io.ORIGINAL_DESCRIPTOR_DIR)
  shutil.rmtree(original)
  with open(original, 'w') as f:
    f.write('{}')
  with pytest.raises(UserError, match='acousticbrainz_descriptors.* is a '
                     'file'):
    preprocess.preprocess_corpus(_config(), tiny_corpus, str(tmp_path / 'out'),
                                 show_progress=False)


# 6. Config values that make no sense fail at once.

@pytest.mark.parametrize('field,value', [
    ('train.learning_rate', float('inf')), ('train.learning_rate', 0.0),
    ('loss.margin', -1.0), ('loss.margin', float('nan')),
    ('loss.temperature', 0.0), ('train.checkpoint_every', 0),
    ('train.eval_every', 0), ('train.log_every', 0), ('model.embed_dim', 0),
    ('train.keep_checkpoints', 0), ('train.num_epochs', -1),
    ('serve.max_upload_mb', -1.0),
    # Sizes no machine can hold, refused before any allocation.
    ('model.word_dim', 10**6), ('train.batch_size', 2**30),
    ('data.vocab_size', 10**9), ('serve.max_upload_mb', 1e5)])
def test_senseless_config_values_are_refused(field, value):
  config = test_config.get_config()
  config_check.validate_common(config)  # The untouched config passes.
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(UserError, match=rf'^config\.{field}={value!r}: must '
                     r'be (a|at|in) '):
    config_check.validate_common(config)


def test_an_embedding_no_machine_can_hold_is_refused():
  config = test_config.get_config()
  config.data.vocab_size, config.model.word_dim = 2**26, 2**14
  with pytest.raises(UserError, match=r'data.vocab_size=67108864: with model'
                     r'.word_dim=16384 the word embedding and its optimizer '
                     r'state need 12,288 GiB'):
    config_check.validate_common(config)


def test_loss_weights_must_be_finite_and_not_all_zero():
  config = test_config.get_config()
  for weights in ((0.0, 0.0, 0.0, 0.0), (1.0, float('nan'), 0.1, 0.1),
                  (1.0, -1.0, 0.1, 0.1)):
    config.loss.weights = weights
    with pytest.raises(UserError, match='loss.weights'):
      config_check.validate_common(config)


# 6b. Records lost without a count are not trained on unknowingly.

def _unreconciled_report(*_, **__):
  return {'reviews': {'train': 9}, 'reconcile': {'albums': True,
                                                 'reviews': False}}


def test_a_preprocessing_that_does_not_reconcile_warns_and_fails(
    monkeypatch, tmp_path):
  monkeypatch.setattr(stages, 'preprocess', _unreconciled_report)
  config = _config()
  result = modes.run_mode('preprocess', config, str(tmp_path),
                          show_progress=False)
  assert result['exit_status'] == modes.UNRECONCILED_EXIT
  assert 'do not reconcile for reviews' in result['warnings'][-1]
  with pytest.raises(UserError, match=r'do not reconcile with their input for '
                     r'reviews .* --config.data.accept_unreconciled=True'):
    modes.run_mode('train', config, str(tmp_path), show_progress=False)
  config.data.accept_unreconciled = True
  result = modes.run_mode('preprocess', config, str(tmp_path),
                          show_progress=False)
  assert result['exit_status'] == 0 and len(result['warnings']) == 1
  monkeypatch.setattr(stages, 'preprocess', lambda *_, **__: {
      'reconcile': {'albums': True, 'reviews': True}})
  assert 'exit_status' not in modes.run_mode(
      'preprocess', _config(), str(tmp_path), show_progress=False)


def test_launch_exits_non_zero_after_printing_an_unreconciled_result(
    tmp_path):
  code = ('import sys\n'
          'from absl import app\n'
          'import launch\n'
          'from mardjax import modes\n'
          'modes.MODES["preprocess"] = lambda *a: {"exit_status": 3, '
          '"warnings": ["w"]}\n'
          f'sys.argv = ["launch.py", "--mode=preprocess", "--workdir={tmp_path}"'
          ', "--config=configs/test.py"]\n'
          'app.run(launch.main, flags_parser=launch.parse_flags)\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                       capture_output=True, text=True)
  assert out.returncode == 3, out.stderr[-2000:]
  assert json.loads(out.stdout.strip().splitlines()[-1])['warnings'] == ['w']


# 7. The original MARD release: one AcousticBrainz document per album.

@pytest.mark.slow
def test_the_default_config_trains_on_single_track_albums(tiny_corpus,
                                                          tmp_path):
  shutil.rmtree(os.path.join(tiny_corpus, mard_io.EXPANDED_DESCRIPTOR_DIR))
  config = default_config.get_config()
  config.data.mard_dir = tiny_corpus
  config.data.num_workers = 1
  config.train.update(num_steps=2, eval_every=1000, log_every=1000,
                      checkpoint_every=1000)
  # The tiny corpus's training reviews barely fill one batch of 128 in
  # groups: none held out for selection.
  config.eval.validation_fraction = 0.0
  result = modes.run_mode('train', config, str(tmp_path / 'run'),
                          show_progress=False)
  assert result['data']['tracks'] == result['data']['albums']  # One each.
  assert result['steps'] == 2 and 0 <= result['recall@10'] <= 1


# 8. A run's data and model settings come from its checkpoint.

@pytest.mark.slow
def test_export_needs_no_data_flags_of_the_run(tiny_corpus_master, tmp_path):
  config = _config(num_steps=4, eval_every=4, checkpoint_every=4)
  config.data.mard_dir = tiny_corpus_master
  config.model.embed_dim = 8
  workdir = str(tmp_path / 'run')
  modes.run_mode('train', config, workdir, show_progress=False)
  # As `launch.py --mode=export` with none of the training run's flags.
  bare = test_config.get_config()
  result = modes.run_mode('export', bare, workdir, show_progress=False)
  assert result['embed_dim'] == 8
  assert result['reviews_without_text'] == 0  # It read the run's mard_dir.
  # What the command line sets still wins.
  with pytest.raises(UserError, match='No mard_reviews.json'):
    modes.run_mode('export', bare, workdir, overridden=frozenset(
        {'data.mard_dir'}))


# 9. Smaller things.

@pytest.mark.slow
def test_history_survives_a_resume(tiny_records, tmp_path):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=4, eval_every=4, log_every=1000)
  stages.train_and_evaluate(_config(num_steps=8, **kw), str(tmp_path),
                            data_dir)
  _, result = stages.train_and_evaluate(_config(num_steps=12, **kw),
                                        str(tmp_path), data_dir)
  assert result['resumed_from'] == 8
  assert [h['step'] for h in result['history']] == [0, 4, 8, 12]


def test_gzip_compressed_mard_files_are_read(tiny_corpus, tmp_path):
  from mardjax.data import preprocess  # pylint: disable=g-import-not-at-top
  plain = preprocess.preprocess_corpus(
      _config(), tiny_corpus, str(tmp_path / 'a'), show_progress=False)
  for name in (mard_io.REVIEWS_FILE, mard_io.METADATA_FILE):
    path = os.path.join(tiny_corpus, name)
    with open(path, 'rb') as f:
      data = f.read()
    with gzip.open(path, 'wb') as f:
      f.write(data)
  packed = preprocess.preprocess_corpus(
      _config(), tiny_corpus, str(tmp_path / 'b'), show_progress=False)
  assert packed['reviews'] == plain['reviews']
  assert packed['albums'] == plain['albums']
  with open(os.path.join(tiny_corpus, mard_io.REVIEWS_FILE), 'wb') as f:
    f.write(b'BZh91AY&SY' + b'\0' * 20)
  with pytest.raises(UserError, match='bzip2-compressed'):
    preprocess.preprocess_corpus(_config(), tiny_corpus, str(tmp_path / 'c'),
                                 show_progress=False)


@pytest.mark.slow
def test_reading_records_leaves_no_autograph_files(tiny_records, tmp_path):
  data_dir, _ = tiny_records
  code = ('import os, sys, tempfile\n'
          'from mardjax.data import input_pipeline, manifest\n'
          f'm = manifest.load({data_dir!r})\n'
          'input_pipeline.load_review_table(m, 64)\n'
          'input_pipeline.load_reviews(m, "dev", 64)\n'
          'print(sorted(os.listdir(tempfile.gettempdir())))\n'
          'sys.stdout.flush()\n'
          'os._exit(0)\n')  # As a killed run: no exit handlers.
  tmp = tmp_path / 'tmp'
  tmp.mkdir()
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True,
                       env=dict(os.environ, TMPDIR=str(tmp),
                                TF_CPP_MIN_LOG_LEVEL='3')).stdout
  assert out.strip().splitlines()[-1] == '[]'


@pytest.mark.parametrize('error', [
    OSError(28, 'No space left on device', '/full/run/train.jsonl'),
    RuntimeError('RESOURCE_EXHAUSTED: /full/run/events: No space left on '
                 'device')])
def test_a_full_disk_while_training_is_one_line(tiny_corpus_master, tmp_path,
                                                monkeypatch, error):
  from mardjax import progress  # pylint: disable=g-import-not-at-top

  class FullDisk(progress._LoggingWriter):  # pylint: disable=protected-access
    def write_scalars(self, step, scalars):
      raise error

  monkeypatch.setattr(progress, 'metric_writer', lambda *_, **__: FullDisk())
  config = _config(num_steps=2, eval_every=1000, log_every=1)
  config.data.mard_dir = tiny_corpus_master
  with pytest.raises(UserError, match=r'^cannot write .*No space left on '
                     r'device \(ENOSPC\)\. Outputs are written whole'):
    modes.run_mode('train', config, str(tmp_path), show_progress=False)
