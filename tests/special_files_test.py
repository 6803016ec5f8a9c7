"""Inputs that cannot hang or explode a run, and outputs that are whole.

Folders handed to mardjax may hold FIFOs (opening one blocks), links to
devices (/dev/zero never ends), link loops, dangling links and links that
leave the folder: each is counted under its reason and the run goes on with
the good files. A full disk is one line naming the path, and leaves the old
output or none, never half of one. Runs that could hang or swallow memory on
a regression go in a child process with a deadline and a memory cap, so a
hang fails the test instead of wedging the suite.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import test as test_config
from mardjax import modes
from mardjax import stages
from mardjax.data import manifest as manifest_lib
from mardjax.data import mard_io
from mardjax.data import preprocess
from mardjax.data import synth
from mardjax.errors import UserError
from mardjax.serve import batch_embed
from mardjax.serve import export
from tests.conftest import REAL_AB_DIR
from tests.conftest import REAL_DOCS
from tests.conftest import ROOT

_DEADLINE_S = 300  # Far beyond a healthy run on a loaded machine.
_MEMORY_CAP = 4 << 30  # Address space: room for JAX, none for /dev/zero.


def _run_guarded(code: str) -> dict:
  """Runs `code` in a child process with a deadline and a memory cap; the
  JSON it prints last comes back. A hang kills the child's whole process
  group (its pool workers too) and fails the test."""
  # The cap is set by the child itself: a preexec_fn would fork this
  # multithreaded process.
  cap = ('import resource\n'
         f'resource.setrlimit(resource.RLIMIT_AS, ({_MEMORY_CAP}, '
         f'{_MEMORY_CAP}))\n')
  proc = subprocess.Popen(
      [sys.executable, '-c', cap + textwrap.dedent(code)], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
  try:
    out, err = proc.communicate(timeout=_DEADLINE_S)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    pytest.fail(f'hung: no result in {_DEADLINE_S} s')
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def _plant_hazards(folder, outside_file, suffix: str) -> dict[str, str]:
  """Puts one of each hostile kind of entry into `folder`, named `*suffix`;
  returns {name: the reason it must be counted under}."""
  os.mkfifo(os.path.join(folder, f'fifo{suffix}'))
  os.symlink('/dev/zero', os.path.join(folder, f'zero{suffix}'))
  os.symlink(f'loop{suffix}', os.path.join(folder, f'loop{suffix}'))
  os.symlink(os.path.join(folder, f'gone{suffix}.missing'),
             os.path.join(folder, f'dangling{suffix}'))
  os.symlink(outside_file, os.path.join(folder, f'outside{suffix}'))
  return {f'fifo{suffix}': 'fifo', f'zero{suffix}': 'device_file',
          f'loop{suffix}': 'symlink_loop',
          f'dangling{suffix}': 'dangling_symlink',
          f'outside{suffix}': 'link_outside_folder'}


# --- Reading ---------------------------------------------------------------


@pytest.mark.slow
def test_special_files_in_a_raw_mard_folder_are_counted(tiny_corpus,
                                                        tmp_path):
  expanded = os.path.join(tiny_corpus, mard_io.EXPANDED_DESCRIPTOR_DIR)
  outside = tmp_path / 'elsewhere.json'
  outside.write_text(json.dumps({'not': 'read'}))
  _plant_hazards(expanded, str(outside), '.json')
  with open(os.path.join(expanded, 'big.json'), 'wb') as f:
    f.write(b' ' * (2 << 20))  # Over the 1 MB cap below.
  # A required file that is a FIFO is one line, not a hang.
  broken = tmp_path / 'broken'
  broken.mkdir()
  shutil.copy(os.path.join(tiny_corpus, mard_io.METADATA_FILE), broken)
  os.mkfifo(broken / mard_io.REVIEWS_FILE)
  result = _run_guarded(f'''
      import json
      from configs import test as test_config
      from mardjax.data import preprocess
      from mardjax.errors import UserError
      config = test_config.get_config()
      config.data.max_document_mb = 1
      report = preprocess.preprocess_corpus(config, {tiny_corpus!r},
                                            {str(tmp_path / 'out')!r},
                                            show_progress=False)
      try:
        preprocess.preprocess_corpus(config, {str(broken)!r},
                                     {str(tmp_path / 'out2')!r},
                                     show_progress=False)
        error = None
      except UserError as e:
        error = str(e)
      print(json.dumps({{'report': report, 'error': error}}, default=str))
      ''')
  report = result['report']
  assert report['skipped']['descriptor_files'] == {
      'fifo': 1, 'device_file': 1, 'symlink_loop': 1, 'dangling_symlink': 1,
      'link_outside_folder': 1, 'too_large': 1}
  assert all(report['reconcile'].values()), report['reconcile']
  assert report['albums'] == 40 and report['tracks'] == 180
  error = result['error']
  assert error and '\n' not in error
  assert mard_io.REVIEWS_FILE in error and 'fifo' in error


@pytest.mark.slow
def test_special_files_in_an_embed_folder_are_counted(trained_room,
                                                      tmp_path):
  room_config, workdir, _ = trained_room
  folder = tmp_path / 'in'
  folder.mkdir()
  shutil.copy(os.path.join(REAL_AB_DIR, REAL_DOCS[0]), folder / 'good.json')
  outside = tmp_path / 'elsewhere.json'
  shutil.copy(os.path.join(REAL_AB_DIR, REAL_DOCS[1]), outside)
  wanted = _plant_hazards(str(folder), str(outside), '.json')
  wanted.update(_plant_hazards(str(folder), str(outside), '.wav'))
  out = tmp_path / 'out'
  result = _run_guarded(f'''
      import json
      from configs import test as test_config
      from mardjax import modes
      config = test_config.get_config()
      config.data.mard_dir = {room_config.data.mard_dir!r}
      config.embed.workers = 2
      result = modes.run_mode('embed', config, {workdir!r},
                              show_progress=False, input_dir={str(folder)!r},
                              output_dir={str(out)!r})
      print(json.dumps(result, default=str))
      ''')
  assert result['tracks'] == 1 and result['skipped'] == len(wanted), result
  bank = batch_embed.load(str(out))
  assert [m['file'] for m in bank['track_meta']] == ['good.json']
  assert {s['file']: s['reason'] for s in bank['info']['skipped_files']
          } == wanted
  assert result['skipped_reasons'] == {
      'fifo': 2, 'device_file': 2, 'symlink_loop': 2, 'dangling_symlink': 2,
      'link_outside_folder': 2}


# --- Writing ---------------------------------------------------------------


class _FullDisk:
  """`open` for a module under test: files it opens for writing take
  `budget` bytes in all, then raise ENOSPC as a full disk does."""

  def __init__(self, budget: int, error=None):
    self.left = budget
    self.error = error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def __call__(self, path, mode='r', *args, **kwargs):
    f = open(path, mode, *args, **kwargs)  # pylint: disable=W1514
    if not any(c in mode for c in 'wax+'):
      return f
    return _Filling(f, self)


class _Filling:
  """A file being written on a `_FullDisk`."""

  def __init__(self, f, disk: _FullDisk):
    self._f, self._disk = f, disk

  def write(self, data):
    self._disk.left -= len(data)
    if self._disk.left < 0:
      raise self._disk.error
    return self._f.write(data)

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return self._f.__exit__(*exc)


def _one_line(error: UserError, *names: str) -> None:
  text = str(error)
  assert '\n' not in text
  for name in names:
    assert name in text, text


def _tf_full_disk(budget: int):
  """A TFRecordWriter that fails as TensorFlow's does on a full disk."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  real = tf.io.TFRecordWriter
  left = [budget]

  class Writer:

    def __init__(self, path, *args, **kwargs):
      self._w = real(path, *args, **kwargs)

    def write(self, record):
      left[0] -= len(record)
      if left[0] < 0:
        raise tf.errors.ResourceExhaustedError(None, None, '')
      self._w.write(record)

    def close(self):
      self._w.close()

  return tf, Writer


def test_a_full_disk_while_preprocessing_is_one_line_and_no_output(
    tiny_corpus_master, tmp_path, monkeypatch):
  config = test_config.get_config()
  out = tmp_path / 'data'
  tf, writer = _tf_full_disk(20000)
  monkeypatch.setattr(tf.io, 'TFRecordWriter', writer)
  with pytest.raises(UserError) as e:
    preprocess.preprocess_corpus(config, tiny_corpus_master, str(out),
                                 show_progress=False)
  _one_line(e.value, 'no space left', str(out))
  assert sorted(os.listdir(tmp_path)) == []  # Neither output nor leftovers.
  monkeypatch.undo()
  report = preprocess.preprocess_corpus(config, tiny_corpus_master, str(out),
                                        show_progress=False)
  assert all(report['reconcile'].values())
  assert manifest_lib.load(str(out)).counts.albums == 40


def test_preprocessed_data_of_two_writes_is_refused(tiny_records, tmp_path):
  data_dir, manifest = tiny_records
  mixed = tmp_path / 'data'
  shutil.copytree(data_dir, mixed)
  name = manifest.files['reviews']['train'][0]
  with open(mixed / name, 'ab') as f:  # As if another write's shard.
    f.write(b'\0' * 16)
  with pytest.raises(UserError, match='different writes') as e:
    manifest_lib.load(str(mixed))
  _one_line(e.value, name)


def test_a_full_disk_while_generating_is_one_line_and_rebuilt(
    tmp_path, monkeypatch):
  config = test_config.get_config()
  workdir = str(tmp_path / 'run')
  corpus = stages.mard_dir(config, workdir)
  monkeypatch.setattr(synth, 'open', _FullDisk(300000), raising=False)
  with pytest.raises(UserError) as e:
    stages.synthesize(config, workdir, show_progress=False)
  _one_line(e.value, 'no space left', corpus)
  assert not os.path.exists(os.path.join(corpus, mard_io.METADATA_FILE))
  assert [n for n in os.listdir(workdir) if n.startswith('.')] == []
  # Killed half way: the hidden half corpus is ours, and the rerun
  # rebuilds it instead of refusing it as someone else's data.
  monkeypatch.setattr(synth, 'open', _FullDisk(
      300000, KeyboardInterrupt('killed')), raising=False)
  with pytest.raises(KeyboardInterrupt):
    stages.synthesize(config, workdir, show_progress=False)
  monkeypatch.undo()
  result = stages.synthesize(config, workdir, show_progress=False)
  assert not result['reused'] and result['albums'] == 40
  assert sorted(n for n in os.listdir(workdir) if n.startswith('.')) == []
  assert stages.synthesize(config, workdir, show_progress=False)['reused']


@pytest.mark.slow
def test_embed_output_is_whole_and_a_file_there_is_refused_first(
    trained_room, trained_config, tmp_path, monkeypatch):
  _, workdir, _ = trained_room
  folder = tmp_path / 'in'
  folder.mkdir()
  for name in REAL_DOCS:
    shutil.copy(os.path.join(REAL_AB_DIR, name), folder / name)
  out = tmp_path / 'out'

  def embed():
    return modes.run_mode('embed', trained_config, workdir,
                          show_progress=False, input_dir=str(folder),
                          output_dir=str(out))

  out.write_text('a file where the output goes')
  from mardjax.serve import embedder  # pylint: disable=g-import-not-at-top

  def no_work(*args, **kwargs):
    raise AssertionError('the model was loaded before the output was checked')

  with monkeypatch.context() as m:
    m.setattr(embedder, 'Embedder', no_work)
    with pytest.raises(UserError) as e:
      embed()
  _one_line(e.value, str(out), 'is a file')
  out.unlink()
  first = embed()
  before = batch_embed.load(str(out))
  shutil.copy(os.path.join(REAL_AB_DIR, REAL_DOCS[0]), folder / 'more.json')
  with monkeypatch.context() as m:
    m.setattr(export, 'open', _FullDisk(100), raising=False)
    with pytest.raises(UserError) as e:
      embed()
  _one_line(e.value, 'no space left', str(out))
  after = batch_embed.load(str(out))  # The old output, whole.
  assert after['info'] == before['info'] and first['tracks'] == 2
  np.testing.assert_array_equal(after['tracks'], before['tracks'])
  assert [n for n in os.listdir(tmp_path) if n.startswith('.')] == []
  assert embed()['tracks'] == 3


@pytest.mark.slow  # Its fixture trains.
def test_an_export_of_two_writes_is_refused(trained_room, tmp_path):
  _, workdir, _ = trained_room
  mixed = tmp_path / 'export'
  shutil.copytree(os.path.join(workdir, export.EXPORT_DIR), mixed)
  assert export.load(str(mixed))
  # Another write's albums: same shape, other vectors.
  albums = np.load(mixed / 'albums.npy')
  np.save(mixed / 'albums.npy', albums[::-1].copy())
  with pytest.raises(UserError, match='different writes') as e:
    export.load(str(mixed))
  _one_line(e.value, 'albums.npy')


def test_long_lines_are_counted_and_outside_links_followed_on_request(
    tiny_corpus, tmp_path):
  config = test_config.get_config()
  config.data.max_document_mb = 1
  with open(os.path.join(tiny_corpus, mard_io.REVIEWS_FILE), 'ab') as f:
    f.write(b'{"reviewText": "' + b'a' * (2 << 20) + b'"}\n')
  # A real document of a known track, kept outside the MARD folder.
  first = os.path.join(tiny_corpus, mard_io.ORIGINAL_DESCRIPTOR_DIR)
  name = sorted(os.listdir(first))[0]
  shutil.move(os.path.join(first, name), tmp_path / name)
  os.symlink(tmp_path / name, os.path.join(first, name))
  report = preprocess.preprocess_corpus(config, tiny_corpus,
                                        str(tmp_path / 'a'),
                                        show_progress=False)
  assert report['skipped']['reviews'] == {'too_large': 1}
  assert report['skipped']['descriptor_files'] == {'link_outside_folder': 1}
  assert all(report['reconcile'].values()), report['reconcile']
  config.data.follow_outside_links = True
  report = preprocess.preprocess_corpus(config, tiny_corpus,
                                        str(tmp_path / 'b'),
                                        show_progress=False)
  assert 'descriptor_files' not in report['skipped']
  assert report['input']['descriptor_files_read'] == report['input'][
      'descriptor_files']
