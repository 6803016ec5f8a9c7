"""Embedding export (`--mode=export`): the trained space as plain files.

Writes `DIR/export/` from the workdir's best-by-recall checkpoint (the
newest rolling checkpoint when no best was kept):

  export.json      format version, checkpoint step and parameter sha256, data
                   manifest hash, embedding size, counts, the config
  albums.npy       (C, E) float32 unit vectors: every album with audio
  albums.jsonl     one line per row: album_index, amazon_id, artist, title,
                   genre, split
  reviews.npy      (N, E) float32 unit vectors: every review of every split
  reviews.jsonl    one line per row: review_id, album_index, split, text
                   (summary and body, from the raw MARD reviews file)
  *.hnsw.faiss     with config.export.index='hnsw': a faiss HNSW index per
                   bank, for catalogues too large for exact search

Rows of each .npy match the lines of its .jsonl. `load` gives each bank a
search index (`search_index`): exact top-k by default. The folder is written
under a hidden name beside it and swapped in whole (a full disk is one line
and leaves the old export); export.json's `written` holds each file's size
and sha256, and `load` refuses a folder mixing files of two exports.
"""

import collections
import json
import os
import time
from typing import Any

import ml_collections
import numpy as np

from mardjax.data import files as files_lib
from mardjax.data import manifest as manifest_lib
from mardjax.data import mard_io
from mardjax.data import text_features
from mardjax.errors import UserError
from mardjax.evaluation import word_evidence
from mardjax.models import embed
from mardjax.models import two_branch
from mardjax.serve import search_index
from mardjax.train import checkpoints

# 2: each review row says where its body starts ('body_start').
FORMAT_VERSION = 2
EXPORT_DIR = 'export'
_SPLITS = ('train', 'dev', 'test')


def _review_texts(mard_dir: str, wanted: set[str],
                  policy: files_lib.Policy) -> dict[str, tuple[str, int]]:
  """review_id -> (its text as the pretrained encoder reads it, where its
  body starts in it: the word encoders read the body), from the raw file."""
  texts = {}
  counts = collections.Counter()
  for review in mard_io.iter_reviews(mard_dir, counts, policy):
    if review is not None and review.review_id in wanted:
      text = text_features.review_text(review.summary, review.text)
      texts[review.review_id] = (text, len(text) - len(review.text))
  return texts


def export_space(config: ml_collections.ConfigDict, workdir: str,
                 data_dir: str, mard_dir: str) -> dict[str, Any]:
  """Restores the workdir's serving checkpoint and writes its export."""
  files_lib.check_writable_dirs([os.path.join(workdir, EXPORT_DIR)])
  manifest = manifest_lib.load(data_dir)
  trained = checkpoints.load_for_inference(config, workdir, manifest)
  return write(config, workdir, mard_dir, trained)


def _all_reviews(config, manifest: manifest_lib.Manifest
                 ) -> dict[str, np.ndarray]:
  """Every split's reviews in one `load_reviews` dict, plus 'split'."""
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  parts = [input_pipeline.load_reviews(manifest, s, config.data.max_len)
           for s in _SPLITS]
  merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  merged['split'] = np.concatenate([np.full(len(p['album']), s)
                                    for s, p in zip(_SPLITS, parts)])
  return merged


def write(config: ml_collections.ConfigDict, workdir: str, mard_dir: str,
          trained: checkpoints.Inference) -> dict[str, Any]:
  """Writes the export of a restored model (`export_space`, or a server that already
  holds one); returns export.json's content plus paths.

  Reads the records (every track and every review) through the input
  pipeline, imported here: a server whose export is up to date never loads
  it.
  """
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  start = time.time()
  index = search_index.settings(config.export)  # Bad settings: fail early.
  manifest, model, variables = (trained.manifest, trained.model,
                                trained.variables)
  reviews = _all_reviews(config, manifest)
  audio = input_pipeline.load_audio_table(manifest)
  albums, album_emb = embed.albums(
      variables, model, audio, max_tracks=two_branch.album_tracks(config))
  rule = word_evidence.for_run(config, workdir, trained, audio)
  review_emb = word_evidence.review_embeddings(rule, variables, model,
                                               reviews)

  out = os.path.join(workdir, EXPORT_DIR)
  meta = manifest_lib.read_albums(manifest)
  texts = _review_texts(mard_dir, set(reviews['review_id'].tolist()),
                        files_lib.Policy.from_config(config.data))
  rows = []
  for rid, album, split in zip(reviews['review_id'], reviews['album'],
                               reviews['split']):
    text, body_start = texts.get(rid, (None, 0))
    rows.append({'review_id': rid, 'album_index': int(album),
                 'split': str(split), 'text': text, 'body_start': body_start})
  missing = sum(r['text'] is None for r in rows)
  info = {
      'format_version': FORMAT_VERSION, 'checkpoint': trained.source,
      'step': int(trained.step),
      'params_sha256': checkpoints.params_fingerprint(variables['params']),
      'manifest_hash': manifest.sha256,
      'embed_dim': int(album_emb.shape[1]),
      'albums': int(len(albums)), 'reviews': int(len(review_emb)),
      'reviews_without_text': int(missing), 'index': index,
      # The review vectors' query rule (`word_evidence`): its cut, 0 off.
      'query_cut': None if rule is None else rule.k,
      'config': json.loads(config.to_json_best_effort()),
  }
  # Into a hidden folder beside the export, swapped in when whole: a full
  # disk leaves the old export (or none), never a mix of two.
  with files_lib.whole_folder(out) as tmp:
    write_bank(tmp, 'albums', album_emb, [
        {k: meta[int(i)].get(k) for k in ('album_index', 'amazon_id',
                                          'artist', 'title', 'genre',
                                          'split')}
        for i in albums], index)
    write_bank(tmp, 'reviews', review_emb, rows, index)
    info['written'] = files_lib.digests(tmp, os.listdir(tmp))
    with open(os.path.join(tmp, 'export.json'), 'w') as f:  # Last.
      json.dump(info, f, indent=1)
  if missing:
    info['warnings'] = [f'{missing} reviews not found in {mard_dir}: their '
                        'text is null']
  return dict({k: v for k, v in info.items()
               if k not in ('config', 'written')},
              directory=out, seconds=round(time.time() - start, 1))


def write_bank(directory: str, name: str, emb: np.ndarray,
               rows: list[dict[str, Any]], index: dict[str, Any]) -> None:
  """`name`.npy, `name`.jsonl (one line per row) and its search index."""
  if len(rows) != emb.shape[0]:
    raise ValueError(f'{name}: {emb.shape[0]} vectors, {len(rows)} rows')
  np.save(os.path.join(directory, f'{name}.npy'), emb.astype(np.float32))
  with open(os.path.join(directory, f'{name}.jsonl'), 'w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')
  if len(rows):
    search_index.write(directory, name, emb, index)


def read_bank(directory: str, name: str, index: dict[str, Any],
              ef_search: int) -> tuple[np.ndarray, list[dict[str, Any]],
                                       search_index.Index]:
  """(vectors (N, E), rows, search index) of `write_bank`; checks they agree."""
  try:
    emb = np.load(os.path.join(directory, f'{name}.npy'))
    with open(os.path.join(directory, f'{name}.jsonl')) as f:
      rows = [json.loads(line) for line in f]
  except (OSError, ValueError) as e:
    raise UserError(f'{directory}: {name} is unreadable ({e}); export '
                    'again.') from None
  if len(rows) != emb.shape[0]:
    raise UserError(f'{directory}: {name}.npy has {emb.shape[0]} rows but '
                    f'{name}.jsonl {len(rows)} lines.')
  return emb, rows, search_index.load(directory, name, emb, index, ef_search)


def read_info(path: str, version: int, mode: str) -> dict[str, Any]:
  """The JSON description beside a bank (export.json, embed.json), checked:
  present, valid, of this code's format `version`; `index` defaults to
  exact (files written before indexes existed)."""
  if not os.path.isfile(path):
    raise UserError(f'No {os.path.basename(path)} in '
                    f'{os.path.dirname(path)!r}: run --mode={mode} first.')
  try:
    with open(path) as f:
      info = json.load(f)
  except ValueError as e:
    raise UserError(f'{path} is not valid JSON ({e}); run --mode={mode} '
                    'again.') from None
  if info.get('format_version') != version:
    raise UserError(f'{path}: format {info.get("format_version")}, this code '
                    f'reads {version}; run --mode={mode} again.')
  info.setdefault('index', {'kind': 'exact'})
  return info


def load(directory: str, ef_search: int = 128) -> dict[str, Any]:
  """An export back: {'info', 'albums', 'album_meta', 'album_index',
  'reviews', 'review_meta', 'review_index'}; checks the files agree.

  Args:
    ef_search: candidates an HNSW search visits (ignored by exact search).

  Raises:
    UserError: no export, another format, or files that are not the ones
      export.json was written with (a folder mixing two exports).
  """
  info = read_info(os.path.join(directory, 'export.json'), FORMAT_VERSION,
                   'export')
  files_lib.check_digests(directory, info.get('written', {}),
                          f'the export in {directory}', 'export again')
  out = {'info': info}
  for name in ('albums', 'reviews'):
    emb, rows, index = read_bank(directory, name, info['index'], ef_search)
    out[name], out[f'{name[:-1]}_meta'] = emb, rows
    out[f'{name[:-1]}_index'] = index
  return out
