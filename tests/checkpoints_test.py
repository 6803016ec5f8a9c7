"""Saving and restoring checkpoints: inference reads variables only and no
data, old formats load, saves keep what they were given, jobs of several
processes, the run's record."""

import glob
import json
import os
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import copy_trained_run
from mardjax.data import manifest as manifest_lib
from mardjax.errors import UserError
from mardjax.train import checkpoints


def _meta_files(workdir):
  return glob.glob(os.path.join(workdir, '*', '*', 'meta', 'metadata'))


def test_inference_restore_reads_variables_without_the_records(
    trained_room, tmp_path):
  config, workdir, room = copy_trained_run(trained_room, tmp_path)
  # Nothing but the manifest and the vocabulary is needed: remove the records.
  for path in glob.glob(os.path.join(workdir, 'data', '*.tfrecord')):
    os.remove(path)
  trained = checkpoints.load_for_inference(config, workdir)
  assert trained.source == checkpoints.BEST_DIR
  assert set(trained.variables) <= set(checkpoints.VARIABLE_FIELDS)
  assert 'opt_state' not in trained.variables
  assert trained.step == room.step
  # The same parameters the server restored, bit for bit.
  assert (checkpoints.params_fingerprint(trained.variables['params'])
          == checkpoints.params_fingerprint(room.embedder.variables['params']))
  assert isinstance(trained.manifest, manifest_lib.Manifest)


def test_checkpoints_of_the_first_format_still_load(trained_room, tmp_path):
  config, workdir, room = copy_trained_run(trained_room, tmp_path)
  metas = _meta_files(workdir)
  assert metas
  for path in metas:  # Format 1 wrote no format_version.
    with open(path) as f:
      meta = json.load(f)
    # This code writes format 3 (checksums and dtypes): a mardjax of
    # format 3 reads its records, and a new format takes a new number.
    assert meta.pop('format_version') == checkpoints.FORMAT_VERSION == 3
    with open(path, 'w') as f:
      json.dump(meta, f)
  trained = checkpoints.load_for_inference(config, workdir)
  np.testing.assert_array_equal(
      *(np.asarray(v['params']['audio_head']['out']['kernel'])
        for v in (trained.variables, room.embedder.variables)))


def test_a_newer_format_is_a_clear_error(trained_room, tmp_path):
  config, workdir, _ = copy_trained_run(trained_room, tmp_path)
  for path in _meta_files(workdir):
    with open(path) as f:
      meta = json.load(f)
    meta['format_version'] = checkpoints.FORMAT_VERSION + 1
    with open(path, 'w') as f:
      json.dump(meta, f)
  with pytest.raises(UserError, match='newer mardjax'):
    checkpoints.load_for_inference(config, workdir)


def test_no_checkpoint_is_a_clear_error(trained_room, tmp_path):
  config, _, _ = trained_room
  with pytest.raises(UserError, match='No checkpoint'):
    checkpoints.load_for_inference(config, str(tmp_path))


def test_each_async_save_keeps_the_values_it_was_given(tmp_path):
  """Saves copy the state into buffers reused from save to save (no fresh
  memory): a save waits for the previous write before overwriting them, and
  nothing the caller does to its arrays afterwards reaches the files."""
  ckpt = checkpoints.Checkpoints(str(tmp_path / 'ckpt'), keep=3)
  state = {'table': np.zeros((2048, 1024), np.float32),
           'step': np.zeros((), np.int32)}
  buffers = []
  for step in (1, 2, 3):
    if step == 2:  # The buffers exist: later saves allocate no copy.
      tracemalloc.start()
    state['table'][:] = step
    state['step'][...] = step
    ckpt.save(step, state, {'step': step})
    buffers.append(ckpt._host_copy._buffers[1].ctypes.data)  # pylint: disable=protected-access
    state['table'][:] = -1  # The caller's next update, at once.
  ckpt.wait()
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert len(set(buffers)) == 1  # One buffer for the table, reused.
  # Two saves and their writes took no memory of the table's size (neither
  # orbax nor anything else copied it again).
  assert peak < state['table'].nbytes // 4, peak
  for step in (3, 2, 1):
    got, restored, meta = ckpt.restore_latest(
        {'table': np.zeros((2048, 1024), np.float32),
         'step': np.zeros((), np.int32)})
    assert got == step == meta['step'] == int(restored['step'])
    assert isinstance(restored['table'], np.ndarray)
    np.testing.assert_array_equal(restored['table'], step)
    ckpt.manager.delete(step)
  ckpt.close()


def test_a_save_writes_each_array_in_the_dtype_it_now_has(tmp_path):
  """Saves reuse their host buffers only for arrays of the same shape and
  dtype: an array that changes dtype between two saves of one `Checkpoints`
  (same shape) is written, recorded and restored in its new dtype."""
  ckpt = checkpoints.Checkpoints(str(tmp_path / 'ckpt'), keep=3,
                                 async_save=False)
  ckpt.save(1, {'x': np.arange(4, dtype=np.int32)}, {'step': 1})
  halves = np.arange(4, dtype=np.float32) / 2
  ckpt.save(2, {'x': halves}, {'step': 2})
  step, restored, _ = ckpt.restore_latest({'x': np.zeros(4, np.float32)})
  ckpt.close()
  assert step == 2
  np.testing.assert_array_equal(restored['x'], halves)
  with open(tmp_path / 'ckpt' / '2' / checkpoints.DIGEST_ITEM /
            'metadata') as f:
    assert json.load(f)['dtypes'] == {'x': 'float32'}


def test_a_save_writes_each_array_in_the_shape_it_now_has(tmp_path):
  """An array that shrinks, then grows, between saves of one
  `Checkpoints` (its host buffer from the save before is larger, then
  smaller) is written and restored in its new shape each time."""
  ckpt = checkpoints.Checkpoints(str(tmp_path / 'ckpt'), keep=3,
                                 async_save=False)
  ckpt.save(1, {'x': np.arange(8, dtype=np.float32)}, {'step': 1})
  for step, size in ((2, 4), (3, 6)):
    x = np.arange(size, dtype=np.float32) + 0.5
    ckpt.save(step, {'x': x}, {'step': step})
    got, restored, _ = ckpt.restore_latest({'x': np.zeros(size, np.float32)})
    assert got == step
    np.testing.assert_array_equal(restored['x'], x)
  ckpt.close()


def test_a_restore_reads_the_whole_saved_state_unless_partial(tmp_path):
  """`restore_latest` fills a target from a checkpoint only when the target
  is the whole saved state: one lacking part of it (a run resumed without
  the optimizer state it saved) gets nothing from it. With `partial=True`
  exactly the target's fields are read."""
  ckpt = checkpoints.Checkpoints(str(tmp_path / 'ckpt'), keep=3,
                                 async_save=False)
  params = np.arange(6, dtype=np.float32)
  ckpt.save(1, {'params': params, 'opt_state': np.ones(6, np.float32)},
            {'step': 1})
  target = {'params': np.zeros(6, np.float32)}
  step, restored, _ = ckpt.restore_latest(target, partial=True)
  assert step == 1 and list(restored) == ['params']
  np.testing.assert_array_equal(restored['params'], params)
  assert ckpt.restore_latest(target) is None
  ckpt.close()


def test_checkpoints_of_other_data_are_refused_naming_both_manifests():
  """`check_same_data` passes a record of the same data manifest and refuses
  any other (whichever hash sorts first), naming both by their first 12 hex
  digits, as the other messages name a hash."""
  saved, now = '0123456789abcdef' * 4, 'fedcba9876543210' * 4
  checkpoints.check_same_data({'manifest_hash': saved}, saved, 'run')
  for old, new in ((saved, now), (now, saved)):
    with pytest.raises(UserError, match=(
        rf'in run were trained on different data \(manifest {old[:12]}, now '
        rf'{new[:12]}\)')):
      checkpoints.check_same_data({'manifest_hash': old}, new, 'run')


def test_params_fingerprints_are_equal_only_for_identical_parameters():
  """`params_fingerprint` is the same for the same parameters, on the host or
  a device, and differs when one value or one parameter's name differs."""
  params = {'dense': {'bias': np.zeros(3, np.float32),
                      'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  fingerprint = checkpoints.params_fingerprint(params)
  assert fingerprint == checkpoints.params_fingerprint(
      jax.tree_util.tree_map(jnp.asarray, params))
  changed = jax.tree_util.tree_map(np.copy, params)
  changed['dense']['bias'][1] = 1
  renamed = {'dense': {'b': params['dense']['bias'],
                       'kernel': params['dense']['kernel']}}
  assert len({fingerprint, checkpoints.params_fingerprint(changed),
              checkpoints.params_fingerprint(renamed)}) == 3


def test_the_run_config_comes_from_the_newest_readable_record(tmp_path):
  """`run_config` gives the config of the newest checkpoint whose record
  reads back (not an older one), past newer ones that do not, which it
  leaves in place; a restore goes past them too, and sets them aside."""
  directory = tmp_path / checkpoints.CHECKPOINT_DIR
  ckpt = checkpoints.Checkpoints(str(directory), keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, {'x': np.full(3, step, np.float32)},
              {'step': step, 'config': json.dumps({'seed': step})})
  os.remove(directory / '3' / 'meta' / 'metadata')
  assert checkpoints.run_config(str(tmp_path)) == {'seed': 2}
  assert sorted(os.listdir(directory)) == ['1', '2', '3']
  step, state, _ = ckpt.restore_latest({'x': np.zeros(3, np.float32)})
  ckpt.close()
  assert step == 2 and float(state['x'][0]) == 2
  assert sorted(os.listdir(directory)) == ['1', '2']


class _OneOfTwoProcesses:
  """`jax` as the checkpoints module sees it in process `index` of a job of
  two processes, each with one device of its own; the rest is jax itself."""

  def __init__(self, index):
    self._index = index

  def process_index(self):
    return self._index

  def process_count(self):
    return 2

  def devices(self):
    return jax.devices()[:1]

  def __getattr__(self, name):
    return getattr(jax, name)


def test_each_process_of_a_job_restores_its_own_host_copy(tmp_path,
                                                          monkeypatch):
  """In a job of several processes a save writes the (identical) state of
  every process as replicated global arrays, and a restore gives each
  process its own copy as host arrays: the values saved, verified."""
  monkeypatch.setattr(checkpoints, 'jax', _OneOfTwoProcesses(0))
  ckpt = checkpoints.Checkpoints(str(tmp_path / 'ckpt'), keep=3,
                                 async_save=False)
  state = {'table': np.arange(12, dtype=np.float32).reshape(3, 4),
           'step': np.asarray(7, np.int32)}
  ckpt.save(7, state, {'step': 7})
  step, restored, _ = ckpt.restore_latest(
      {k: np.zeros_like(v) for k, v in state.items()})
  ckpt.close()
  assert step == 7
  for k, v in state.items():
    assert isinstance(restored[k], np.ndarray)
    np.testing.assert_array_equal(restored[k], v)


def test_only_the_first_process_of_a_job_moves_a_checkpoint_aside(
    tmp_path, monkeypatch):
  """Every process of a job sees the same directory: process 0 alone moves
  a checkpoint aside, and every other one waits at a barrier until it has,
  so that none still lists the step afterwards."""
  directory = tmp_path / checkpoints.CHECKPOINT_DIR
  ckpt = checkpoints.Checkpoints(str(directory), keep=3, async_save=False)
  for step in (1, 2):
    ckpt.save(step, {'x': np.full(3, step, np.float32)}, {'step': step})
  barriers = []

  def barrier(name):
    # Process 0's part, done while this process waits at the barrier.
    barriers.append(name)
    assert os.path.isdir(directory / '2'), 'process 1 moved it'
    os.rename(directory / '2', tmp_path / 'moved_by_process_0')
  monkeypatch.setattr(checkpoints, 'jax', _OneOfTwoProcesses(1))
  monkeypatch.setattr(checkpoints.multihost_utils, 'sync_global_devices',
                      barrier)
  ckpt.set_aside(2, 'is damaged')
  assert len(barriers) == 1
  assert ckpt.manager.all_steps() == [1]
  assert os.listdir(directory) == ['1']
  ckpt.close()
