"""Checkpoints prove they are intact: array checksums recorded at save and
verified at restore, divergence naming only intact checkpoints, and reading
modes falling back from a best-by-recall checkpoint that is not intact."""

import glob
import hashlib
import json
import logging
import os
import shutil
import types

import jax
import numpy as np
import pytest

from configs import test as test_config
from tests.conftest import copy_trained_run
from mardjax import stages
from mardjax.errors import UserError
from mardjax.train import checkpoints

# The first bytes of an OCDBT b-tree node; the other data files hold the
# arrays' bytes.
def _config(**train):
  config = test_config.get_config()
  config.train.update(train)
  return config


def _array_file(step_dir):
  """The largest file of a saved state's data folders: mostly the arrays'
  bytes. (OCDBT writes b-tree nodes into data files too, sometimes at the
  start of the file that holds the arrays, as the writes' order falls: a
  file's first bytes do not say whether it holds arrays.)"""
  files = [p for p in glob.glob(os.path.join(step_dir, 'state', '**', 'd',
                                             '*'), recursive=True)
           if os.path.isfile(p)]
  assert files, f'no data file under {step_dir}'
  return max(files, key=os.path.getsize)


def _damage(step_dir, how):
  """Other bytes in the middle of the largest data file, its size kept:
  'flip' inverts four, 'zero' zeroes a run of them (4 KiB, or an eighth
  of the file if smaller), well inside the arrays' bytes."""
  path = _array_file(step_dir)
  size = os.path.getsize(path)
  run = 4 if how == 'flip' else min(4096, size // 8)
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    data = f.read(run)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in data) if how == 'flip'
            else bytes(len(data)))


def _warnings(caplog, text):
  return [r.getMessage() for r in caplog.records
          if r.levelno >= logging.WARNING and text in r.getMessage()]


def _state(step, rng):
  return {'table': rng.normal(size=(256, 512)).astype(np.float32) + step,
          'bias': np.full((7,), step, np.float32),
          'step': np.asarray(step, np.int32)}


def _zeros_like(state):
  return {k: np.zeros_like(v) for k, v in state.items()}


@pytest.mark.parametrize('how', ['flip', 'zero'])
def test_damaged_array_bytes_are_set_aside_for_the_previous_step(
    tmp_path, caplog, how):
  rng = np.random.default_rng(0)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(directory, keep=3)
  saved = {}
  for step in (1, 2):
    saved[step] = _state(step, rng)
    ckpt.save(step, saved[step], {'step': step})
  ckpt.close()
  # Valid files, other bytes: orbax reads them back without an error.
  _damage(os.path.join(directory, '2'), how)
  ckpt = checkpoints.Checkpoints(directory, keep=3, async_save=False)
  with caplog.at_level('WARNING'):
    step, state, _ = ckpt.restore_latest(_zeros_like(saved[1]))
  ckpt.close()
  assert step == 1
  for k in saved[1]:
    np.testing.assert_array_equal(state[k], saved[1][k])
  lines = _warnings(caplog, 'ChecksumMismatch')
  assert len(lines) == 1 and f'{directory}/2 is unreadable' in lines[0]
  assert '\n' not in lines[0]
  assert [d.split('-')[0] for d in os.listdir(tmp_path /
                                              'unreadable_checkpoints')] == [
                                                  '2']


def test_checksums_are_of_every_array_and_catch_a_missing_record(tmp_path,
                                                                 caplog):
  """Every saved array has a checksum: the blake2b-256 that the record names,
  of its dtype's name, its shape (a scalar's as (1,)) and its bytes, so that
  another version of mardjax, or any tool, can verify the files. A
  checkpoint of the current format without its checksums is not trusted."""
  rng = np.random.default_rng(1)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(directory, keep=3, async_save=False)
  saved = {}
  for step in (1, 2):
    saved[step] = _state(step, rng)
    ckpt.save(step, saved[step], {'step': step})
  with open(os.path.join(directory, '2', checkpoints.DIGEST_ITEM,
                         'metadata')) as f:
    record = json.load(f)
  assert sorted(record['arrays']) == ['bias', 'step', 'table']
  assert record['algorithm'] == 'blake2b-256'
  for name, x in saved[2].items():
    x = np.atleast_1d(x)  # As hashed: a scalar has the shape (1,).
    digest = hashlib.blake2b(f'{x.dtype.name}{x.shape}'.encode() +
                             x.tobytes(), digest_size=32)
    assert record['arrays'][name] == digest.hexdigest()
    assert record['dtypes'][name] == x.dtype.name
  # A current checkpoint without its checksums is not trusted.
  shutil.rmtree(os.path.join(directory, '2', checkpoints.DIGEST_ITEM))
  with caplog.at_level('WARNING'):
    step, _, _ = ckpt.restore_latest(_zeros_like(_state(0, rng)))
  assert step == 1
  assert len(_warnings(caplog, 'checksums cannot be read')) == 1
  ckpt.close()


def test_checkpoints_from_before_checksums_load_with_one_warning(tmp_path,
                                                                 caplog):
  rng = np.random.default_rng(2)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(directory, keep=3, async_save=False)
  saved = _state(3, rng)
  ckpt.save(3, saved, {'step': 3})
  # As format 2 wrote it: no digests item.
  shutil.rmtree(os.path.join(directory, '3', checkpoints.DIGEST_ITEM))
  meta_file = os.path.join(directory, '3', 'meta', 'metadata')
  with open(meta_file) as f:
    meta = json.load(f)
  meta['format_version'] = 2
  with open(meta_file, 'w') as f:
    json.dump(meta, f)
  ckpt.manager.reload()
  with caplog.at_level('WARNING'):
    step, state, _ = ckpt.restore_latest(_zeros_like(saved))
  ckpt.close()
  assert step == 3
  np.testing.assert_array_equal(state['table'], saved['table'])
  lines = _warnings(caplog, 'no checksums')
  assert len(lines) == 1 and 'older mardjax' in lines[0]
  assert not (tmp_path / 'unreadable_checkpoints').exists()


def test_restore_best_takes_the_intact_step_with_the_best_recall(tmp_path):
  """`restore_best` ranks a checkpoint by the dev recall@10 recorded for its
  own step (not by an earlier step's in its history): the best first, then
  those not evaluated at their step, newest first."""
  rng = np.random.default_rng(3)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(directory, keep=5, async_save=False)
  recalls = {2: 0.5, 4: None, 6: 0.3, 8: None}
  history = []
  for step, recall in recalls.items():
    if recall is not None:
      history.append({'step': step, 'recall@10': recall})
    ckpt.save(step, _state(step, rng), {'step': step,
                                        'history': list(history)})
  target = _zeros_like(_state(0, rng))
  for best in (2, 6, 8):
    assert ckpt.restore_best(target)[0] == best
    _damage(os.path.join(directory, str(best)), 'flip')
  assert ckpt.restore_latest(target)[0] == 4
  ckpt.close()


def test_checksums_of_an_unknown_algorithm_are_not_trusted(tmp_path, caplog):
  """A record of checksums by another algorithm than this code's verifies
  nothing, whether its name sorts before or after this code's: the
  checkpoint is set aside for the previous one, with a warning that quotes
  the error whole up to 300 characters, and its first 300 followed by '...'
  beyond."""
  rng = np.random.default_rng(4)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(directory, keep=4, async_save=False)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(step, rng), {'step': step})
  errors = {}
  for step, length in ((2, 300), (3, 301), (4, 38)):
    path = os.path.join(directory, str(step), checkpoints.DIGEST_ITEM,
                        'metadata')
    with open(path) as f:
      record = json.load(f)
    # 'sha256-...' sorts after 'blake2b-256', 'adler32' before it.
    record['algorithm'] = ('adler32' if step == 4 else 'sha256-').ljust(
        length - len("unknown checksum algorithm ''"), 'x')
    with open(path, 'w') as f:
      json.dump(record, f)
    errors[step] = f'unknown checksum algorithm {record["algorithm"]!r}'
    assert len(errors[step]) == length
  with caplog.at_level('WARNING'):
    step, state, _ = ckpt.restore_latest(_zeros_like(_state(0, rng)))
  ckpt.close()
  assert step == 1 and float(state['bias'][0]) == 1
  (short,), (newest,), (older,) = (
      _warnings(caplog, f'{directory}/{step} is unreadable')
      for step in (4, 3, 2))
  assert f'(ChecksumMismatch: {errors[4]}), falling back' in short
  assert f'(ChecksumMismatch: {errors[3][:300]}...), falling back' in newest
  assert f'(ChecksumMismatch: {errors[2]}), falling back' in older


def test_a_step_set_aside_again_keeps_every_copy(tmp_path, monkeypatch):
  """A checkpoint set aside goes to unreadable_checkpoints/<step>-<unix
  time> beside its directory (a best-by-recall one's to best-<step>-<time>);
  the same step set aside again within that second goes to .2, then .3: no
  copy set aside is overwritten."""
  monkeypatch.setattr(checkpoints, 'time',
                      types.SimpleNamespace(time=lambda: 1700000000.75))
  root = tmp_path / 'unreadable_checkpoints'
  names = ['2-1700000000', '2-1700000000.2', '2-1700000000.3']
  ckpt = checkpoints.Checkpoints(str(tmp_path / checkpoints.CHECKPOINT_DIR),
                                 keep=3, async_save=False)
  for n, name in enumerate(names):
    ckpt.save(2, {'x': np.full(3, n, np.float32)}, {'step': 2, 'n': n})
    assert ckpt.set_aside(2, 'is damaged') == str(root / name)
  ckpt.close()
  best = checkpoints.Checkpoints(str(tmp_path / checkpoints.BEST_DIR), keep=1,
                                 async_save=False)
  best.save(2, {'x': np.zeros(3, np.float32)}, {'step': 2, 'n': 'best'})
  assert best.set_aside(2, 'is damaged') == str(root / 'best-2-1700000000')
  best.close()
  # Any other directory's name prefixes its steps too ('rolling' sorts
  # after 'checkpoints').
  other = checkpoints.Checkpoints(str(tmp_path / 'rolling'), keep=1,
                                  async_save=False)
  other.save(2, {'x': np.ones(3, np.float32)}, {'step': 2, 'n': 'other'})
  assert other.set_aside(2, 'is damaged') == str(root / 'rolling-2-1700000000')
  other.close()
  assert sorted(os.listdir(root)) == [*names, 'best-2-1700000000',
                                      'rolling-2-1700000000']
  for n, name in enumerate(names):
    with open(root / name / 'meta' / 'metadata') as f:
      assert json.load(f)['n'] == n


@pytest.mark.slow
def test_a_resumed_run_continues_from_the_intact_previous_checkpoint(
    tiny_records, tmp_path, caplog):
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=1000)
  stages.train_and_evaluate(_config(num_steps=10, **kw), str(tmp_path),
                            data_dir)
  _damage(str(tmp_path / checkpoints.CHECKPOINT_DIR / '10'), 'flip')
  with caplog.at_level('WARNING'):
    state, result = stages.train_and_evaluate(_config(num_steps=12, **kw),
                                              str(tmp_path), data_dir)
  assert result['resumed_from'] == 5
  assert int(state.step) == 12
  assert len(_warnings(caplog, 'ChecksumMismatch')) == 1
  assert [d.split('-')[0] for d in os.listdir(
      tmp_path / 'unreadable_checkpoints')] == ['10']


@pytest.mark.slow
def test_a_checkpoint_that_diverges_at_once_is_never_named_good(tiny_records,
                                                                tmp_path):
  """Finite garbage written with valid checksums (what a bad write leaves):
  its own loss is not finite at the first step after the resume, so it is
  set aside and the message names the checkpoint before it, which the next
  run resumes from instead of stopping the same way."""
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=1000)
  state, _ = stages.train_and_evaluate(_config(num_steps=10, **kw),
                                       str(tmp_path), data_dir)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(directory, keep=3, async_save=False)
  step, good, meta = ckpt.restore_latest(state)
  assert step == 10
  garbage = jax.tree_util.tree_map(
      lambda x: np.full(np.shape(x), 1e20, np.asarray(x).dtype), good.params)
  ckpt.save(step, good.replace(params=garbage), meta)
  ckpt.close()
  with pytest.raises(UserError, match=(
      r'at step 11, the first after resuming from step 10, .*step 10 is bad.*'
      r'The last good checkpoint is step 5 in ' + directory)) as error:
    stages.train_and_evaluate(_config(num_steps=20, **kw), str(tmp_path),
                              data_dir)
  assert 'step 10 in' not in str(error.value)
  assert '\n' not in str(error.value)
  assert sorted(os.listdir(directory)) == ['5']
  _, result = stages.train_and_evaluate(_config(num_steps=12, **kw),
                                        str(tmp_path), data_dir)
  assert result['resumed_from'] == 5 and result['steps'] == 12


@pytest.mark.parametrize('how', ['flip', 'nan'])
def test_reading_modes_fall_back_from_a_best_checkpoint_not_intact(
    trained_room, tmp_path, caplog, how):
  config, workdir, _ = copy_trained_run(trained_room, tmp_path)
  best_dir = os.path.join(workdir, checkpoints.BEST_DIR)
  (best_step,) = (int(d) for d in os.listdir(best_dir) if d.isdigit())
  rolling = checkpoints.load_for_inference(
      config, workdir, directory=checkpoints.CHECKPOINT_DIR)
  if how == 'flip':
    _damage(os.path.join(best_dir, str(best_step)), 'flip')
  else:  # Written as saves write, checksums and all, but not finite.
    best = checkpoints.load_for_inference(config, workdir)
    ckpt = checkpoints.Checkpoints(best_dir, keep=1, async_save=False)
    meta = ckpt.manager.restore(best_step, args=checkpoints.ocp.args.Composite(
        meta=checkpoints.ocp.args.JsonRestore()))['meta']
    variables = jax.tree_util.tree_map(np.array, best.variables)
    variables['params']['audio_head']['out']['kernel'].flat[0] = np.nan
    ckpt.save(best_step, variables, meta)
    ckpt.close()
  with caplog.at_level('WARNING'):
    trained = checkpoints.load_for_inference(config, workdir)
  assert trained.source == checkpoints.CHECKPOINT_DIR
  assert trained.step == rolling.step
  assert (checkpoints.params_fingerprint(trained.variables['params']) ==
          checkpoints.params_fingerprint(rolling.variables['params']))
  lines = _warnings(caplog, 'holds no intact checkpoint')
  assert len(lines) == 1
  assert f'using step {rolling.step} of ' in lines[0]
  assert os.listdir(os.path.join(workdir, 'unreadable_checkpoints')) and (
      not os.listdir(best_dir))
  # Later reads go to the rolling checkpoints at once.
  assert checkpoints.inference_source(workdir) == checkpoints.CHECKPOINT_DIR
  assert checkpoints.run_config(workdir) is not None


@pytest.mark.slow
def test_a_divergence_names_only_a_checkpoint_that_reads_back_intact(
    tiny_records, tmp_path, monkeypatch):
  """The newest checkpoint is damaged on disk after it was written and
  restored: the run that diverges names the one before, and has set the
  damaged one aside so that a rerun resumes from the one named."""
  data_dir, _ = tiny_records
  kw = dict(checkpoint_every=5, eval_every=1000, log_every=1000)
  stages.train_and_evaluate(_config(num_steps=10, **kw), str(tmp_path),
                            data_dir)
  directory = str(tmp_path / checkpoints.CHECKPOINT_DIR)
  wait = checkpoints.Checkpoints.wait

  def wait_then_damage(self):
    wait(self)
    if self.directory == directory and os.path.isdir(
        os.path.join(directory, '10')):
      _damage(os.path.join(directory, '10'), 'flip')
  # Called when the run stops, once the writes in flight are done.
  monkeypatch.setattr(checkpoints.Checkpoints, 'wait', wait_then_damage)
  with pytest.raises(UserError, match=(
      r'loss became \S+ at step 1[1-5] .*The last good checkpoint is step 5 '
      'in ' + directory)):
    stages.train_and_evaluate(_config(num_steps=40, learning_rate=1e30, **kw),
                              str(tmp_path), data_dir)
  assert sorted(os.listdir(directory)) == ['5']
  assert [d.split('-')[0] for d in os.listdir(
      tmp_path / 'unreadable_checkpoints')] == ['10']


def test_restored_values_come_back_in_their_saved_dtype_when_exact():
  """A restore target of another type (a Python int for the step
  counter, or a float where an integer was saved) gives the saved dtype
  back when the values convert exactly, so that the digest can match; an
  inexact value is left as it is (and then fails its digest)."""
  for value, saved in ((np.int64(7), 'int32'), (np.float32([1, 2]), 'int32'),
                       (np.int32([3]), 'float32'), (np.int32([3]), 'int32')):
    out = checkpoints._as_saved(value, saved)  # pylint: disable=protected-access
    assert out.dtype.name == saved, (value, saved)
    np.testing.assert_array_equal(out, value)
  inexact = np.float32([1.5])
  assert checkpoints._as_saved(inexact, 'int32').dtype.name == 'float32'  # pylint: disable=protected-access
  kept = checkpoints._as_saved(inexact, None)  # pylint: disable=protected-access
  assert kept.dtype.name == 'float32' and kept[0] == 1.5  # No record.


def test_the_fallback_from_a_damaged_best_takes_the_best_rolling_step(
    trained_room, tmp_path, caplog):
  """With the best checkpoint damaged, a reading mode falls back to the
  rolling checkpoint of the best dev recall, not merely the newest: an
  older rolling step recorded as better (0.99) is the one read."""
  config, workdir, _ = copy_trained_run(trained_room, tmp_path)
  rolling_dir = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
  newest = checkpoints.load_for_inference(
      config, workdir, directory=checkpoints.CHECKPOINT_DIR)
  ckpt = checkpoints.Checkpoints(rolling_dir, keep=5, async_save=False)
  meta = ckpt.manager.restore(newest.step, args=checkpoints.ocp.args.Composite(
      meta=checkpoints.ocp.args.JsonRestore()))['meta']
  older = newest.step - 1
  assert (checkpoints._own_recall(meta, newest.step) or 0) < 0.99  # pylint: disable=protected-access
  ckpt.save(older, jax.tree_util.tree_map(np.array, newest.variables),
            dict(meta, history=[{'step': older, 'recall@10': 0.99}]))
  ckpt.close()
  # Read by name, the rolling checkpoints give their newest, not their best.
  assert checkpoints.load_for_inference(
      config, workdir, directory=checkpoints.CHECKPOINT_DIR).step == (
          newest.step)
  best_dir = os.path.join(workdir, checkpoints.BEST_DIR)
  (best_step,) = (int(d) for d in os.listdir(best_dir) if d.isdigit())
  _damage(os.path.join(best_dir, str(best_step)), 'flip')
  with caplog.at_level('WARNING'):
    trained = checkpoints.load_for_inference(config, workdir)
  assert (trained.source, trained.step) == (checkpoints.CHECKPOINT_DIR,
                                            older)
  (line,) = _warnings(caplog, 'holds no intact checkpoint')
  assert f'using step {older} of ' in line and 'recall@10 0.9900' in line
