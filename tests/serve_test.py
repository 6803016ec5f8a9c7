"""The listening room's JSON API through FastAPI's test client."""

import io
import json
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mardjax import modes
from mardjax.serve import web
from tests.conftest import BULK_SAMPLE, REAL_AB_DIR, REAL_DOCS, write_tone


@pytest.fixture(scope='module')
def client(trained_room):
  return TestClient(web.create_app(trained_room[2],
                                     max_upload_bytes=2_000_000))


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


def _check_audio_answer(room, body, k=5):
  """The answer to an audio query is the model's: the descriptors the
  analysis returned, standardised here by hand with the training
  statistics and embedded, have as their k nearest reviews and albums (by
  brute force over the exported banks) the ones listed, at the distances
  listed, in ascending order. Returns the listed review ids and distances."""
  e = room.embedder
  d = e.manifest.descriptors
  assert list(body['descriptors']) == list(e.names)
  raw = np.array(list(body['descriptors'].values()), np.float64)
  z = (np.sign(raw) * np.log1p(np.abs(raw)) - d.mean) / d.std
  emb = np.asarray(e.embed_audio(z[None].astype(np.float32)), np.float64)[0]
  for bank, listed in (('reviews', body['reviews']),
                       ('albums', body['albums'])):
    distances = [x['distance'] for x in listed]
    assert len(listed) == k
    assert distances == sorted(distances), f'{bank}: not ascending'
    cos = room.bank[bank].astype(np.float64) @ emb
    want = np.sqrt(np.maximum(0, 2 - 2 * np.sort(cos)[::-1][:k]))
    np.testing.assert_allclose(distances, want, atol=1e-4, err_msg=(
        f'{bank}: distances are not those of the embedded descriptors'))
  rows = {m['review_id']: i for i, m in enumerate(room.bank['review_meta'])}
  for x in body['reviews']:
    got = np.sqrt(max(0.0, 2 - 2 * float(room.bank['reviews'][
        rows[x['review_id']]].astype(np.float64) @ emb)))
    assert got == pytest.approx(x['distance'], abs=1e-4), x['review_id']
  return ([x['review_id'] for x in body['reviews']],
          [x['distance'] for x in body['reviews']])


@pytest.mark.parametrize('fmt', ['wav', 'flac', 'ogg', 'mp3'])
def test_recordings_are_analysed_by_essentia(trained_room, client, tmp_path,
                                             fmt):
  data = write_tone(tmp_path / f'tone.{fmt}', 3.0, fmt)
  r = _upload(client, data, f'my song.{fmt}')
  assert r.status_code == 200, r.text
  body = r.json()
  assert len(body['reviews']) == 5 and len(body['descriptors']) == 369
  assert body['extractor']  # Essentia's extractor version, shown.
  _check_audio_answer(trained_room[2], body)


def test_different_recordings_get_different_answers(trained_room, client,
                                                    tmp_path):
  """Two tones two octaves apart are analysed to different descriptors,
  and the model places them apart: their nearest reviews or the distances
  to them differ (an embedding that ignored its input would give both the
  same answer)."""
  answers, descriptors = [], []
  for freq in (220.0, 880.0):
    data = write_tone(tmp_path / f'tone{freq:.0f}.wav', 3.0, 'wav', freq)
    r = _upload(client, data, f'tone{freq:.0f}.wav')
    assert r.status_code == 200, r.text
    answers.append(_check_audio_answer(trained_room[2], r.json()))
    descriptors.append(r.json()['descriptors'])
  assert descriptors[0] != descriptors[1]
  (ids_a, dist_a), (ids_b, dist_b) = answers
  assert ids_a != ids_b or not np.allclose(dist_a, dist_b, atol=1e-4), (
      'two different recordings got the same answer: '
      f'{list(zip(ids_a, dist_a))}')


def test_short_and_truncated_recordings_are_refused(client, tmp_path):
  short = write_tone(tmp_path / 'short.wav', 0.4, 'wav')
  r = _upload(client, short, 'short.wav')
  assert r.status_code == 422 and 'at least 1 s' in r.text
  mp3 = write_tone(tmp_path / 'long.mp3', 3.0, 'mp3')
  r = _upload(client, mp3[:2000], 'cut.mp3')
  assert r.status_code == 422, r.text
  assert client.get('/healthz').status_code == 200


def test_uploads_leave_no_files_behind(trained_room, tmp_path):
  app = web.create_app(trained_room[2], max_upload_bytes=2_000_000,
                       analysis_workers=1)
  with TestClient(app) as own:
    data = write_tone(tmp_path / 'tone.wav', 1.5, 'wav')
    assert _upload(own, data, 'tone.wav').status_code == 200
    r = _upload(own, b'garbage', 'x.ogg')
    assert r.status_code == 422
    # The reason names the upload, never the server's temporary path.
    root = app.state.analysis_pool.temp_root
    assert 'mardjax-audio-' not in r.text and root not in r.text
    # The workers' temporary files live in the pool's own directory,
    # deleted after each analysis.
    assert [os.listdir(os.path.join(root, w)) for w in os.listdir(root)
            ] == [[]]
  assert not os.path.exists(root)  # Removed when the server stops.


def test_health_answers_while_recordings_are_analysed(trained_room, tmp_path,
                                                      monkeypatch):
  """Two uploads are held in the middle of their analysis (the analysis
  waits for the test's go-ahead): health checks sent meanwhile answer, and
  the analyses ran in processes other than the server's. MusicExtractor
  holds the GIL for a whole analysis, so analysed in the server's own
  process it would stall every other request."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from tests import gated_analysis  # pylint: disable=g-import-not-at-top
  gate = tmp_path / 'gate'
  gate.mkdir()
  monkeypatch.setenv('MARDJAX_TEST_GATE', str(gate))
  monkeypatch.setattr(web.audio_analysis, 'analyse_bytes',
                      gated_analysis.analyse_when_released)
  data = write_tone(tmp_path / 'song.wav', 2.0, 'wav')
  with TestClient(web.create_app(trained_room[2], max_upload_bytes=9_000_000,
                                 analysis_workers=2)) as own:
    statuses = []
    uploads = [threading.Thread(target=lambda: statuses.append(
        _upload(own, data, 'song.wav').status_code)) for _ in range(2)]
    for u in uploads:
      u.start()
    deadline = time.monotonic() + 300  # Bounds the wait, decides nothing.
    while len(list(gate.glob('started-*'))) < 2:
      assert time.monotonic() < deadline, 'the analyses never started'
      time.sleep(0.01)
    # Both analyses are under way and cannot end before the release.
    for _ in range(5):
      assert own.get('/healthz').status_code == 200
    assert all(u.is_alive() for u in uploads) and statuses == []
    (gate / 'release').write_text('')
    for u in uploads:
      u.join(timeout=300)
      assert not u.is_alive()
  assert statuses == [200, 200]
  pids = {int(f.read_text()) for f in gate.glob('started-*')}
  assert pids and os.getpid() not in pids


@pytest.mark.parametrize('payload,status,message', [
    (b'[' * 100_000 + b']' * 100_000, 422, 'not valid JSON'),
    (b'{"lowlevel": {"mfcc": {"mean": [' + b'9' * 400 + b']}}}', 422,
     'too large'),
])
def test_hostile_documents_are_refused(client, payload, status, message):
  r = _upload(client, payload, 'hostile.json')
  assert r.status_code == status, r.text
  assert message in r.text


def test_text_queries_are_capped(client):
  r = client.post('/api/query/text', json={'text': 'rock ' * 20_000, 'k': 3})
  assert r.status_code == 413 and 'larger than' in r.text
  assert client.get('/healthz').status_code == 200


def _asgi_call(app, headers, chunks):
  """Runs an ASGI app on one request; returns (status, chunks read)."""
  import asyncio  # pylint: disable=g-import-not-at-top
  read, sent = [], []

  async def receive():
    chunk = chunks[len(read)]
    read.append(chunk)
    return {'type': 'http.request', 'body': chunk,
            'more_body': len(read) < len(chunks)}

  async def send(message):
    sent.append(message)

  scope = {'type': 'http', 'path': '/api/query/text', 'method': 'POST',
           'headers': headers}
  asyncio.run(app(scope, receive, send))
  return sent[0]['status'], len(read)


def test_oversized_bodies_are_refused_as_they_stream_in():
  async def reader(scope, receive, send):  # An app that reads everything.
    more = True
    while more:
      more = (await receive()).get('more_body', False)
    await send({'type': 'http.response.start', 'status': 200, 'headers': []})
    await send({'type': 'http.response.body', 'body': b''})

  limited = web.BodyLimit(reader, {'/api/query/text': 1000}, default=10)
  # Declared too large: refused before one byte of the body is read.
  assert _asgi_call(limited, [(b'content-length', b'5000')],
                    [b'x' * 500] * 10) == (413, 0)
  # Undeclared (chunked): refused at the chunk that passes the limit.
  assert _asgi_call(limited, [], [b'x' * 400] * 10) == (413, 3)
  assert _asgi_call(limited, [], [b'x' * 400] * 2) == (200, 2)


def test_the_page_and_its_assets_are_served(client):
  page = client.get('/')
  assert page.status_code == 200 and 'text/html' in page.headers[
      'content-type']
  for asset in ('/static/room.js', '/static/room.css'):
    assert asset in page.text and client.get(asset).status_code == 200
  for element in ('id="file-input"', 'id="reviews"', 'id="text-input"',
                  'id="descriptors"', 'id="progress"'):
    assert element in page.text


def test_batch_embedding_of_a_folder(trained_room, trained_config, tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mardjax.serve import batch_embed  # pylint: disable=g-import-not-at-top
  _, workdir, room = trained_room
  config = trained_config
  folder = tmp_path / 'music'
  (folder / 'live').mkdir(parents=True)
  write_tone(folder / 'a tone.wav', 2.0, 'wav')
  write_tone(folder / 'live' / 'b.flac', 2.0, 'flac', freq=97.0)
  with open(os.path.join(REAL_AB_DIR, REAL_DOCS[0]), 'rb') as f:
    doc = f.read()
  (folder / 'ab.json').write_bytes(doc)
  # Bulk API responses: two full documents and an entry that is no MBID;
  # the real sample holds three abridged documents (no MFCC).
  mbid = REAL_DOCS[0][:-5]
  (folder / 'bulk.json').write_text(json.dumps({
      mbid: {'0': json.loads(doc), '1': json.loads(doc)},
      'not-an-mbid': {'0': {}}}))
  with open(os.path.join(REAL_AB_DIR, BULK_SAMPLE), 'rb') as f:
    (folder / 'sample.json').write_bytes(f.read())
  (folder / 'broken.mp3').write_bytes(b'ID3 not really an mp3')
  (folder / 'other.json').write_text('{"metadata": {}}')
  (folder / 'notes.txt').write_text('not music')
  config.embed.workers = 2
  out = modes.run_mode('embed', config, workdir, show_progress=False,
                     input_dir=str(folder))
  assert (out['tracks'], out['skipped'], out['ignored']) == (5, 6, 1), out
  bank = batch_embed.load(out['directory'])
  files = [m['file'] for m in bank['track_meta']]
  assert files == ['a tone.wav', 'ab.json', 'bulk.json', 'bulk.json',
                   os.path.join('live', 'b.flac')]
  assert [m['source'] for m in bank['track_meta']] == ['recording'] + [
      'acousticbrainz'] * 3 + ['recording']
  assert [(m['mbid'], m['offset']) for m in bank['track_meta'][2:4]] == [
      (mbid, 0), (mbid, 1)]
  sample = [s for s in bank['info']['skipped_files']
            if s['file'] == 'sample.json']
  assert len(sample) == 3 and all('lowlevel.mfcc' in s['reason']
                                  for s in sample)
  reasons = {s['file']: s['reason'] for s in bank['info']['skipped_files']}
  assert 'bulk_entry_not_mbid' in reasons['bulk.json']
  assert 'not a readable recording' in reasons['broken.mp3']
  assert 'not an AcousticBrainz' in reasons['other.json']
  np.testing.assert_allclose(np.linalg.norm(bank['tracks'], axis=1), 1,
                             rtol=1e-5)
  # The same vector the server computes for the same document.
  _, z, _, _ = room.embedder.read_document(json.loads(doc))
  for row in (1, 2, 3):
    np.testing.assert_allclose(bank['tracks'][row], room.embedder.embed_audio(
        z[None])[0], atol=1e-6)
  # Different sounds, different vectors: each finds itself first.
  rows = [0, 1, 4]
  idx, _ = bank['track_index'].search(bank['tracks'][rows], 1)
  np.testing.assert_array_equal(idx[:, 0], rows)
  assert sorted(os.listdir(folder / 'live')) == ['b.flac']  # Untouched.


def test_batch_embedding_errors(trained_room, trained_config, tmp_path):
  _, workdir, _ = trained_room
  config = trained_config
  with pytest.raises(modes.UserError, match='needs --input_dir'):
    modes.run_mode('embed', config, workdir, show_progress=False)
  with pytest.raises(modes.UserError, match='is not a folder'):
    modes.run_mode('embed', config, workdir, show_progress=False,
                 input_dir=str(tmp_path / 'nope'))
  (tmp_path / 'readme.md').write_text('x')
  with pytest.raises(modes.UserError, match=r'holds no .* files \(1 other'):
    modes.run_mode('embed', config, workdir, show_progress=False,
                 input_dir=str(tmp_path))


@pytest.mark.slow
def test_serve_benchmark_over_http(trained_room, trained_config):
  _, workdir, _ = trained_room
  config = trained_config
  config.benchmark.update(kind='serve', serve_upload_seconds=2.0,
                          serve_uploads=1, serve_text_queries=10,
                          serve_concurrency=4, serve_seconds=1.0,
                          serve_rounds=2, serve_concurrent_uploads=2,
                          serve_round_upload_seconds=2.0)
  out = modes.run_mode('benchmark', config, workdir, show_progress=False)
  assert out['benchmark'] == 'serve' and out['reviews'] > 0
  for fmt in ('wav', 'mp3'):
    for name in (f'upload_{fmt}', f'upload_{fmt}_explained'):
      upload = out[name]
      assert 0 < upload['p50_ms'] <= upload['p95_ms'] <= upload['max_ms']
  for name in ('text_query', 'text_query_explained'):
    assert 0 < out[name]['p50_ms'] <= out[name]['max_ms']
  assert isinstance(out['explained_upload_growth'], float)
  assert out['upload_wav_explained']['server_explain_ms'] > 0
  assert isinstance(out['meets_explain_targets'], bool)
  assert out['load']['requests'] > 0 and out['load']['errors'] == 0
  assert out['load']['requests_per_s'] > 0
  during = out['during_uploads']
  assert during['rounds'] == 2 and len(during['server_rss_mb']) == 2
  assert during['healthz']['p50_ms'] > 0 and during['text_query']['p50_ms'] > 0
