"""The listening room's analysis pool under a hostile client: workers
replaced and killed, analyses too slow, too many uploads at once, long
recordings, a stop signal while an analysis runs, workers that cannot
start."""

import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mardjax.serve import web
from tests import gated_analysis
from tests.conftest import REAL_AB_DIR, REAL_DOCS, ROOT, write_tone

# Bounds every wait on the server, so that a wedged server fails the test
# instead of hanging it; no test's outcome depends on how fast anything is.
_WAIT_S = 120


def _upload(client, data, name='song.wav'):
  return client.post('/api/query/audio?k=3',
                     files={'file': (name, io.BytesIO(data))})


def _in_thread(fn, *args):
  """Starts fn(*args) in a thread; returns (thread, list holding its
  result once done)."""
  out = []
  t = threading.Thread(target=lambda: out.append(fn(*args)), daemon=True)
  t.start()
  return t, out


def _wait_for(condition, what):
  deadline = time.monotonic() + _WAIT_S
  while not condition():
    assert time.monotonic() < deadline, f'{what} never happened'
    time.sleep(0.02)


def _analysis(client):
  return client.get('/healthz').json()['analysis']


@pytest.fixture
def gate(tmp_path, monkeypatch):
  """Analyses wait in their worker until `release` is written in this
  folder (`gated_analysis`); each notes its worker's pid as `started-*`."""
  folder = tmp_path / 'gate'
  folder.mkdir()
  monkeypatch.setenv('MARDJAX_TEST_GATE', str(folder))
  monkeypatch.setattr(web.audio_analysis, 'analyse_bytes',
                      gated_analysis.analyse_when_released)
  return folder


def _started(gate):
  return [int(f.read_text()) for f in sorted(gate.glob('started-*'))]


@pytest.fixture(scope='module')
def song(tmp_path_factory):
  return write_tone(tmp_path_factory.mktemp('songs') / 'song.wav', 1.5,
                    'wav')


def _app(room, **options):
  return web.create_app(room, max_upload_bytes=20_000_000, **options)


@pytest.mark.slow
def test_a_burst_then_sequential_uploads_all_answered(trained_room, song,
                                                      monkeypatch):
  """More uploads at once than workers, then one after another, with
  workers replaced every third analysis: every upload is answered. The
  burst is analysed by Essentia; the sequential uploads, which test the
  workers' replacement, get a real AcousticBrainz document at once."""
  monkeypatch.setenv('MARDJAX_TEST_DOCUMENT',
                     os.path.join(REAL_AB_DIR, REAL_DOCS[0]))
  with TestClient(_app(trained_room[2], analysis_workers=2,
                       analyses_per_worker=3, max_waiting=8)) as client:
    burst = [_in_thread(_upload, client, song) for _ in range(5)]
    for t, _ in burst:
      t.join(_WAIT_S)
    assert [out[0].status_code if out else 'no answer'
            for _, out in burst] == [200] * 5
    monkeypatch.setattr(web.audio_analysis, 'analyse_bytes',
                        gated_analysis.analyse_instantly)
    for i in range(60):
      t, out = _in_thread(_upload, client, song)
      t.join(_WAIT_S)
      assert out and out[0].status_code == 200, (
          f'upload {i}: {out[0].text if out else "no answer"}')
    stats = _analysis(client)
  assert stats['analyses'] == 65 and stats['replaced'] >= 65 // 3 - 2
  assert stats['died'] == 0 and stats['ok']


def test_a_killed_worker_gets_503_and_is_replaced(trained_room, song, gate):
  with TestClient(_app(trained_room[2], analysis_workers=1)) as client:
    t, out = _in_thread(_upload, client, song)
    _wait_for(lambda: _started(gate), 'the analysis')
    pid = _started(gate)[0]
    assert _analysis(client)['worker_pids'] == [pid]
    os.kill(pid, signal.SIGKILL)
    t.join(_WAIT_S)
    r = out[0]
    assert r.status_code == 503, r.text[:500]
    assert int(r.headers['Retry-After']) > 0
    assert 'worker stopped' in r.json()['detail']
    (gate / 'release').write_text('')
    r = _upload(client, song)
    assert r.status_code == 200, r.text[:500]
    stats = _analysis(client)
    assert stats['died'] == 1 and stats['replaced'] >= 1
    assert stats['worker_pids'] and pid not in stats['worker_pids']
    assert client.get('/healthz').status_code == 200


def test_an_analysis_over_the_time_limit_is_stopped(trained_room, song, gate):
  app = _app(trained_room[2], analysis_workers=1, timeout_s=1.0)
  with TestClient(app) as client:
    r = _upload(client, song)  # Held at the gate past the limit.
    assert r.status_code == 504, r.text[:500]
    assert 'serve.analysis_timeout_s' in r.json()['detail']
    stats = _analysis(client)
    assert stats['timeouts'] == 1 and stats['replaced'] == 1
    killed = _started(gate)[0]
    (gate / 'release').write_text('')
    # The next analysis runs in the replacement, under a limit that no
    # load on the machine can reach.
    app.state.analysis_pool.timeout_s = _WAIT_S
    assert _upload(client, song).status_code == 200
    assert killed not in _analysis(client)['worker_pids']


def test_uploads_past_the_waiting_cap_get_429(trained_room, song, gate):
  with TestClient(_app(trained_room[2], analysis_workers=1,
                       max_waiting=1)) as client:
    running = _in_thread(_upload, client, song)
    _wait_for(lambda: _started(gate), 'the first analysis')
    waiting = _in_thread(_upload, client, song)
    _wait_for(lambda: _analysis(client)['waiting'] == 1, 'a waiting upload')
    r = _upload(client, song)
    assert r.status_code == 429, r.text[:500]
    assert int(r.headers['Retry-After']) > 0
    assert 'serve.max_waiting' in r.json()['detail']
    (gate / 'release').write_text('')
    for t, out in (running, waiting):
      t.join(_WAIT_S)
      assert out and out[0].status_code == 200
    assert _analysis(client)['refused_busy'] == 1


def _square_wave_flac(path, seconds):
  """A slow square wave as FLAC: minutes of audio in little space."""
  import essentia.standard as es  # pylint: disable=g-import-not-at-top
  sr = 44100
  t = np.arange(int(sr * seconds), dtype=np.float32) / sr
  x = np.where((t * 2) % 1 < 0.5, 0.3, -0.3).astype(np.float32)
  es.MonoWriter(filename=str(path), format='flac', sampleRate=sr)(x)
  return path.read_bytes()


def test_long_recordings_are_refused_within_bounded_memory(trained_room,
                                                           tmp_path):
  """Over serve.max_audio_seconds: refused from the FLAC's header, and,
  when the header does not tell (total samples unknown), by the bounded
  decoder; the worker's memory stays small either way."""
  flac = _square_wave_flac(tmp_path / 'long.flac', 240.0)
  assert len(flac) < 2_000_000  # Small, and minutes long.
  unknown = bytearray(flac)  # STREAMINFO's 36-bit total: 0, unknown.
  unknown[8 + 13] &= 0xf0
  unknown[8 + 14:8 + 18] = b'\0\0\0\0'
  with TestClient(_app(trained_room[2], analysis_workers=1,
                       max_audio_seconds=30.0)) as client:
    for data, says in ((flac, 'lasts 4.0 min'),
                       (bytes(unknown), 'lasts more than 30.0 s')):
      r = _upload(client, data, 'long.flac')
      assert r.status_code == 413, r.text[:500]
      assert says in r.text and 'serve.max_audio_seconds' in r.text
    stats = _analysis(client)
    assert 0 < stats['peak_worker_rss_mb'] < 1024, stats
    assert stats['replaced'] == 0  # Refusals leave the worker serving.


def test_an_analysis_out_of_memory_gets_413(trained_room, song, monkeypatch):
  monkeypatch.setattr(web.audio_analysis, 'analyse_bytes',
                      gated_analysis.analyse_greedily)
  with TestClient(_app(trained_room[2], analysis_workers=1,
                       memory_mb=1024)) as client:
    r = _upload(client, song)
    assert r.status_code == 413, r.text[:500]
    assert 'serve.worker_memory_mb' in r.text
    assert _analysis(client)['replaced'] == 1
    monkeypatch.undo()
  with TestClient(_app(trained_room[2], analysis_workers=1,
                       memory_mb=1024)) as client:
    # A real analysis fits under a modest ceiling.
    assert _upload(client, song).status_code == 200


def test_healthz_is_not_ok_when_workers_cannot_start(trained_room, song):
  # An address space too small for Essentia's libraries to load.
  with TestClient(_app(trained_room[2], analysis_workers=1,
                       memory_mb=64)) as client:
    assert client.get('/healthz').status_code == 200  # Nothing tried yet.
    r = _upload(client, song)
    assert r.status_code == 503, r.text[:500]
    assert int(r.headers['Retry-After']) > 0
    assert 'cannot start' in r.json()['detail']
    assert '/' not in r.json()['detail']  # No server paths.
    health = client.get('/healthz')
    assert health.status_code == 503
    assert health.json()['status'] == 'degraded'
    assert health.json()['analysis']['problem']
    # Text queries still work.
    assert client.post('/api/query/text', json={
        'text': 'great guitar album', 'k': 3}).status_code == 200


_SERVER = """
import pickle, sys
sys.path.insert(0, {root!r})
from mardjax.serve import web
from tests import gated_analysis
web.audio_analysis.analyse_bytes = gated_analysis.analyse_when_released
with open({config!r}, 'rb') as f:
  config, workdir, data_dir, mard_dir = pickle.load(f)
web.serve_room(config, workdir, data_dir, mard_dir, '127.0.0.1', {port})
"""


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _gone(pid):
  try:
    with open(f'/proc/{pid}/status') as f:
      return 'zombie' in f.read()
  except FileNotFoundError:
    return True


@pytest.mark.slow
def test_one_sigterm_stops_a_busy_server(trained_room, song, tmp_path):
  """A real server analysing a recording (held at the gate) stops at one
  SIGTERM within seconds: the client gets a 503, the workers are gone, the
  temporary files too."""
  import httpx  # pylint: disable=g-import-not-at-top
  from mardjax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  config, workdir, _ = trained_room
  config = config.copy_and_resolve_references()
  config.serve.analysis_workers = 1
  gate, tmp = tmp_path / 'gate', tmp_path / 'tmp'
  gate.mkdir()
  tmp.mkdir()
  with open(tmp_path / 'config.pkl', 'wb') as f:
    pickle.dump((config, workdir, manifest_lib.data_dir_of(config, workdir),
                 config.data.mard_dir), f)
  port = _free_port()
  script = _SERVER.format(root=ROOT, config=str(tmp_path / 'config.pkl'),
                          port=port)
  env = dict(os.environ, MARDJAX_TEST_GATE=str(gate), TMPDIR=str(tmp))
  log = (tmp_path / 'server.log').open('w+b')
  server = subprocess.Popen([sys.executable, '-c', script], env=env,
                            stdout=log, stderr=subprocess.STDOUT)

  def log_tail():
    log.seek(0)
    return log.read().decode(errors='replace')[-3000:]

  url = f'http://127.0.0.1:{port}'
  try:
    def up():
      assert server.poll() is None, log_tail()
      try:
        return httpx.get(url + '/healthz').status_code == 200
      except httpx.TransportError:
        return False
    _wait_for(up, 'the server starting')
    upload, answer = _in_thread(lambda: httpx.post(
        url + '/api/query/audio', files={'file': ('song.wav', song)},
        timeout=_WAIT_S))
    _wait_for(lambda: _started(gate), 'the analysis')
    workers = httpx.get(url + '/healthz').json()['analysis']['worker_pids']
    assert workers == _started(gate)
    server.send_signal(signal.SIGTERM)
    # "Within seconds": generous for a loaded machine, far below the
    # gated analysis' own wait.
    rc = server.wait(timeout=30)
    assert rc == 0, log_tail()
    upload.join(_WAIT_S)
    assert answer and answer[0].status_code == 503, answer
    assert 'shutting down' in answer[0].text
    assert all(_gone(pid) for pid in workers)
    assert os.listdir(tmp) == []
  finally:
    if server.poll() is None:
      server.kill()
      server.wait()
    log.close()


@pytest.mark.parametrize('fmt', ['wav', 'flac', 'ogg', 'mp3'])
def test_durations_are_read_from_headers_without_decoding(tmp_path, fmt):
  from mardjax.serve import audio_analysis  # pylint: disable=g-import-not-at-top
  data = write_tone(tmp_path / f'tone.{fmt}', 3.0, fmt)
  seconds = audio_analysis.declared_seconds(data, f'.{fmt}')
  if fmt == 'mp3':  # No total in its frames: the decoder's bound holds.
    assert seconds is None
  else:
    assert seconds == pytest.approx(3.0, abs=0.05)
  assert audio_analysis.declared_seconds(data[:20], f'.{fmt}') is None
  assert audio_analysis.declared_seconds(b'garbage' * 10, f'.{fmt}') is None
