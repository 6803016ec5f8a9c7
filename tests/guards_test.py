"""The room's guards: other sites, unknown hosts, non-finite or invalid JSON,
unexpected failures, offline API docs and the listening address, over a
stand-in room (no model needed to reach them)."""

import io
import re
import socket
import types

import pytest
from fastapi.testclient import TestClient

from mardjax.errors import UserError
from mardjax.serve import guards
from mardjax.serve import web


def _room(text_query=None):
  return types.SimpleNamespace(
      step=7, text_query=text_query or (lambda text, k, explain=False: {
          'albums': [], 'words': text.split(), 'k': k}))


def _client(room=None, **kwargs):
  app = web.create_app(room or _room(), max_upload_bytes=10_000,
                       analysis_workers=1, **kwargs)
  return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize('body,field', [
    (b'{"text": "rock", "k": NaN}', 'k'),
    (b'{"text": "rock", "k": Infinity}', 'k'),
    (b'{"text": "rock", "k": -Infinity}', 'k'),
    (b'{"text": "rock", "k": 1e400}', 'k'),
    (b'{"text": NaN}', 'text'),
])
def test_non_finite_json_numbers_get_a_422_with_a_finite_detail(body, field):
  r = _client().post('/api/query/text', content=body,
                     headers={'content-type': 'application/json'})
  assert r.status_code == 422, r.text
  detail = r.json()['detail']  # Strict JSON: parsing it proves it finite.
  assert detail.startswith(f'{field}: ') and 'non-finite' in detail
  assert 'NaN' not in r.text.replace('(NaN,', '')


def test_lone_surrogates_are_refused_where_the_text_enters():
  seen = []
  client = _client(_room(
      lambda text, k, explain=False: seen.append(text) or {}))
  r = client.post('/api/query/text', content=b'{"text": "rock \\ud800"}',
                  headers={'content-type': 'application/json'})
  assert r.status_code == 422 and 'not valid Unicode' in r.json()['detail']
  assert 'character 5' in r.json()['detail'] and not seen
  r = client.post('/api/query/text', content=b'{"text": "caf\xff"}',
                  headers={'content-type': 'application/json'})
  assert r.status_code in (400, 422) and not seen
  # Escaped but valid characters still reach the room.
  r = client.post('/api/query/text', content=b'{"text": "caf\\u00e9 \\ud83c'
                  b'\\udfb8"}', headers={'content-type': 'application/json'})
  assert r.status_code == 200 and seen == ['café 🎸']


def test_an_unexpected_failure_is_a_json_500_and_the_room_keeps_serving():
  calls = []

  def failing(text, k, explain=False):
    calls.append(text)
    if len(calls) == 1:
      raise RuntimeError('/srv/secret/path went wrong')
    return {'albums': []}

  client = _client(_room(failing))
  r = client.post('/api/query/text', json={'text': 'rock'})
  assert r.status_code == 500
  assert 'keeps serving' in r.json()['detail'] and 'secret' not in r.text
  assert client.post('/api/query/text', json={'text': 'jazz'}).status_code \
      == 200


def test_cross_site_posts_are_refused():
  client = _client()
  ok = {'text': 'rock'}
  # Not a browser (no Origin), or the page's own origin: served.
  assert client.post('/api/query/text', json=ok).status_code == 200
  assert client.post('/api/query/text', json=ok, headers={
      'origin': 'http://testserver'}).status_code == 200
  for headers in ({'origin': 'http://evil.example'},
                  {'origin': 'http://testserver:8001'},
                  {'origin': 'null'},
                  {'sec-fetch-site': 'cross-site'}):
    r = client.post('/api/query/text', json=ok, headers=headers)
    assert r.status_code == 403, headers
    assert 'cross-site request refused' in r.json()['detail']
  upload = client.post('/api/query/audio', headers={
      'origin': 'http://evil.example'}, files={'file': (
          'a.json', io.BytesIO(b'{}'))})
  assert upload.status_code == 403
  # Reading is not guarded: a page elsewhere cannot read the answer anyway.
  assert client.get('/openapi.json', headers={
      'origin': 'http://evil.example'}).status_code == 200
  allowed = _client(origins=('http://evil.example',))
  assert allowed.post('/api/query/text', json=ok, headers={
      'origin': 'http://evil.example'}).status_code == 200


def test_unknown_host_names_are_refused():
  hosts = guards.host_names('127.0.0.1')
  assert 'localhost' in hosts and '::1' in hosts
  assert guards.host_names('0.0.0.0') == ()
  assert guards.host_names('0.0.0.0', ['room.lan']) == ('0.0.0.0', 'room.lan')
  client = _client(hosts=hosts)
  for host in ('127.0.0.1:8000', 'localhost:8000', '[::1]:8000', 'localhost'):
    assert client.get('/openapi.json', headers={
        'host': host}).status_code == 200, host
  r = client.get('/openapi.json', headers={'host': 'rebound.example:8000'})
  assert r.status_code == 421 and 'serve.allowed_hosts' in r.json()['detail']


def test_the_api_docs_need_no_network():
  client = _client()
  for page in ('/docs', '/redoc'):
    r = client.get(page)
    assert r.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert assets, page
    for url in assets:
      assert not re.match(r'\w+://', url), f'{page} loads {url}'
      assert client.get(url).status_code == 200, url


def test_the_audio_route_checks_k_before_reading_the_upload():
  client = _client()
  for k in (0, 101, -1):
    r = client.post(f'/api/query/audio?k={k}', files={'file': (
        'a.json', io.BytesIO(b'{}'))})
    assert r.status_code == 422 and 'k must be in [1, 100]' in r.text
  r = client.post('/api/query/audio?k=nan', files={'file': (
      'a.json', io.BytesIO(b'{}'))})
  assert r.status_code == 422 and r.json()['detail'].startswith('query.k: ')


def test_the_listening_address_is_checked_before_loading():
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(UserError, match=f'cannot listen on 127.0.0.1:{port}'):
      web.check_address('127.0.0.1', port)
  for port in (0, 70000, -1):
    with pytest.raises(UserError, match='is not a TCP port'):
      web.check_address('127.0.0.1', port)
  with pytest.raises(UserError, match='not an address of this machine'):
    web.check_address('no-such-host.invalid', 8000)


def test_chunked_bodies_over_the_limit_get_a_413_through_the_app():
  # No Content-Length: the limit is found while the body streams in, inside
  # FastAPI's body reading, which would otherwise answer 400.
  client = _client()

  def chunks(head, tail, n):
    yield head
    for _ in range(n):
      yield b'a' * 1000
    yield tail

  r = client.post('/api/query/text', content=chunks(b'{"text": "', b'"}', 100),
                  headers={'content-type': 'application/json'})
  assert r.status_code == 413 and 'larger than' in r.json()['detail']
  r = client.post('/api/query/audio', content=chunks(
      b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.wav"'
      b'\r\n\r\n', b'\r\n--xx--\r\n', 200),
                  headers={'content-type': 'multipart/form-data; boundary=xx'})
  assert r.status_code == 413 and 'larger than' in r.json()['detail']
  # Under the limit, chunked, still served.
  r = client.post('/api/query/text', content=chunks(b'{"text": "', b'"}', 2),
                  headers={'content-type': 'application/json'})
  assert r.status_code == 200
