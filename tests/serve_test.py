"""The listening room's JSON API through FastAPI's test client."""

import io
import json
import os

import pytest
from fastapi.testclient import TestClient

from configs import test as test_config
from mardjax import app
from mardjax import serve
from tests.conftest import REAL_AB_DIR, REAL_DOCS


@pytest.fixture(scope='module')
def client(tiny_corpus_master, tmp_path_factory):
  config = test_config.get_config()
  config.data.mard_dir = tiny_corpus_master
  config.train.update(num_steps=6, eval_every=6, checkpoint_every=6)
  workdir = str(tmp_path_factory.mktemp('serve'))
  app.run_mode('train', config, workdir, show_progress=False)
  room = serve.Room(config, workdir, app.preprocess.output_dir(
      config, workdir), tiny_corpus_master)
  return TestClient(serve.create_app(room, max_upload_bytes=2_000_000))


def _upload(client, data, name='track.json', k=5):
  return client.post(f'/api/query/audio?k={k}',
                     files={'file': (name, io.BytesIO(data))})


def test_healthz(client):
  r = client.get('/healthz')
  assert r.status_code == 200 and r.json()['status'] == 'ok'
  assert r.json()['albums'] > 0 and r.json()['reviews'] > 0


def test_text_query(client):
  r = client.post('/api/query/text', json={'text': 'great guitar album',
                                           'k': 3})
  assert r.status_code == 200, r.text
  albums = r.json()['albums']
  assert len(albums) == 3 and {'artist', 'title', 'distance'} <= set(
      albums[0])
  assert albums[0]['distance'] <= albums[-1]['distance']
  assert client.post('/api/query/text', json={'text': ' '}).status_code == 422
  assert client.post('/api/query/text',
                     json={'text': 'zzqx wvvk'}).status_code == 422
  assert client.post('/api/query/text',
                     json={'text': 'great', 'k': 0}).status_code == 422


def test_real_acousticbrainz_document(client):
  with open(os.path.join(REAL_AB_DIR, REAL_DOCS[0]), 'rb') as f:
    r = _upload(client, f.read())
  assert r.status_code == 200, r.text
  body = r.json()
  assert len(body['reviews']) == 5 and len(body['albums']) == 5
  assert body['reviews'][0]['excerpt'] and 'distance' in body['reviews'][0]
  assert len(body['descriptors']) == 369
  assert isinstance(body['warnings'], list)


@pytest.mark.parametrize('data,name,status,message', [
    (b'', 'a.json', 400, 'empty'),
    (b'RIFF....WAVEfmt hello', 'a.wav', 422, 'not a readable recording'),
    (b'MZ\x90\x00binary', 'setup.exe', 415, 'unsupported file type'),
    (b'{"not": "closed"', 'a.json', 422, 'not valid JSON'),
    (b'{"metadata": {}}', 'a.json', 422, 'not an AcousticBrainz'),
    (b'{}', '../../etc/passwd', 400, 'path components'),
    (b'{' + b' ' * 3_000_000 + b'}', 'big.json', 413, 'larger than'),
])
def test_bad_uploads_get_a_clear_4xx(client, data, name, status, message):
  r = _upload(client, data, name)
  assert r.status_code == status, r.text
  assert message in json.dumps(r.json())
  assert client.get('/healthz').status_code == 200  # Still serving.


def _tone(path, seconds, fmt):
  import essentia.standard as es  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sr = 44100
  t = np.arange(int(sr * seconds)) / sr
  x = 0.3 * np.sin(2 * np.pi * 440 * t) * (1 + 0.5 * np.sin(2 * np.pi * t))
  x = x + 0.02 * np.random.default_rng(0).normal(size=t.shape)
  es.MonoWriter(filename=str(path), format=fmt, sampleRate=sr)(
      x.astype(np.float32))
  return path.read_bytes()


@pytest.mark.parametrize('fmt', ['wav', 'flac', 'ogg', 'mp3'])
def test_recordings_are_analysed_by_essentia(client, tmp_path, fmt):
  data = _tone(tmp_path / f'tone.{fmt}', 3.0, fmt)
  r = _upload(client, data, f'my song.{fmt}')
  assert r.status_code == 200, r.text
  body = r.json()
  assert len(body['reviews']) == 5 and len(body['descriptors']) == 369
  assert body['extractor']  # Essentia's extractor version, shown.


def test_short_and_truncated_recordings_are_refused(client, tmp_path):
  short = _tone(tmp_path / 'short.wav', 0.4, 'wav')
  r = _upload(client, short, 'short.wav')
  assert r.status_code == 422 and 'at least 1 s' in r.text
  mp3 = _tone(tmp_path / 'long.mp3', 3.0, 'mp3')
  r = _upload(client, mp3[:2000], 'cut.mp3')
  assert r.status_code == 422, r.text
  assert client.get('/healthz').status_code == 200


def test_uploads_leave_no_files_behind(client, tmp_path, monkeypatch):
  import tempfile  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  os.makedirs(tmp_path / 'tmp')
  data = _tone(tmp_path / 'tone.wav', 1.5, 'wav')
  assert _upload(client, data, 'tone.wav').status_code == 200
  assert _upload(client, b'garbage', 'x.ogg').status_code == 422
  assert os.listdir(tmp_path / 'tmp') == []
