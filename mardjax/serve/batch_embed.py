"""`--mode=embed`: a folder of recordings and AcousticBrainz documents into
the trained space, in the export's format.

Every .wav/.mp3/.flac/.ogg file under `--input_dir` goes through Essentia's
MusicExtractor in `config.embed.workers` processes; every .json file is read
as an AcousticBrainz low-level document, or a bulk API response holding
several. The audio branch embeds them all.
`--output_dir` (default DIR/embedded) receives, as `export` writes its banks:

  embed.json     format version, checkpoint step and parameter sha256, data
                 manifest hash, embedding size, counts, index, skipped files
  tracks.npy     (N, E) float32 unit vectors, one per file that was read
  tracks.jsonl   one line per row: file (relative to the input folder),
                 mbid and offset (bulk responses; else the document's
                 recording id tag), source ('recording' or
                 'acousticbrainz'), extractor, warnings (extractor mismatch,
                 out-of-distribution values)
  *.hnsw.faiss   with config.export.index='hnsw'

Files that cannot be read are skipped, counted, and listed with the reason
in embed.json; other files in the folder are counted as ignored. Only
regular files are read (`mardjax.data.files`): FIFOs, devices, link loops,
dangling links, links leaving the folder (unless
`config.embed.follow_outside_links`) and files over
`config.embed.max_document_mb` are listed under those reasons, never opened.
The output is written into a hidden folder beside `--output_dir` and swapped
in whole; embed.json's `written` holds each file's size and sha256, and
`load` refuses files of another write. An output path that is a file, or a
folder of other files, is refused before any work.
"""

import collections
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np

from mardjax.serve import audio_analysis
from mardjax.data import descriptors as desc_lib
from mardjax.data import files as files_lib
from mardjax.serve import export
from mardjax.data import mard_io
from mardjax.serve import search_index
from mardjax.train import checkpoints
from mardjax.errors import UserError

FORMAT_VERSION = 1
OUTPUT_DIR = 'embedded'
_READABLE = audio_analysis.AUDIO_TYPES + audio_analysis.DOCUMENT_TYPES


def find_files(folder: str, policy: files_lib.Policy = files_lib.Policy()
               ) -> tuple[list[str], int, list[dict[str, str]]]:
  """The files of `folder` that `--mode=embed` reads.

  Returns:
    (readable regular files relative to `folder`, sorted; count of files of
    other types; [{'file', 'reason'}] of readable types that are not read:
    FIFOs, devices, sockets, link loops, dangling links, links leaving the
    folder (unless `policy.follow_outside_links`), files over
    `policy.max_bytes`).
  """
  found, ignored, skipped = [], 0, []

  def wanted(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in _READABLE

  def on_skip(path: str, reason: str) -> None:
    nonlocal ignored
    if wanted(path):
      skipped.append({'file': os.path.relpath(path, folder),
                      'reason': reason})
    else:
      ignored += 1

  for path, _ in files_lib.walk(folder, None, collections.Counter(),
                                policy.follow_outside_links, policy.max_bytes,
                                on_skip):
    if wanted(path):
      found.append(os.path.relpath(path, folder))
    else:
      ignored += 1
  return found, ignored, skipped


def _documents(paths: list[str], workers: int, show_progress: bool):
  """Yields (document or None, error or None) per path, in order."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(paths), unit='file', desc='embed', file=sys.stderr,
             disable=not show_progress, dynamic_ncols=True)
  try:
    if workers <= 1 or len(paths) == 1:
      for p in paths:
        result = audio_analysis.read_file_or_reason(p)
        bar.update()  # Before yielding: the consumer may stop at the last.
        yield result
      return
    # Spawned, not forked: the parent holds JAX's threads. Workers import
    # only audio_analysis (numpy and Essentia), not this module.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers,
                                                mp_context=context) as pool:
      for result in pool.map(audio_analysis.read_file_or_reason, paths):
        bar.update()
        yield result
  finally:
    bar.close()


def _entries(rel: str, doc: Any, skipped: list[dict[str, Any]]
             ) -> list[tuple[str | None, int | None, Any]]:
  """(mbid, offset, document) of each recording a file holds: one, or every
  entry of an AcousticBrainz bulk response `{mbid: {"0": doc}}`."""
  if isinstance(doc, dict) and 'lowlevel' not in doc and any(
      mard_io.is_mbid(k) for k in doc):
    docs, bad = mard_io.bulk_documents(doc)
    for reason, n in bad.items():
      skipped.append({'file': rel, 'reason': f'{n} bulk entries: {reason}'})
    return docs
  return [(None, None, doc)]


def _recording_id(doc: Any) -> str | None:
  """The MusicBrainz recording id a document's tags give, if any."""
  try:
    value = doc['metadata']['tags']['musicbrainz_recordingid']
  except (KeyError, TypeError):
    return None
  value = value[0] if isinstance(value, list) and value else value
  return value if isinstance(value, str) else None


def embed_folder(config: ml_collections.ConfigDict, workdir: str,
                 data_dir: str, input_dir: str | None,
                 output_dir: str | None, show_progress: bool = True
                 ) -> dict[str, Any]:
  """Embeds `input_dir`'s files into `output_dir`; returns embed.json's
  content plus paths."""
  from mardjax.serve import embedder as embedder_lib  # pylint: disable=g-import-not-at-top
  if not input_dir:
    raise UserError('--mode=embed needs --input_dir, a folder of recordings '
                    '(wav, mp3, flac, ogg) or AcousticBrainz .json files.')
  if not os.path.isdir(input_dir):
    raise UserError(f'--input_dir={input_dir!r} is not a folder.')
  output_dir = output_dir or os.path.join(workdir, OUTPUT_DIR)
  _check_output_dir(output_dir)  # Before minutes of analysis.
  policy = files_lib.Policy.from_config(config.embed)
  files, ignored, not_read = find_files(input_dir, policy)
  if not files:
    reasons = collections.Counter(s['reason'] for s in not_read)
    raise UserError(f'{input_dir!r} holds no readable {", ".join(_READABLE)} '
                    f'files ({ignored} other files; not read: '
                    f'{dict(reasons) or "none"}).')
  index = search_index.settings(config.export)  # Bad settings: fail early.
  start = time.time()
  embedder = embedder_lib.Embedder(config, workdir, data_dir)
  workers = config.embed.workers or os.cpu_count() or 1
  workers = min(workers, sum(not f.lower().endswith('.json') for f in files))

  rows, zs, skipped = [], [], list(not_read)
  docs = _documents([os.path.join(input_dir, f) for f in files], workers,
                    show_progress)
  for rel, (doc, error) in zip(files, docs):
    if error is not None:
      skipped.append({'file': rel, 'reason': error})
      continue
    is_json = rel.lower().endswith('.json')
    for mbid, offset, one in _entries(rel, doc, skipped):
      try:
        _, z, version, warnings = embedder.read_document(one)
      except desc_lib.DescriptorError as e:
        skipped.append({'file': rel, 'mbid': mbid, 'reason': (
            f'not an AcousticBrainz low-level document: {e}')})
        continue
      zs.append(z)
      rows.append({'file': rel, 'mbid': mbid or _recording_id(one),
                   'offset': offset,
                   'source': 'acousticbrainz' if is_json else 'recording',
                   'extractor': version, 'warnings': warnings})
  emb = (embedder.embed_audio(np.stack(zs)) if zs else
         np.zeros((0, embedder.model.embed_dim), np.float32))

  info = {
      'format_version': FORMAT_VERSION, 'checkpoint': embedder.source,
      'step': int(embedder.step),
      'params_sha256': checkpoints.params_fingerprint(embedder.variables['params']),
      'manifest_hash': embedder.manifest.sha256,
      'embed_dim': int(emb.shape[1]), 'input_dir': os.path.abspath(input_dir),
      'tracks': len(rows), 'skipped': len(skipped), 'ignored': ignored,
      'with_warnings': sum(bool(r['warnings']) for r in rows),
      'index': index, 'skipped_files': skipped,
  }
  # Into a hidden folder beside the output, swapped in when whole: a full
  # disk leaves the old output (or none), never a mix.
  with files_lib.whole_folder(output_dir) as tmp:
    export.write_bank(tmp, 'tracks', emb, rows, index)
    info['written'] = files_lib.digests(tmp, os.listdir(tmp))
    with open(os.path.join(tmp, 'embed.json'), 'w') as f:  # Last.
      json.dump(info, f, indent=1)
  reasons = collections.Counter(s['reason'].split(' (')[0] for s in skipped)
  summary = {k: v for k, v in info.items()
             if k not in ('skipped_files', 'written')}
  return dict(summary, skipped_reasons=dict(reasons), directory=output_dir,
              workers=workers, seconds=round(time.time() - start, 1))


def _check_output_dir(output_dir: str) -> None:
  """One line before any work when the output cannot go to `output_dir`:
  a file there, an unwritable parent, or a folder of other files (which
  the swap that replaces the output would remove)."""
  files_lib.check_writable_dirs([output_dir])
  if os.path.isdir(output_dir) and os.listdir(output_dir) and (
      not os.path.exists(os.path.join(output_dir, 'embed.json'))):
    raise UserError(f'--output_dir={output_dir} holds other files and no '
                    'embed.json: the output replaces the whole folder, so '
                    'choose an empty or new one.')


def load(directory: str, ef_search: int = 128) -> dict[str, Any]:
  """An `embed_folder` output back: {'info', 'tracks', 'track_meta', 'track_index'}.

  Raises:
    UserError: no output, another format, or files that are not the ones
      embed.json was written with.
  """
  info = export.read_info(os.path.join(directory, 'embed.json'),
                          FORMAT_VERSION, 'embed')
  files_lib.check_digests(directory, info.get('written', {}),
                          f'the embed output in {directory}',
                          'run --mode=embed again')
  emb, rows, index = export.read_bank(directory, 'tracks', info['index'],
                                      ef_search)
  return {'info': info, 'tracks': emb, 'track_meta': rows,
          'track_index': index}
