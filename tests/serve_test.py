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
    (b'RIFF....WAVEfmt ', 'a.wav', 415, 'AcousticBrainz'),
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
