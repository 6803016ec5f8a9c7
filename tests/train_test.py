"""The training loop end to end: learning, resuming, faults, bad configs."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import test as test_config
from mardjax import config_check
from mardjax import stages
from mardjax.evaluation import evaluate
from mardjax.train import checkpoints
from mardjax.errors import UserError
from tests.conftest import ROOT


def _config(**train_overrides):
  config = test_config.get_config()
  config.train.update(train_overrides)
  return config


def _params_close(a, b, atol=1e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                               atol=atol)


def _logged_losses(messages):
  """The training loss of each progress line ('step N/M loss X ...')."""
  return [float(m.split()[3]) for m in messages
          if m.startswith('step ') and m.split()[2] == 'loss']


@pytest.mark.slow
def test_training_learns_and_reports_recall(tiny_records, tmp_path, caplog):
  """Training learns: recall@10 on a fixed sample of 250 training reviews
  rises well above the untrained model's (the step-0 evaluation), and the
  logged training loss falls. Dev recall is checked only against chance:
  the tiny corpus has 23 dev queries, one query is 0.04 of recall, and its
  rise over 120 steps is within a query or two of noise (seeds 1 and 2
  gain nothing). The training sample's rise is 0.28 to 0.48 over seeds 0-2
  (from 0.22-0.37 to 0.65-0.72) and the loss of the last two progress
  lines is 0.33-0.49 of the first two's. With the learning rate cut by
  1e-9 the sample's recall moves by -0.13 to +0.09 (batch-norm statistics
  still update) and the loss ratio is 0.99-1.06; the bars (a rise above
  0.2, a ratio below 0.75) sit between the two."""
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  data_dir, _ = tiny_records
  config = _config(num_steps=120, eval_every=60, log_every=10,
                   checkpoint_every=60)
  config.eval.train_sample = 250
  with caplog.at_level('INFO'):
    state, metrics = stages.train_and_evaluate(config, str(tmp_path),
                                              data_dir)
  assert int(state.step) == 120
  # The run's execution plan: logged first, in its result and checkpoints.
  plan = plan_lib.resolve(config)
  assert metrics['plan'] == plan.asdict()
  # Before anything of the run itself (jax's own start-up may log first).
  first = caplog.messages.index(f'Plan: {plan.describe()}')
  assert all(not m.startswith(('step ', 'Resumed')) for m in
             caplog.messages[:first])
  with open(tmp_path / checkpoints.CHECKPOINT_DIR / '120' / 'meta' /
            'metadata') as f:
    assert json.load(f)['plan'] == plan.asdict()
  for k in ('recall@1', 'recall@5', 'recall@10'):
    assert 0.0 <= metrics[k] <= 1.0
  before, after = metrics['history'][0], metrics['history'][-1]
  assert before['step'] == 0 and after['step'] == 120
  gain = after['train_recall@10'] - before['train_recall@10']
  assert gain > 0.2, (
      'training did not learn: recall@10 on the training sample went from '
      f'{before["train_recall@10"]:.3f} (untrained) to '
      f'{after["train_recall@10"]:.3f} after 120 steps')
  losses = _logged_losses(caplog.messages)
  assert len(losses) == 12, losses
  first, last = np.mean(losses[:2]), np.mean(losses[-2:])
  assert last < 0.75 * first, (
      f'the training loss did not fall: {first:.4f} in the first two '
      f'progress lines, {last:.4f} in the last two ({losses})')
  # The reported model beats chance on the dev split.
  assert metrics['recall@10'] > metrics['random_recall@10']
  assert metrics['mrr'] > 0
  assert os.listdir(tmp_path / checkpoints.CHECKPOINT_DIR)
  # The best-by-recall copy holds the model's variables, not the optimizer.
  best = tmp_path / checkpoints.BEST_DIR / str(metrics['model_step'])
  saved = ocp.PyTreeCheckpointer().metadata(str(best / 'state'))
  assert 'params' in saved.item_metadata.tree
  assert set(saved.item_metadata.tree) <= set(checkpoints.VARIABLE_FIELDS)
  assert glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  # --mode=eval reads the run's model (its best evaluation) and gets the
  # numbers training reported for it.
  again = evaluate.evaluate_checkpoint(config, str(tmp_path), data_dir)
  assert again['step'] == metrics['model_step']
  assert again['checkpoint'] == checkpoints.BEST_DIR
  assert metrics['last']['step'] == 120
  np.testing.assert_allclose(again['recall@10'], metrics['recall@10'])
  # The full evaluation: both directions, CIs, chance beside, per genre.
  lo, hi = again['recall@10_ci95']
  assert lo <= again['recall@10'] <= hi
  assert again['album_to_review/recall@10'] > again[
      'album_to_review/random_recall@10']
  assert sum(g['num_queries'] for g in again['per_genre'].values()) == (
      again['num_queries'])
  assert glob.glob(str(tmp_path / 'eval' / 'events.out.tfevents.*'))
  config.eval.split = 'test'
  test = evaluate.evaluate_checkpoint(config, str(tmp_path), data_dir)
  assert test['split'] == 'test' and test['num_queries'] > 0


def _scripted_evaluator(recalls):
  """An evaluator factory whose recall@10 follows `recalls` (then repeats
  the last), the rest of its metrics real."""
  def make(config, model, manifest, audio, reviews):
    real = evaluate.dev_evaluator(config, model, manifest, audio, reviews)
    script = list(recalls)

    def evaluator(variables):
      out = real(variables)
      out['recall@10'] = script.pop(0) if len(script) > 1 else script[0]
      return out
    return evaluator
  return make


@pytest.mark.slow
def test_early_stopping_reports_the_best_model_and_stays_stopped(
    tiny_records, tmp_path):
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  data_dir, _ = tiny_records
  config = _config(num_steps=40, eval_every=5, log_every=5,
                   checkpoint_every=5, early_stop_patience=2)
  # Selection on dev: the scripted recall is also the reported one.
  config.eval.validation_fraction = 0.0
  workdir = str(tmp_path)
  # Evaluations at steps 0, 5, 10, 15: best at 5, then two without gain.
  state, metrics = trainer.train_and_evaluate(
      config, workdir, data_dir, _scripted_evaluator([0.1, 0.3, 0.2, 0.2]))
  assert int(state.step) == 15 and metrics['steps'] == 15
  assert metrics['stopped_early'] is True
  assert metrics['model_step'] == 5 and metrics['recall@10'] == 0.3
  assert metrics['last'] == {'step': 15, **{
      k: metrics['history'][-1][k] for k in ('recall@1', 'recall@5',
                                              'recall@10')}}
  assert [h['step'] for h in metrics['history']] == [0, 5, 10, 15]
  # Run again: nothing more is trained and the same model is reported.
  state, again = trainer.train_and_evaluate(
      config, workdir, data_dir, _scripted_evaluator([0.9]))
  assert int(state.step) == 15 and again['resumed_from'] == 15
  assert again['model_step'] == 5 and again['recall@10'] == 0.3
  assert again['stopped_early'] is True
  # Evaluation and serving read the step-5 model.
  assert evaluate.evaluate_checkpoint(config, workdir, data_dir)[
      'step'] == 5
  # Patience 0 never stops: the same scripted run trains to the end.
  config.train.early_stop_patience = 0
  state, metrics = trainer.train_and_evaluate(
      config, str(tmp_path / 'full'), data_dir,
      _scripted_evaluator([0.1, 0.3, 0.2, 0.2]))
  assert int(state.step) == 40 and metrics['stopped_early'] is False
  assert metrics['model_step'] == 5


@pytest.mark.slow
def test_model_selection_reads_reviews_held_out_of_training(tiny_records,
                                                           tmp_path):
  """`eval.validation_fraction` holds training reviews out of training (the
  same ones every run, by review hash); the best checkpoint is chosen by
  recall on them, and the run reports that model's dev metrics, as
  evaluating its checkpoint gives them. With 0, dev is read for both."""
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.data import splits  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  data_dir, manifest = tiny_records
  config = _config(num_steps=20, eval_every=10, log_every=10,
                   checkpoint_every=10)
  config.eval.validation_fraction = 0.1
  assert default.get_config().eval.validation_fraction == 0.1
  data = trainer.load_training_data(config, data_dir)
  train = input_pipeline.load_reviews(manifest, 'train',
                                      config.data.max_len)
  held = splits.in_validation(train['review_id'], 0.1,
                              config.data.split_salt)
  assert 0 < held.sum() < len(held) // 4
  # The same reviews (tf.data interleaves the files: another order).
  mine, theirs = (np.argsort(data.validation['review_id']),
                  np.argsort(train['review_id'][held]))
  np.testing.assert_array_equal(data.validation['review_id'][mine],
                                train['review_id'][held][theirs])
  np.testing.assert_array_equal(data.validation['tokens'][mine],
                                train['tokens'][held][theirs])
  assert len(data.reviews) == (~held).sum()
  np.testing.assert_array_equal(np.sort(data.reviews.album),
                                np.sort(train['album'][~held]))
  _, metrics = stages.train_and_evaluate(config, str(tmp_path / 'v'),
                                         data_dir)
  selection = metrics['selection']
  assert selection['split'] == 'validation'
  assert selection['step'] == metrics['model_step']
  best = max(metrics['history'], key=lambda h: h['recall@10'])
  assert selection['recall@10'] == best['recall@10']
  dev = evaluate.evaluate_checkpoint(config, str(tmp_path / 'v'), data_dir)
  assert dev['step'] == metrics['model_step']
  assert dev['recall@10'] == pytest.approx(metrics['recall@10'])
  assert dev['num_queries'] == metrics['num_queries'] != len(
      data.validation['album'])
  config.eval.validation_fraction = 0.0
  # The run held out other reviews: it is not resumed with these.
  with pytest.raises(UserError, match=r'held out eval.validation_fraction='
                     r'0.1 .* this config holds out 0.0'):
    stages.train_and_evaluate(config, str(tmp_path / 'v'), data_dir)
  _, metrics = stages.train_and_evaluate(config, str(tmp_path / 'd'),
                                         data_dir)
  assert metrics['selection']['split'] == 'dev'
  assert metrics['selection']['recall@10'] == metrics['recall@10']
  config.eval.validation_fraction = 1e-9
  with pytest.raises(UserError, match='holds out none of the'):
    trainer.load_training_data(config, data_dir)


def test_eval_of_a_split_without_reviews_is_a_clear_error(tiny_corpus_master,
                                                         tmp_path):
  from mardjax.data import preprocess  # pylint: disable=g-import-not-at-top
  config = _config(num_steps=2, eval_every=2, checkpoint_every=2)
  config.data.test_album_fraction = 0.0
  data_dir = str(tmp_path / 'data')
  preprocess.preprocess_corpus(config, tiny_corpus_master, data_dir,
                               show_progress=False)
  stages.train_and_evaluate(config, str(tmp_path / 'w'), data_dir)
  config.eval.split = 'test'
  with pytest.raises(UserError, match='holds no held-out reviews'):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'w'), data_dir)
  with pytest.raises(UserError, match='No checkpoint'):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'empty'), data_dir)


@pytest.mark.slow
def test_late_logged_metrics_are_each_steps_own(tiny_records, tmp_path,
                                                monkeypatch):
  """Log-only boundaries fetch their metrics one dispatch late
  (`trainer._Window`): every boundary is logged once, in order, with the
  metrics a run that waits at each boundary (an evaluation at each) logs."""
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  data_dir, _ = tiny_records
  runs = []
  for eval_every in (10, 2):
    logged = []
    monkeypatch.setattr(trainer, '_log', lambda run, step, m, rate: (
        logged.append((step, {k: float(v) for k, v in m.items()}))))
    config = _config(num_steps=10, log_every=2, eval_every=eval_every,
                     checkpoint_every=10)
    stages.train_and_evaluate(config, str(tmp_path / str(eval_every)),
                              data_dir)
    assert [step for step, _ in logged] == [2, 4, 6, 8, 10]
    runs.append(logged)
  assert runs[0] == runs[1]


def test_the_loop_runs_with_setups_objects_frozen(tiny_records, tmp_path,
                                                 monkeypatch):
  """`timing.Clock.loop`: while the steps run, what setup left alive
  (the model, the tables: thousands of objects) is out of the collector's
  full passes; when the run ends, even by an error, it is handed back."""
  import gc  # pylint: disable=g-import-not-at-top
  from mardjax.train import trainer  # pylint: disable=g-import-not-at-top
  data_dir, _ = tiny_records
  before = gc.get_freeze_count()
  frozen = []
  steps = trainer._steps

  def watched(run, it):
    frozen.append(gc.get_freeze_count())
    return steps(run, it)
  monkeypatch.setattr(trainer, '_steps', watched)
  stages.train_and_evaluate(_config(num_steps=2, eval_every=1000,
                                    log_every=2, checkpoint_every=2),
                            str(tmp_path / 'ok'), data_dir)
  assert frozen[0] > before + 10_000
  assert gc.get_freeze_count() == before

  def fails(run, it):
    raise RuntimeError('mid-run failure')
  monkeypatch.setattr(trainer, '_steps', fails)
  with pytest.raises(RuntimeError, match='mid-run failure'):
    stages.train_and_evaluate(_config(num_steps=2), str(tmp_path / 'bad'),
                              data_dir)
  assert gc.get_freeze_count() == before


@pytest.mark.slow
def test_prefetch_thread_feeds_the_same_batches(tiny_records, tmp_path):
  """'auto' builds batches in the loop's thread on CPUs; a prefetch thread
  (accelerators' auto, here with batches assembled on the device, whose
  plans the thread makes) trains on the same batches in the same order."""
  from mardjax import plan as plan_lib  # pylint: disable=g-import-not-at-top
  data_dir, _ = tiny_records
  assert plan_lib.resolve(_config()).prefetch_batches == 0  # CPU's auto.
  states = [stages.train_and_evaluate(
      _config(num_steps=9, eval_every=1000, log_every=3, checkpoint_every=9,
              batch_assembly='device', prefetch_batches=depth),
      str(tmp_path / str(depth)), data_dir)[0] for depth in (0, 2)]
  _params_close(states[0].params, states[1].params, atol=0)


@pytest.mark.slow
def test_album_lstm_trains_and_evaluates(tiny_records, tmp_path):
  data_dir, _ = tiny_records
  config = _config(num_steps=4, eval_every=4, log_every=2, checkpoint_every=4)
  config.model.audio_encoder = 'album_lstm'
  config.model.max_tracks = 6
  state, metrics = stages.train_and_evaluate(config, str(tmp_path), data_dir)
  assert int(state.step) == 4 and 'album_rnn' in state.params
  again = evaluate.evaluate_checkpoint(config, str(tmp_path), data_dir)
  np.testing.assert_allclose(again['recall@10'], metrics['recall@10'])


@pytest.mark.slow
@pytest.mark.parametrize('parallelism,assembly', [
    ('pmap', 'host'), ('shard_map', 'host'), ('pmap', 'device')])
def test_resumed_run_ends_with_the_same_parameters(tiny_records, tmp_path,
                                                   parallelism, assembly):
  """Also with batches assembled on the device (the lazy LSTM: packing
  plans and word lists made again from the resumed position)."""
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=7, eval_every=1000, log_every=1000,
            parallelism=parallelism, batch_assembly=assembly)

  def config(steps):
    c = _config(num_steps=steps, **kw)
    if assembly == 'device':
      c.model.text_encoder = 'lstm'
      c.train.embedding_update = 'lazy'
    return c
  straight, _ = stages.train_and_evaluate(config(25), str(tmp_path / 'a'),
                                         data_dir)
  stages.train_and_evaluate(config(14), str(tmp_path / 'b'), data_dir)
  resumed, metrics = stages.train_and_evaluate(config(25),
                                              str(tmp_path / 'b'), data_dir)
  assert metrics['plan']['batch_assembly'] == assembly
  assert metrics['resumed_from'] == 14
  _params_close(straight.params, resumed.params)
  _params_close(straight.opt_state, resumed.opt_state)


_SHARDED_RUN = (
    'import sys\n'
    'import jax\n'
    'import numpy as np\n'
    'from configs import test as test_config\n'
    'from mardjax import stages\n'
    'workdir, steps, sharding, out, data_dir = sys.argv[1:]\n'
    'config = test_config.get_config()\n'
    'config.train.update(num_steps=int(steps), eval_every=1000,\n'
    '    checkpoint_every=10, log_every=1000, parallelism="shard_map",\n'
    '    embedding_update="dense", optimizer_sharding=sharding,\n'
    '    optimizer_shard_min_size=1024)\n'
    '# Nothing that depends on how the batch is split over the devices.\n'
    'config.model.batch_norm = False\n'
    'config.loss.negatives = "all"\n'
    'config.loss.gather_across_devices = True\n'
    'state, m = stages.train_and_evaluate(config, workdir, data_dir)\n'
    'np.savez(out, *[np.asarray(x) for x in jax.tree_util.tree_leaves(\n'
    '    (state.params, state.opt_state))])\n'
    'print(m["plan"]["optimizer_sharding"], m["resumed_from"],\n'
    '      jax.local_device_count())\n')


@pytest.mark.slow
def test_sharded_optimizer_state_resumes_on_another_device_count(
    tiny_records, tmp_path):
  """A run with its optimizer state sharded over 4 devices checkpoints the
  moments in the parameters' shapes: the checkpoint reads back unchanged on
  2 devices (where the word table's 502 rows pad differently), and
  training resumed there ends where the uninterrupted 4-device run
  does (within float round-off: the devices sum in another order; the
  loss gathers every device's rows, so its value does not depend on the
  split)."""
  data_dir, _ = tiny_records

  def run(workdir, steps, devices, sharding='sharded'):
    out = str(tmp_path / f'{os.path.basename(workdir)}-{steps}-{devices}.npz')
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    proc = subprocess.run(
        [sys.executable, '-c', _SHARDED_RUN, str(workdir), str(steps),
         sharding, out, data_dir],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan, resumed, seen = proc.stdout.split()[-3:]
    assert int(seen) == devices
    with np.load(out) as f:
      return plan, int(resumed), [f[k] for k in sorted(
          f.files, key=lambda k: int(k.split('_')[1]))]

  plan, _, straight = run(tmp_path / 'a', 20, 4)
  assert plan == 'sharded'
  _, _, half = run(tmp_path / 'b', 10, 4)
  plan, resumed, again = run(tmp_path / 'b', 10, 2)
  assert (plan, resumed) == ('sharded', 10)
  for x, y in zip(half, again):  # Read back as it was saved.
    np.testing.assert_array_equal(x, y)
  _, resumed, ended = run(tmp_path / 'b', 20, 2)
  assert resumed == 10
  _params_close(straight, ended, atol=2e-4)


@pytest.mark.slow
def test_unreadable_newest_checkpoint_falls_back(tiny_records, tmp_path,
                                                 caplog):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=1000)
  stages.train_and_evaluate(_config(num_steps=10, **kw), str(tmp_path),
                            data_dir)
  newest = tmp_path / checkpoints.CHECKPOINT_DIR / '10'
  for path in glob.glob(str(newest / 'state' / '**' / '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'wb') as f:
        f.write(b'garbage')
  _, metrics = stages.train_and_evaluate(_config(num_steps=12, **kw),
                                         str(tmp_path), data_dir)
  assert metrics['resumed_from'] == 5
  assert any('unreadable' in r.getMessage() for r in caplog.records)


def test_a_different_manifest_is_refused(tiny_records, tmp_path):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=1000)
  stages.train_and_evaluate(_config(num_steps=5, **kw), str(tmp_path / 'w'),
                            data_dir)
  other = tmp_path / 'other'
  shutil.copytree(data_dir, other)
  with open(other / 'manifest.json') as f:
    manifest = json.load(f)
  # Other data with another vocabulary: the state would not even fit.
  manifest['vocab']['size'] += 7
  with open(other / 'manifest.json', 'w') as f:
    json.dump(manifest, f)
  with pytest.raises(UserError, match='different data'):
    stages.train_and_evaluate(_config(num_steps=10, **kw), str(tmp_path / 'w'),
                              str(other))
  with pytest.raises(UserError, match='different data'):
    evaluate.evaluate_checkpoint(_config(), str(tmp_path / 'w'), str(other))
  # The refused checkpoints were left where they were.
  assert '5' in os.listdir(tmp_path / 'w' / checkpoints.CHECKPOINT_DIR)
  assert not (tmp_path / 'w' / 'unreadable_checkpoints').exists()


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_last_checkpoint(tiny_records,
                                                          tmp_path):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=5)
  stages.train_and_evaluate(_config(num_steps=10, **kw), str(tmp_path),
                            data_dir)
  # Resume with an absurd learning rate: the state goes non-finite after
  # step 10, and the step that did it is named (checked every step).
  config = _config(num_steps=40, learning_rate=1e30, **kw)
  with pytest.raises(UserError, match=r'loss became \S+ at step 1[1-5] .*'
                     r'The last good checkpoint is step 10'):
    stages.train_and_evaluate(config, str(tmp_path), data_dir)
  steps = sorted(int(d) for d in os.listdir(tmp_path / checkpoints.CHECKPOINT_DIR)
                 if d.isdigit())
  assert steps[-1] == 10  # The NaN state was not saved.


@pytest.mark.parametrize('field,value,message', [
    ('train.batch_size', 34, 'not divisible by the 4 devices'),
    ('loss.negatives', 'sampled:9', 'larger than'),
    ('loss.negatives', 'best:3', 'negatives'),
    ('model.text_encoder', 'gru', 'text_encoder'),
    ('train.parallelism', 'pjit', 'parallelism'),
    ('train.reviews_per_album', 3, 'multiple of'),
    ('train.prefetch_batches', -2, 'at least -1'),
    ('loss.kind', 'hinge', 'loss.kind'),
    ('eval.validation_fraction', 1.0, r'validation_fraction.*\[0, 1\)'),
    ('train.optimizer_sharding', 'zero', 'optimizer_sharding'),
    ('train.optimizer_shard_min_size', 0, 'optimizer_shard_min_size'),
])
def test_bad_configs_fail_before_compiling(field, value, message):
  config = test_config.get_config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(UserError, match=message):
    config_check.validate(config, num_devices=4)


def _launch_train(workdir, num_steps, corpus, data_dir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
       os.path.join(ROOT, 'configs', 'test.py'), '--workdir', str(workdir),
       '--mode=train', '--noprogress', f'--config.train.num_steps={num_steps}',
       '--config.train.checkpoint_every=3', '--config.train.eval_every=1000',
       '--config.train.log_every=1000', f'--config.data.mard_dir={corpus}',
       f'--config.data.tfrecord_dir={data_dir}'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _final_params(workdir, data_dir, num_steps):
  config = _config(num_steps=num_steps, checkpoint_every=3)
  state, _ = stages.train_and_evaluate(config, str(workdir), data_dir)
  return state


@pytest.mark.slow
def test_sigkill_mid_training_then_restart_matches_uninterrupted(
    tmp_path, tiny_corpus_master, tiny_records):
  steps = 60
  data_dir, _ = tiny_records
  launch = lambda w: _launch_train(w, steps, tiny_corpus_master, data_dir)
  straight = launch(tmp_path / 'a')
  out, err = straight.communicate(timeout=600)
  assert straight.returncode == 0, err
  killed = launch(tmp_path / 'b')
  ckpts = tmp_path / 'b' / checkpoints.CHECKPOINT_DIR
  deadline = time.time() + 600
  while time.time() < deadline:
    done = [d for d in os.listdir(ckpts) if d.isdigit()] if ckpts.exists() \
        else []
    if done and max(map(int, done)) >= 9:
      break
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  done = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert done and done[-1] < steps, 'the run finished before it was killed'
  restart = launch(tmp_path / 'b')
  out, err = restart.communicate(timeout=600)
  assert restart.returncode == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert 0 < result['resumed_from'] < steps
  a = _final_params(tmp_path / 'a', data_dir, steps)
  b = _final_params(tmp_path / 'b', data_dir, steps)
  assert int(a.step) == int(b.step) == steps
  _params_close(a.params, b.params)


@pytest.mark.slow
@pytest.mark.parametrize('encoder,update,devices,parallelism', [
    ('mean', 'dense', 1, 'pmap'), ('mean', 'dense', 4, 'shard_map'),
    ('mean', 'dense', 4, 'pmap'), ('lstm', 'dense', 4, 'pmap'),
    ('lstm', 'lazy', 4, 'shard_map'), ('mean', 'lazy', 1, 'pmap')])
def test_device_assembled_training_equals_host_assembled(
    tiny_records, tmp_path, encoder, update, devices, parallelism):
  """The mean model (flat layout under the dense update) and the LSTM
  model (packed rows), with the dense or the lazy update (the batch's word
  list from the host, slots made in the step), train on batches built on
  the device from indices, one or several steps per dispatch, on one
  device or on 4 (a shard_map mesh with the tables replicated on it, or
  pmap with a copy per device, each assembling its share): the run is the
  host-assembled run, bit for bit. The LSTM's directions run in one loop
  under pmap (as 'auto' runs them on accelerators), a loop each under
  shard_map."""
  data_dir, _ = tiny_records
  code = (
      'import json, sys\n'
      'import jax\n'
      'from configs import test as test_config\n'
      'from mardjax import stages\n'
      'config = test_config.get_config()\n'
      'config.train.update(num_steps=14, eval_every=7, checkpoint_every=7,\n'
      '    log_every=7, embedding_update=sys.argv[6],\n'
      '    batch_assembly=sys.argv[1],\n'
      '    steps_per_dispatch=int(sys.argv[3]), parallelism=sys.argv[4])\n'
      'config.model.text_encoder = sys.argv[5]\n'
      'config.model.lstm_loop = ("bidirectional" if sys.argv[4] == "pmap"\n'
      '                          else "per_direction")\n'
      f'_, m = stages.train_and_evaluate(config, sys.argv[2], {data_dir!r})\n'
      'm["devices"] = jax.local_device_count()\n'
      'm.update({k: m["plan"][k] for k in ("batch_assembly",\n'
      '                                     "steps_per_dispatch")})\n'
      'print(json.dumps({k: m[k] for k in (\n'
      '    "params_sha256", "recall@10", "batch_assembly",\n'
      '    "steps_per_dispatch", "devices")}))\n')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  out = {}
  # Device assembly three steps per dispatch (a scan), and single steps
  # where a log, checkpoint or evaluation falls sooner (steps 7 and 14).
  for assembly, per_dispatch in (('host', 1), ('device', 3)):
    name = f'{assembly}{per_dispatch}'
    proc = subprocess.run(
        [sys.executable, '-c', code, assembly, str(tmp_path / name),
         str(per_dispatch), parallelism, encoder, update],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out[name].pop('batch_assembly') == assembly
    assert out[name].pop('steps_per_dispatch') == per_dispatch
    assert out[name].pop('devices') == devices
  assert out['host1'] == out['device3']


@pytest.mark.slow
def test_the_best_config_trains_and_beats_chance(tiny_records, tmp_path):
  from configs import best  # pylint: disable=g-import-not-at-top
  data_dir, _ = tiny_records
  config = best.get_config()
  small = test_config.get_config()
  config.data = small.data
  # The tiny corpus's selection, on dev (configs/test.py says why).
  config.eval.validation_fraction = small.eval.validation_fraction
  for field in ('word_dim', 'hidden_dim', 'embed_dim', 'lstm_dim'):
    config.model[field] = small.model[field]
  # Linear heads reading 30% of the words learn more slowly than the
  # non-linear ones at this size, and with every review in training
  # (fill_groups) a step also trains the single-review albums, none of
  # which the dev split holds: 500 steps, where 300 fell short.
  config.train.update(batch_size=32, num_steps=500, warmup_steps=10,
                      eval_every=50, log_every=50, checkpoint_every=50)
  # 8 rows per device of the 4 forced CPU devices: fewer hardest negatives
  # (and as many uniform ones).
  assert config.loss.negatives == 'hardest:10+sampled:10'
  config.loss.negatives = 'hardest:5+sampled:5'
  config_check.validate(config, jax.local_device_count())
  _, metrics = stages.train_and_evaluate(config, str(tmp_path), data_dir)
  assert metrics['recall@10'] > 2 * metrics['random_recall@10']
  assert metrics['model_step'] in range(0, 501, 50)
  # Its recipe differs from the paper's where the README says it does.
  paper = test_config.get_config()
  assert (config.loss.negatives, config.model.word_dropout,
          config.train.lr_schedule) != (paper.loss.negatives,
                                        paper.model.word_dropout,
                                        paper.train.lr_schedule)
