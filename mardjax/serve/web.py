"""The listening room's JSON API (`--mode=serve`), a FastAPI app.

Loads the workdir's best checkpoint, its data manifest and vocabulary, and
the embedding bank of `--mode=export` (exported first when missing or from
another checkpoint), then answers:

  GET  /                     the page: upload a song, search by text
  GET  /healthz              {"status": "ok", "step", "albums", "reviews",
                              "index", "extractors"}
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

import json
import os
from typing import Any

import ml_collections
import numpy as np

from mardjax.serve import audio_analysis
from mardjax.data import descriptors as desc_lib
from mardjax.serve import embedder as embedder_lib
from mardjax.serve import export
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
  """The model (an `embedder.Embedder`) and the embedding bank, loaded once."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               data_dir: str, mard_dir: str):
    self.config = config
    self.embedder = e = embedder_lib.Embedder(config, workdir, data_dir)
    self.step = e.step
    bank_dir = os.path.join(workdir, export.EXPORT_DIR)
    ef_search = config.export.hnsw_ef_search
    try:
      bank = export.load(bank_dir, ef_search)
      info = bank['info']
      stale = (info['params_sha256'] != checkpoints.params_fingerprint(
          e.variables['params']) or info['index'] != search_index.settings(
              config.export))
    except UserError:
      stale = True
    if stale:  # Export the state already in hand, not a second restore.
      export.write(config, workdir, mard_dir, e.trained)
      bank = export.load(bank_dir, ef_search)
    self.bank = bank
    self._album_rows = {m['album_index']: m for m in bank['album_meta']}

  def text_query(self, text: str, k: int) -> dict[str, Any]:
    emb, known, words = self.embedder.embed_text(text)
    return {'albums': self._albums(emb, k), 'known_words': known,
            'words': words}

  def descriptor_query(self, doc: Any, k: int) -> dict[str, Any]:
    raw, z, version, warnings = self.embedder.read_document(doc)
    emb = self.embedder.embed_audio(z[None])
    idx, scores = self.bank['review_index'].search(emb, k)
    reviews = []
    for i, s in zip(idx[0], scores[0]):
      meta = self.bank['review_meta'][i]
      album = self._album_rows.get(meta['album_index'], {})
      text = meta.get('text') or ''
      reviews.append({'review_id': meta['review_id'],
                      'excerpt': text[:EXCERPT_CHARS] + (
                          '…' if len(text) > EXCERPT_CHARS else ''),
                      'album': album.get('title'),
                      'artist': album.get('artist'),
                      'genre': album.get('genre'),
                      'distance': _distance(s)})
    return {'reviews': reviews, 'albums': self._albums(emb, k),
            'warnings': warnings,
            'descriptors': {n: float(v) for n, v in zip(
                self.embedder.names, raw)},
            'extractor': version}

  def _albums(self, emb: np.ndarray, k: int) -> list[dict[str, Any]]:
    idx, scores = self.bank['album_index'].search(emb, k)
    return [dict({key: self.bank['album_meta'][i].get(key) for key in (
        'album_index', 'amazon_id', 'artist', 'title', 'genre')},
                 distance=_distance(s))
            for i, s in zip(idx[0], scores[0])]


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


async def _document(data: bytes, ext: str) -> Any:
  """The low-level document of an upload: parsed JSON, or Essentia's
  analysis of a recording (in a worker thread); 4xx for anything else."""
  import fastapi  # pylint: disable=g-import-not-at-top
  if data.lstrip().startswith(b'{') or ext == '.json':
    try:
      return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
      raise fastapi.HTTPException(422, f'not valid JSON: {e}') from None
  if ext in audio_analysis.AUDIO_TYPES:
    try:
      return await fastapi.concurrency.run_in_threadpool(
          audio_analysis.analyse_bytes, data, ext)
    except audio_analysis.BadAudio as e:
      raise fastapi.HTTPException(422, str(e)) from None
    except ImportError:
      raise fastapi.HTTPException(
          415, audio_analysis.ESSENTIA_MISSING) from None
  raise fastapi.HTTPException(
      415, f'unsupported file type {ext or "(none)"}: upload '
      f'{", ".join(audio_analysis.AUDIO_TYPES)} audio or an '
      'AcousticBrainz low-level .json document')


def create_app(room: Room, max_upload_bytes: int):
  """The FastAPI app over a loaded Room."""
  import fastapi  # pylint: disable=g-import-not-at-top
  import pydantic  # pylint: disable=g-import-not-at-top
  from fastapi import responses  # pylint: disable=g-import-not-at-top
  from fastapi import staticfiles  # pylint: disable=g-import-not-at-top

  app = fastapi.FastAPI(title='mardjax listening room')
  app.mount('/static', staticfiles.StaticFiles(directory=STATIC_DIR),
            name='static')

  class TextQuery(pydantic.BaseModel):
    text: str
    k: int = 10

  def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
      raise fastapi.HTTPException(422, f'k must be in [1, {MAX_K}], got {k}')
    return k

  @app.get('/', include_in_schema=False)
  def page():
    return responses.FileResponse(os.path.join(STATIC_DIR, 'index.html'))

  @app.get('/healthz')
  def healthz():
    return {'status': 'ok', 'step': room.step,
            'albums': int(room.bank['albums'].shape[0]),
            'reviews': int(room.bank['reviews'].shape[0]),
            'index': room.bank['album_index'].kind,
            'extractors': sorted(room.embedder.extractors)}

  @app.post('/api/query/text')
  def query_text(query: TextQuery):
    k = check_k(query.k)
    if not query.text.strip():
      raise fastapi.HTTPException(422, 'the text is empty')
    try:
      return room.text_query(query.text, k)
    except ValueError as e:
      raise fastapi.HTTPException(422, str(e)) from None

  @app.post('/api/query/audio')
  async def query_audio(file: fastapi.UploadFile, k: int = 10):
    k = check_k(k)
    data, ext = await _read_upload(file, max_upload_bytes)
    doc = await _document(data, ext)
    try:
      return room.descriptor_query(doc, k)
    except desc_lib.DescriptorError as e:
      raise fastapi.HTTPException(
          422, f'not an AcousticBrainz low-level document: {e}') from None

  return app


def run(config: ml_collections.ConfigDict, workdir: str, data_dir: str,
        mard_dir: str, host: str, port: int) -> dict[str, Any]:
  """Serves until interrupted."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  room = Room(config, workdir, data_dir, mard_dir)
  app = create_app(room, int(config.serve.max_upload_mb * 2**20))
  print(f'The listening room: open http://{host}:{port} in a browser (JSON '
        f'API docs at http://{host}:{port}/docs).', flush=True)
  uvicorn.run(app, host=host, port=port, log_level='info')
  return {'served': f'http://{host}:{port}'}
