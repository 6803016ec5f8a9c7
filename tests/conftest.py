"""Shared fixtures. Several CPU devices are forced before jax/tf import."""

import atexit
import gc
import os
import shutil
import sys
import tempfile

# Must happen before jax (or tensorflow, which may import it) is imported.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One XLA compilation cache for the session: its pytest-xdist workers and
# the processes its tests start inherit it. Many tests compile the same
# small programs anew (fresh jit closures, subprocess runs of one config),
# most of the suite's time. The directory is new each session (no program
# of an older checkout is ever read) and removed at its end.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='mardjax-tests-xla-')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  atexit.register(shutil.rmtree, _CACHE, True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
from mardjax import xla_env  # pylint: disable=g-import-not-at-top

xla_env.apply_defaults()  # As launch.py does.

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import test as test_config  # pylint: disable=g-import-not-at-top
from mardjax.data import synth  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_AB_DIR = os.path.join(ROOT, '..', 'shared', 'data', 'acousticbrainz')
REAL_DOCS = ('0dad432b-16cc-4bf0-8961-fd31d124b01b.json',
             'e8afe383-1478-497e-90b1-7885c7f37f6e.json')
BULK_SAMPLE = 'bulk_lowlevel_response_sample.json'


def write_tone(path, seconds, fmt, freq=440.0):
  """A pulsing sine with a little noise, saved by Essentia; returns its
  bytes. `path` is a pathlib.Path; fmt: wav, flac, ogg or mp3."""
  import essentia.standard as es  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sr = 44100
  t = np.arange(int(sr * seconds)) / sr
  x = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * t))
  x = x + 0.02 * np.random.default_rng(0).normal(size=t.shape)
  es.MonoWriter(filename=str(path), format=fmt, sampleRate=sr)(
      x.astype(np.float32))
  return path.read_bytes()


@pytest.fixture(autouse=True, scope='module')
def _release_compiled_programs():
  """Drops JAX's caches of compiled programs after each test file. Each
  program XLA compiles for the CPU keeps memory mappings of its machine
  code while a cache holds it, and one process that runs the whole suite
  (`-n 0`) would otherwise gather them past the kernel's limit on
  mappings (vm.max_map_count, 65,530 by default), where the next compile
  fails with a segmentation fault. A program needed again is read back
  from the session's compilation cache."""
  yield
  if 'jax' in sys.modules:
    sys.modules['jax'].clear_caches()
    gc.collect()


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core this process may use, at most 4 (each
  holds a JAX runtime and TensorFlow: up to 5 GB at the suite's peak)."""
  del config
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
           else os.cpu_count() or 1)  # macOS has no affinity call.
  return max(1, min(cores, 4))


@pytest.fixture(scope='session')
def real_ab_dir():
  """The real AcousticBrainz documents in ../shared/data (CI has them)."""
  if not os.path.isdir(REAL_AB_DIR):
    pytest.fail(f'{REAL_AB_DIR} is missing: the real AcousticBrainz test '
                'documents live in shared/data beside the repository.')
  return REAL_AB_DIR


@pytest.fixture
def config():
  return test_config.get_config()


@pytest.fixture(scope='session')
def tiny_corpus_master(tmp_path_factory):
  """One tiny synthetic corpus per session; copy it before changing it."""
  out = str(tmp_path_factory.mktemp('tiny_mard'))
  synth.generate(out, synth.SynthSizes(**synth.PRESETS['tiny']), seed=0,
                 num_workers=1, show_progress=False)
  return out


@pytest.fixture
def tiny_corpus(tiny_corpus_master, tmp_path):
  """A private copy of the tiny corpus that a test may damage."""
  out = str(tmp_path / 'mard')
  shutil.copytree(tiny_corpus_master, out)
  return out


@pytest.fixture(scope='session')
def tiny_records(tiny_corpus_master, tmp_path_factory):
  """(data_dir, manifest) of the tiny corpus, preprocessed with configs/test."""
  from mardjax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from mardjax.data import preprocess  # pylint: disable=g-import-not-at-top
  out = str(tmp_path_factory.mktemp('tiny_records') / 'data')
  preprocess.preprocess_corpus(test_config.get_config(), tiny_corpus_master,
                               out, show_progress=False)
  return out, manifest_lib.load(out)


def copy_trained_run(trained_room, tmp_path):
  """A private copy of the shared trained workdir (tests may damage it)."""
  config, workdir, room = trained_room
  copy = str(tmp_path / 'run')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('export'))
  config = config.copy_and_resolve_references()
  config.data.tfrecord_dir = os.path.join(copy, 'data')
  return config, copy, room


@pytest.fixture(scope='session')
def trained_room(tiny_corpus_master, tmp_path_factory):
  """(config, workdir, web.Room) of a few training steps on the tiny
  corpus: the listening room's tests share one trained workdir."""
  from mardjax import modes  # pylint: disable=g-import-not-at-top
  from mardjax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  from mardjax.serve import web  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.train.update(num_steps=6, eval_every=6, checkpoint_every=6)
  workdir = str(tmp_path_factory.mktemp('serve'))
  modes.run_mode('train', config, workdir, show_progress=False)
  room = web.Room(config, workdir, manifest_lib.data_dir_of(
      config, workdir), tiny_corpus_master)
  return config, workdir, room


@pytest.fixture
def trained_config(trained_room):
  """A copy of the trained room's config for one test to change: the
  room's own config is shared by every test that uses the room, so a
  change made there would reach the tests that run after it."""
  return trained_room[0].copy_and_resolve_references()
