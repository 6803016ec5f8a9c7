"""The listening room's JSON API (`--mode=serve`), a FastAPI app.

Loads the workdir's best checkpoint, its data manifest and vocabulary, and
the embedding bank of `--mode=export` (exported first when missing or from
another checkpoint), then answers:

  GET  /                     the page: upload a song, search by text
  GET  /healthz              {"status": "ok", "step", "albums", "reviews",
                              "index", "extractors", "analysis"}; 503 and
                              "degraded" while recordings cannot be
                              analysed
  POST /api/query/text       JSON {"text": ..., "k": 10} -> {"albums": [...]}
  POST /api/query/audio      multipart field `file`: a recording (wav, mp3,
                             flac, ogg) or an AcousticBrainz low-level JSON
                             document -> {"reviews": [...], "albums": [...],
                             "descriptors": {...}, "warnings": [...]}

Recordings go through Essentia's MusicExtractor (`audio_analysis`), the
extractor AcousticBrainz ran, into the same low-level layout the model was
trained on; the upload is
written to a private temporary directory under a name of our own and
deleted after use. Bad requests get a 4xx with {"detail": ...} and the
server keeps serving.
"""

import os
import time
from typing import Any

import ml_collections
import numpy as np

from mardjax.serve import analysis_pool as pool_lib
from mardjax.serve import audio_analysis
from mardjax.serve import batch_embed
from mardjax.data import descriptors as desc_lib
from mardjax.data import mard_io
from mardjax.serve import embedder as embedder_lib
from mardjax.serve import explain
from mardjax.serve import export
from mardjax.serve import guards
from mardjax.serve import search_index
from mardjax.train import checkpoints
from mardjax.errors import UserError

MAX_K = 100
EXCERPT_CHARS = 300
STATIC_DIR = os.path.join(os.path.dirname(__file__), 'static')


def _distance(cosine: float) -> float:
  """Euclidean distance between unit vectors with this cosine (0 to 2)."""
  return float(np.sqrt(max(0.0, 2 - 2 * cosine)))


class Room:
  """The model (an `embedder.Embedder`), the embedding bank and, when
  `config.serve.library` names one, a library of the user's own tracks
  (the output of `--mode=embed`), loaded once."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               data_dir: str, mard_dir: str):
    self.config = config
    self.embedder = e = embedder_lib.Embedder(config, workdir, data_dir)
    self.step = e.step
    bank_dir = os.path.join(workdir, export.EXPORT_DIR)
    ef_search = config.export.hnsw_ef_search
    fingerprint = checkpoints.params_fingerprint(e.variables['params'])
    try:
      bank = export.load(bank_dir, ef_search)
      info = bank['info']
      stale = (info['params_sha256'] != fingerprint or info['index'] !=
               search_index.settings(config.export))
    except UserError:
      stale = True
    if stale:  # Export the state already in hand, not a second restore.
      export.write(config, workdir, mard_dir, e.trained)
      bank = export.load(bank_dir, ef_search)
    self.bank = bank
    self.library = _load_library(config.serve.library, fingerprint,
                                 ef_search)
    self.explainer = explain.Explainer(e)
    self._album_rows = {m['album_index']: m for m in bank['album_meta']}

  def text_query(self, text: str, k: int, explain: bool = False
                 ) -> dict[str, Any]:
    """The k albums (and library tracks) closest to a typed text; with
    `explain`, the words of the text that pulled each
    (`explain.Explainer.query_words`)."""
    emb, known, words = self.embedder.embed_text(text)
    albums, rows = self._albums(emb, k)
    tracks, track_rows = self._tracks(emb, k)
    out = {'albums': albums, 'known_words': known, 'words': words}
    if self.library:
      out['tracks'] = tracks
    if explain:
      start = time.perf_counter()
      why, out['unknown_words'] = self.explainer.query_words(
          text, self._targets(rows, track_rows))
      for item, w in zip(albums + tracks, why):
        item['why_words'] = w
      out['explain_ms'] = _ms(start)
    return out

  def descriptor_query(self, doc: Any, k: int, explain: bool = False
                       ) -> dict[str, Any]:
    """The k reviews, albums (and library tracks) closest to a recording's
    low-level document; with `explain`, the words of each review and the
    descriptor groups behind each album and track (`explain.Explainer`)."""
    raw, z, version, warnings = self.embedder.read_document(doc)
    emb = self.embedder.embed_audio(z[None])
    idx, scores = self.bank['review_index'].search(emb, k)
    start = time.perf_counter()
    reviews = []
    for i, s in zip(idx[0], scores[0]):
      meta = self.bank['review_meta'][i]
      album = self._album_rows.get(meta['album_index'], {})
      row = {'review_id': meta['review_id'],
             'album': album.get('title'),
             'artist': album.get('artist'),
             'genre': album.get('genre'),
             'distance': _distance(s)}
      if explain:  # The excerpt around the review's pulling words.
        row.update(self.explainer.review_words(
            meta.get('text'), meta.get('body_start', 0), emb[0],
            EXCERPT_CHARS))
      else:
        text = meta.get('text') or ''
        row['excerpt'] = text[:EXCERPT_CHARS] + (
            '…' if len(text) > EXCERPT_CHARS else '')
      reviews.append(row)
    albums, rows = self._albums(emb, k)
    tracks, track_rows = self._tracks(emb, k)
    out = {'reviews': reviews, 'albums': albums, 'warnings': warnings,
           'descriptors': {n: float(v) for n, v in zip(
               self.embedder.names, raw)},
           'extractor': version}
    if self.library:
      out['tracks'] = tracks
    if explain:
      for item, why in zip(albums + tracks, self.explainer.sound_groups(
          raw, z, self._targets(rows, track_rows))):
        item['why_audio'] = why
      out['explain_ms'] = _ms(start)
    return out

  def _albums(self, emb: np.ndarray, k: int
              ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(the k closest albums' rows, their (k,) indices in the bank)."""
    idx, scores = self.bank['album_index'].search(emb, k)
    return [dict({key: self.bank['album_meta'][i].get(key) for key in (
        'album_index', 'amazon_id', 'artist', 'title', 'genre')},
                 distance=_distance(s))
            for i, s in zip(idx[0], scores[0])], np.asarray(idx[0])

  def _tracks(self, emb: np.ndarray, k: int
              ) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(the k closest library tracks' rows, their indices); none without a
    library."""
    if not self.library:
      return [], np.zeros(0, np.int64)
    lib = self.library
    idx, scores = lib['track_index'].search(emb, min(k, len(lib['tracks'])))
    return [dict({key: lib['track_meta'][i].get(key) for key in (
        'file', 'mbid', 'offset', 'source')}, distance=_distance(s))
            for i, s in zip(idx[0], scores[0])], np.asarray(idx[0])

  def _targets(self, album_rows: np.ndarray, track_rows: np.ndarray
               ) -> np.ndarray:
    """(A + T, E) the vectors of the answered albums, then tracks."""
    vectors = [self.bank['albums'][album_rows]]
    if self.library:
      vectors.append(self.library['tracks'][track_rows])
    return np.concatenate(vectors)


def _load_library(directory: str, fingerprint: str, ef_search: int
                  ) -> dict[str, Any] | None:
  """`config.serve.library`: an `--mode=embed` output of this very model,
  or None when the field is empty."""
  if not directory:
    return None
  library = batch_embed.load(directory, ef_search)
  if library['info']['params_sha256'] != fingerprint:
    raise UserError(
        f'config.serve.library={directory!r} was embedded by another model '
        f'(parameters {library["info"]["params_sha256"][:12]}…, this one '
        f'{fingerprint[:12]}…): run --mode=embed again with this workdir.')
  if not len(library['tracks']):
    raise UserError(f'config.serve.library={directory!r} holds no tracks.')
  return library


def _ms(start: float) -> float:
  return round(1000 * (time.perf_counter() - start), 1)


class _TooLarge(Exception):
  """A request body that passed its limit while it streamed in."""


class BodyLimit:
  """ASGI middleware: refuses a request body over its route's limit with a
  413 as soon as the declared size (Content-Length) or the bytes received so
  far pass it, before the body is read whole.

  Args:
    app: the ASGI app inside.
    limits: path -> bytes; other paths get `default`.
  """

  def __init__(self, app, limits: dict[str, int], default: int):
    self.app, self.limits, self.default = app, limits, default

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    limit = self.limits.get(scope['path'], self.default)
    declared = dict(scope.get('headers') or []).get(b'content-length')
    if declared is not None and declared.isdigit() and int(declared) > limit:
      return await _refuse(send, limit)
    received = 0
    started = exceeded = False

    async def limited_receive():
      nonlocal received, exceeded
      message = await receive()
      if message['type'] == 'http.request':
        received += len(message.get('body', b''))
        if received > limit:
          exceeded = True
          raise _TooLarge()
      return message

    async def watched_send(message):
      nonlocal started
      if exceeded:
        # The app caught the stop (FastAPI answers a body it could not read
        # with a 400): the client is owed the 413, once, instead.
        if not started and message['type'] == 'http.response.start':
          started = True
          await _refuse(send, limit)
        return
      started = started or message['type'] == 'http.response.start'
      await send(message)

    try:
      await self.app(scope, limited_receive, watched_send)
    except _TooLarge:
      if not started:
        await _refuse(send, limit)


async def _refuse(send, limit: int) -> None:
  body = ('{"detail": "the request is larger than %d bytes"}' % limit
          ).encode()
  await send({'type': 'http.response.start', 'status': 413,
              'headers': [(b'content-type', b'application/json'),
                          (b'content-length', str(len(body)).encode()),
                          (b'connection', b'close')]})
  await send({'type': 'http.response.body', 'body': body})


async def _read_upload(file, max_upload_bytes: int) -> tuple[bytes, str]:
  """(bytes, lower-case extension) of an upload, or the 4xx that refuses it:
  a name with path components, too large, or empty."""
  import fastapi  # pylint: disable=g-import-not-at-top
  name = file.filename or ''
  if name != os.path.basename(name.replace('\\', '/')) or name in ('.', '..'):
    raise fastapi.HTTPException(400, f'bad file name {name!r}: no path '
                                'components')
  data = await file.read(max_upload_bytes + 1)
  if len(data) > max_upload_bytes:
    raise fastapi.HTTPException(
        413, f'the upload is larger than {max_upload_bytes} bytes')
  if not data.strip():
    raise fastapi.HTTPException(400, 'the file is empty')
  return data, os.path.splitext(name)[1].lower()


async def _document(data: bytes, ext: str, pool: pool_lib.AnalysisPool,
                    max_audio_seconds: float | None = None) -> Any:
  """The low-level document of an upload: parsed JSON, or Essentia's
  analysis of a recording in `pool` (at most `max_audio_seconds` long);
  4xx for anything else, 429/503/504 when the pool cannot analyse it."""
  import fastapi  # pylint: disable=g-import-not-at-top
  if data.lstrip().startswith(b'{') or ext == '.json':
    try:
      return mard_io.loads_document(data)
    except ValueError as e:
      raise fastapi.HTTPException(422, f'not valid JSON: {e}') from None
  if ext in audio_analysis.AUDIO_TYPES:
    try:
      return await pool.run(audio_analysis.analyse_bytes, data, ext,
                            max_audio_seconds)
    except pool_lib.PoolError as e:
      headers = (None if e.retry_after_s is None else
                 {'Retry-After': str(e.retry_after_s)})
      raise fastapi.HTTPException(e.status, str(e), headers=headers
                                  ) from None
    except audio_analysis.TooLong as e:
      raise fastapi.HTTPException(413, str(e)) from None
    except audio_analysis.BadAudio as e:
      raise fastapi.HTTPException(422, str(e)) from None
    except MemoryError:
      raise fastapi.HTTPException(413, (
          'the analysis needed more memory than a worker may use '
          f'({pool.memory_mb} MB, serve.worker_memory_mb); try a shorter '
          'recording')) from None
    except ImportError:
      raise fastapi.HTTPException(
          415, audio_analysis.ESSENTIA_MISSING) from None
  raise fastapi.HTTPException(
      415, f'unsupported file type {ext or "(none)"}: upload '
      f'{", ".join(audio_analysis.AUDIO_TYPES)} audio or an '
      'AcousticBrainz low-level .json document')


def create_app(room: Room, max_upload_bytes: int,
               max_query_bytes: int = 64 * 1024, analysis_workers: int = 0,
               max_audio_seconds: float | None = 900.0,
               hosts: tuple[str, ...] = (), origins: tuple[str, ...] = (),
               **pool_options):
  """The FastAPI app over a loaded Room.

  Args:
    room: the model and its bank.
    max_upload_bytes: an audio upload's limit (413 beyond it).
    max_query_bytes: a text query's limit (413 beyond it).
    analysis_workers: processes analysing recordings (0: one per core).
    max_audio_seconds: a recording's longest duration (413 beyond it;
      None: no limit).
    hosts: the Host names served (`guards.host_names`; (): any).
    origins: other sites' origins allowed to POST (cross-site POSTs are
      refused otherwise).
    **pool_options: `analysis_pool.AnalysisPool`'s analyses_per_worker,
      timeout_s, max_waiting, memory_mb.
  """
  import contextlib  # pylint: disable=g-import-not-at-top
  import fastapi_offline  # pylint: disable=g-import-not-at-top
  from fastapi import staticfiles  # pylint: disable=g-import-not-at-top

  # Essentia's MusicExtractor holds the GIL for a whole analysis: in the
  # server's own process it would stall every other request.
  pool = pool_lib.AnalysisPool(analysis_workers, **pool_options)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    pool.close()

  # The API docs' scripts and styles are served from the package: the room
  # works with no network, and its pages load nothing from other sites.
  app = fastapi_offline.FastAPIOffline(title='mardjax listening room',
                                       lifespan=lifespan)
  guards.install_error_handlers(app)
  app.state.analysis_pool = pool
  # Multipart framing on top of the file itself.
  app.add_middleware(BodyLimit, limits={
      '/api/query/text': max_query_bytes,
      '/api/query/audio': max_upload_bytes + 64 * 1024}, default=64 * 1024)
  # Added last, so it runs first: a refused site sends no body to be read.
  app.add_middleware(guards.SameOrigin, hosts=hosts, origins=origins)
  app.mount('/static', staticfiles.StaticFiles(directory=STATIC_DIR),
            name='static')
  _add_routes(app, room, pool, max_upload_bytes, max_audio_seconds)
  return app


def _add_routes(app, room: Room, pool, max_upload_bytes: int,
                max_audio_seconds: float | None) -> None:
  """The page, /healthz and the two query routes (`create_app`)."""
  import fastapi  # pylint: disable=g-import-not-at-top
  import pydantic  # pylint: disable=g-import-not-at-top
  from fastapi import responses  # pylint: disable=g-import-not-at-top

  class TextQuery(pydantic.BaseModel):
    text: str
    k: int = 10
    explain: bool = False

    @pydantic.field_validator('text')
    @classmethod
    def valid_text(cls, text: str) -> str:
      return guards.check_text(text)

  def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
      raise fastapi.HTTPException(422, f'k must be in [1, {MAX_K}], got {k}')
    return k

  @app.get('/', include_in_schema=False)
  def page():
    return responses.FileResponse(os.path.join(STATIC_DIR, 'index.html'))

  @app.get('/healthz')
  def healthz():
    analysis = pool.stats()
    body = {'status': 'ok' if analysis['ok'] else 'degraded',
            'step': room.step,
            'albums': int(room.bank['albums'].shape[0]),
            'reviews': int(room.bank['reviews'].shape[0]),
            'index': room.bank['album_index'].kind,
            'extractors': sorted(room.embedder.extractors),
            'analysis': analysis}
    # Not ok while recordings cannot be analysed, so that a supervisor or
    # load balancer notices.
    return responses.JSONResponse(body, 200 if analysis['ok'] else 503)

  @app.post('/api/query/text')
  def query_text(query: TextQuery):
    k = check_k(query.k)
    if not query.text.strip():
      raise fastapi.HTTPException(422, 'the text is empty')
    try:
      return room.text_query(query.text, k, query.explain)
    except ValueError as e:
      raise fastapi.HTTPException(422, str(e)) from None

  @app.post('/api/query/audio')
  async def query_audio(file: fastapi.UploadFile, k: int = 10,
                        explain: bool = False):
    k = check_k(k)
    data, ext = await _read_upload(file, max_upload_bytes)
    doc = await _document(data, ext, pool, max_audio_seconds)
    try:
      return room.descriptor_query(doc, k, explain)
    except desc_lib.DescriptorError as e:
      raise fastapi.HTTPException(
          422, f'not an AcousticBrainz low-level document: {e}') from None


def app_for(room: Room, config: ml_collections.ConfigDict, host: str = ''):
  """`create_app` with the config's limits, workers and allowed sites.

  Args:
    room: the loaded Room.
    config: the run's config (`config.serve`).
    host: the address the server binds ('': Host headers not checked).
  """
  s = config.serve
  names = _names(s.allowed_hosts)
  return create_app(room, int(s.max_upload_mb * 2**20),
                    int(s.max_query_kb * 1024), int(s.analysis_workers),
                    max_audio_seconds=float(s.max_audio_seconds),
                    analyses_per_worker=int(s.analyses_per_worker),
                    timeout_s=float(s.analysis_timeout_s),
                    max_waiting=int(s.max_waiting),
                    memory_mb=int(s.worker_memory_mb),
                    hosts=guards.host_names(host, names) if host else names,
                    origins=_names(s.allowed_origins))


# How long uvicorn waits for requests still being answered after a stop
# signal (an upload still arriving, say) before it cancels them.
_GRACEFUL_SHUTDOWN_S = 5


def _names(field: str) -> tuple[str, ...]:
  return tuple(n.strip() for n in field.split(',') if n.strip())


def check_address(host: str, port: int) -> None:
  """Raises UserError unless `host:port` can be listened on now: a port out
  of range, an address this machine does not have, or a port in use."""
  import socket  # pylint: disable=g-import-not-at-top
  if not 1 <= port <= 65535:
    raise UserError(f'--port={port} is not a TCP port (1 to 65535)')
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
  except (socket.gaierror, UnicodeError) as e:
    raise UserError(f'--host={host!r} is not an address of this machine '
                    f'({e})') from None
  family, kind, proto, _, address = infos[0]
  with socket.socket(family, kind, proto) as s:
    # What uvicorn sets: a port left in TIME_WAIT by a previous server is
    # free to take; one another process listens on is not.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(address)
    except OSError as e:
      raise UserError(f'cannot listen on {host}:{port}: {e.strerror} (pick '
                      'another --port, or stop what uses it)') from None


def serve_room(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
               mard_dir: str, host: str, port: int) -> dict[str, Any]:
  """Serves the listening room of the run in `workdir` on `host:port`
  until interrupted (one SIGTERM or Ctrl-C stops it within seconds, even
  while recordings are analysed: their clients get a 503)."""
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  check_address(host, port)  # Before minutes of loading, not after.
  room = Room(config, workdir, data_dir, mard_dir)
  # The explanations' programs compile while the server starts answering.
  threading.Thread(target=room.explainer.warm_up, daemon=True).start()
  app = app_for(room, config, host)
  pool = app.state.analysis_pool

  class Server(uvicorn.Server):
    """uvicorn waits for every request in flight before the app's shutdown
    runs; analyses are failed at the signal itself so that it need not
    wait for them."""

    def handle_exit(self, sig, frame):
      # A signal handler must not take the pool's lock, which the
      # interrupted code may hold.
      threading.Thread(target=pool.close, name='close-analysis-pool').start()
      super().handle_exit(sig, frame)

  print(f'The listening room: open http://{host}:{port} in a browser (JSON '
        f'API docs at http://{host}:{port}/docs).', flush=True)
  server = Server(uvicorn.Config(
      app, host=host, port=port, log_level='info',
      timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S))
  # uvicorn raises the signal again once it has shut down; a SIGTERM has
  # then done its work, and the run ends as a normal return.
  previous = signal.signal(signal.SIGTERM, lambda *_: None)
  try:
    server.run()
  finally:
    signal.signal(signal.SIGTERM, previous)
    pool.close()
  return {'served': f'http://{host}:{port}'}
