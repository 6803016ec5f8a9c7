"""The listening room's JSON API (`--mode=serve`), a FastAPI app.

Loads the workdir's best checkpoint, its data manifest and vocabulary, and
the embedding bank of `--mode=export` (exported first when missing or from
another checkpoint), then answers:

  GET  /healthz              {"status": "ok", "step", "albums", "reviews"}
  POST /api/query/text       JSON {"text": ..., "k": 10} -> {"albums": [...]}
  POST /api/query/audio      multipart field `file`: a recording (wav, mp3,
                             flac, ogg) or an AcousticBrainz low-level JSON
                             document -> {"reviews": [...], "albums": [...],
                             "descriptors": {...}, "warnings": [...]}

Recordings go through Essentia's MusicExtractor, the extractor AcousticBrainz
ran, into the same low-level layout the model was trained on; the upload is
written to a private temporary directory under a name of our own and
deleted after use. Bad requests get a 4xx with {"detail": ...} and the
server keeps serving.
"""

import json
import os
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np

from mardjax import descriptors as desc_lib
from mardjax import export
from mardjax import input_pipeline
from mardjax import models
from mardjax import preprocess
from mardjax import text as text_lib
from mardjax import train
from mardjax.errors import UserError

MAX_K = 100
AUDIO_TYPES = ('.wav', '.mp3', '.flac', '.ogg')
MIN_SECONDS = 1.0
# Standardised descriptor values beyond this are flagged: training data
# puts almost all values within a few standard deviations.
OUTLIER_Z = 8.0
# The statistics AcousticBrainz documents hold for every frame descriptor.
_STATS = ['mean', 'var', 'median', 'min', 'max', 'dmean', 'dmean2', 'dvar',
          'dvar2']


class BadAudio(ValueError):
  """An upload that is not a usable recording (the message says why)."""


def analyse_audio(path: str) -> dict[str, Any]:
  """A recording -> an AcousticBrainz-style low-level document (nested dict).

  Raises:
    BadAudio: not decodable, or shorter than MIN_SECONDS.
    ImportError: Essentia is not installed.
  """
  import essentia  # pylint: disable=g-import-not-at-top
  import essentia.standard as es  # pylint: disable=g-import-not-at-top
  essentia.log.infoActive = False
  essentia.log.warningActive = False
  try:
    if not path.endswith('.wav'):
      # Decode with Essentia's FFmpeg loader into a wav beside it: the
      # extractor's own metadata reader knows only wav/aiff in the PyPI
      # build (no taglib), and decoding first treats every format alike.
      samples = es.MonoLoader(filename=path, sampleRate=44100)()
      path = os.path.splitext(path)[0] + '.wav'
      es.MonoWriter(filename=path, format='wav', sampleRate=44100)(samples)
    pool, _ = es.MusicExtractor(lowlevelStats=_STATS, rhythmStats=_STATS,
                                tonalStats=_STATS)(path)
  except RuntimeError as e:
    raise BadAudio(f'not a readable recording ({str(e)[:200]})') from None
  length = float(pool['metadata.audio_properties.length'])
  if length < MIN_SECONDS:
    raise BadAudio(f'the recording lasts {length:.2f} s; at least '
                   f'{MIN_SECONDS:g} s is needed')
  doc: dict[str, Any] = {}
  for name in pool.descriptorNames():
    node = doc
    *parents, leaf = name.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    value = pool[name]
    node[leaf] = (value.tolist() if isinstance(value, np.ndarray) else
                  float(value) if isinstance(value, (int, float, np.number))
                  else value)
  return doc


def _distance(cosine: float) -> float:
  """Euclidean distance between unit vectors with this cosine (0 to 2)."""
  return float(np.sqrt(max(0.0, 2 - 2 * cosine)))


class Room:
  """The model, its vocabulary and the embedding bank, loaded once."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               data_dir: str, mard_dir: str):
    self.config = config
    self.manifest = preprocess.load_manifest(data_dir)
    self.model = models.build(config.model, self.manifest['vocab']['size'])
    if config.model.text_encoder == 'pretrained':
      raise UserError('serve: text queries with text_encoder=pretrained need '
                      'the frozen encoder at query time, not supported yet.')
    if config.model.audio_encoder != 'track':
      raise UserError("serve: uploads are single tracks: use a model with "
                      "audio_encoder='track'.")
    audio = input_pipeline.load_audio_table(data_dir, self.manifest)
    sample = input_pipeline.load_reviews(data_dir, self.manifest, 'dev',
                                         config.data.max_len)
    if not len(sample['album']):
      sample = input_pipeline.load_reviews(data_dir, self.manifest, 'train',
                                           config.data.max_len)
    source = train.inference_source(workdir)
    self.step, state = train.restore_trained(
        config, workdir, data_dir, self.model, self.manifest, audio, sample,
        source)
    self.variables = train.inference_variables(state)
    sha = train.params_fingerprint(state.params)
    bank_dir = os.path.join(workdir, export.EXPORT_DIR)
    try:
      bank = export.load(bank_dir)
      stale = bank['info']['params_sha256'] != sha
    except UserError:
      stale = True
    if stale:  # Export the state already in hand, not a second restore.
      export.write(config, workdir, data_dir, mard_dir, self.model,
                   self.manifest, audio, self.step, state, source)
      bank = export.load(bank_dir)
    self.bank = bank
    self._album_rows = {m['album_index']: m for m in bank['album_meta']}
    with open(os.path.join(data_dir, self.manifest['vocab']['file'])) as f:
      self.vocab = text_lib.Vocabulary([w.rstrip('\n') for w in f])
    d = self.manifest['descriptors']
    self.specs = desc_lib.parse_descriptor_list(d['list'])
    self.mean, self.std = np.asarray(d['mean']), np.asarray(d['std'])
    self.names = desc_lib.feature_names(self.specs)
    self.extractors = self.manifest['report'].get('extractor_versions', {})
    self._embed_text = jax.jit(lambda t, l: self.model.apply(
        self.variables, tokens=t, lengths=l)['text'])
    self._embed_audio = jax.jit(lambda a: self.model.apply(
        self.variables, audio=a)['audio'])

  def text_query(self, text: str, k: int) -> dict[str, Any]:
    words = text_lib.tokenize(text)
    ids, _ = self.vocab.encode(words, self.config.data.max_len)
    known = int(np.sum(ids != text_lib.UNK_ID))
    if not known:
      raise ValueError('none of the words of this text is in the '
                       'vocabulary')
    tokens = np.zeros((1, self.config.data.max_len), np.int32)
    tokens[0, :len(ids)] = ids
    emb = np.asarray(self._embed_text(tokens, np.array([len(ids)],
                                                       np.int32)))
    return {'albums': self._albums(emb, k),
            'known_words': known, 'words': len(words)}

  def descriptor_query(self, doc: Any, k: int) -> dict[str, Any]:
    raw = desc_lib.extract(doc, self.specs)  # DescriptorError: a 422.
    z = desc_lib.normalize(raw[None], self.manifest['descriptors'][
        'transform'], self.mean, self.std)
    warnings = []
    version = desc_lib.extractor_version(doc)
    if self.extractors and version not in self.extractors:
      warnings.append(
          f'this document comes from extractor {version or "(unknown)"}, the '
          f'model was trained on {sorted(self.extractors)}: descriptor values '
          'may not be comparable')
    far = np.flatnonzero(np.abs(z[0]) > OUTLIER_Z)
    if len(far):
      warnings.append(
          f'{len(far)} descriptor values lie more than {OUTLIER_Z:g} standard '
          'deviations from the training data, e.g. ' + ', '.join(
              f'{self.names[i]} ({z[0, i]:+.1f})' for i in far[:3]))
    emb = np.asarray(self._embed_audio(z.astype(np.float32)))
    idx, scores = export.nearest(self.bank['reviews'], emb, k)
    reviews = []
    for i, s in zip(idx[0], scores[0]):
      meta = self.bank['review_meta'][i]
      album = self._album_rows.get(meta['album_index'], {})
      text = meta.get('text') or ''
      reviews.append({'review_id': meta['review_id'],
                      'excerpt': text[:300] + ('…' if len(text) > 300 else ''),
                      'album': album.get('title'),
                      'artist': album.get('artist'),
                      'distance': _distance(s)})
    return {'reviews': reviews, 'albums': self._albums(emb, k),
            'warnings': warnings,
            'descriptors': {n: float(v) for n, v in zip(self.names, raw)},
            'extractor': version}


  def _albums(self, emb: np.ndarray, k: int) -> list[dict[str, Any]]:
    idx, scores = export.nearest(self.bank['albums'], emb, k)
    return [dict({key: self.bank['album_meta'][i].get(key) for key in (
        'album_index', 'amazon_id', 'artist', 'title', 'genre')},
                 distance=_distance(s))
            for i, s in zip(idx[0], scores[0])]


def create_app(room: Room, max_upload_bytes: int):
  """The FastAPI app over a loaded Room."""
  import fastapi  # pylint: disable=g-import-not-at-top
  import pydantic  # pylint: disable=g-import-not-at-top

  app = fastapi.FastAPI(title='mardjax listening room')

  class TextQuery(pydantic.BaseModel):
    text: str
    k: int = 10

  def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
      raise fastapi.HTTPException(422, f'k must be in [1, {MAX_K}], got {k}')
    return k

  @app.get('/healthz')
  def healthz():
    return {'status': 'ok', 'step': room.step,
            'albums': int(room.bank['albums'].shape[0]),
            'reviews': int(room.bank['reviews'].shape[0])}

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
    name = file.filename or ''
    if name != os.path.basename(name.replace('\\', '/')) or name in (
        '.', '..'):
      raise fastapi.HTTPException(400, f'bad file name {name!r}: no path '
                                  'components')
    data = await file.read(max_upload_bytes + 1)
    if len(data) > max_upload_bytes:
      raise fastapi.HTTPException(
          413, f'the upload is larger than {max_upload_bytes} bytes')
    if not data.strip():
      raise fastapi.HTTPException(400, 'the file is empty')
    ext = os.path.splitext(name)[1].lower()
    if data.lstrip().startswith(b'{') or ext == '.json':
      try:
        doc = json.loads(data)
      except (ValueError, UnicodeDecodeError) as e:
        raise fastapi.HTTPException(422, f'not valid JSON: {e}') from None
    elif ext in AUDIO_TYPES:
      # Our own file name in a private directory: nothing the client sends
      # decides where bytes land; the directory goes when done.
      with tempfile.TemporaryDirectory(prefix='mardjax-upload-') as tmp:
        path = os.path.join(tmp, 'upload' + ext)
        with open(path, 'wb') as f:
          f.write(data)
        try:
          doc = await fastapi.concurrency.run_in_threadpool(analyse_audio,
                                                            path)
        except BadAudio as e:
          raise fastapi.HTTPException(422, str(e)) from None
        except ImportError:
          raise fastapi.HTTPException(
              415, 'audio analysis needs Essentia (pip install '
              'essentia), which is not installed') from None
    else:
      raise fastapi.HTTPException(
          415, f'unsupported file type {ext or "(none)"}: upload '
          f'{", ".join(AUDIO_TYPES)} audio or an AcousticBrainz low-level '
          '.json document')
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
  print(f'listening on http://{host}:{port}', flush=True)
  uvicorn.run(app, host=host, port=port, log_level='info')
  return {'served': f'http://{host}:{port}'}
