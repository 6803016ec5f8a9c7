"""Restoring for inference: variables only, no data read, old formats."""

import glob
import json
import os

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
    assert meta.pop('format_version') == checkpoints.FORMAT_VERSION
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
    state['table'][:] = step
    state['step'][...] = step
    ckpt.save(step, state, {'step': step})
    buffers.append(ckpt._host_copy._buffers[1].ctypes.data)  # pylint: disable=protected-access
    state['table'][:] = -1  # The caller's next update, at once.
  assert len(set(buffers)) == 1  # One buffer for the table, reused.
  ckpt.wait()
  for step in (3, 2, 1):
    got, restored, meta = ckpt.restore_latest(
        {'table': np.zeros((2048, 1024), np.float32),
         'step': np.zeros((), np.int32)})
    assert got == step == meta['step'] == int(restored['step'])
    assert isinstance(restored['table'], np.ndarray)
    np.testing.assert_array_equal(restored['table'], step)
    ckpt.manager.delete(step)
  ckpt.close()
