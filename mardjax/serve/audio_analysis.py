"""Recordings and AcousticBrainz documents -> low-level descriptor documents.

Recordings go through Essentia's MusicExtractor, the extractor AcousticBrainz
ran, with every statistic AcousticBrainz stored, so the result has the same
layout as the training documents. Only numpy, Essentia and the JSON reader
(`mard_io`) are imported here, so worker processes (the batch embedder's,
the server's analysis pool) start quickly.
"""

import os
import tempfile
from typing import Any

import numpy as np

from mardjax.data import mard_io

AUDIO_TYPES = ('.wav', '.mp3', '.flac', '.ogg')
DOCUMENT_TYPES = ('.json',)
MIN_SECONDS = 1.0
ESSENTIA_MISSING = ('audio analysis needs Essentia (pip install essentia), '
                    'which is not installed')
# The statistics AcousticBrainz documents hold for every frame descriptor.
_STATS = ['mean', 'var', 'median', 'min', 'max', 'dmean', 'dmean2', 'dvar',
          'dvar2']


class BadAudio(ValueError):
  """An upload that is not a usable recording (the message says why)."""


def watch_parent(parent_pid: int, interval_s: float = 1.0) -> None:
  """Worker-process initializer: exit when the process that started this one
  is gone (a server killed outright cannot shut its pool down)."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(interval_s)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, daemon=True, name='watch-parent').start()


def analyse_audio(path: str) -> dict[str, Any]:
  """A recording -> an AcousticBrainz-style low-level document (nested dict).

  A file that is not a wav is decoded into a wav beside it first, so the
  file must sit in a private, writable directory (`analyse_bytes` makes
  one).

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
      # Essentia's FFmpeg loader decodes; the extractor's own metadata
      # reader knows only wav/aiff in the PyPI build (no taglib), and
      # decoding first treats every format alike.
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


def analyse_bytes(data: bytes, ext: str) -> dict[str, Any]:
  """An encoded recording (`ext`: one of AUDIO_TYPES) -> a low-level document.

  The bytes are written under a name of our own in a private temporary
  directory, deleted when done: nothing a caller or client sends decides
  where bytes land, and the extractor's decoded copy goes with it.

  Raises:
    BadAudio, ImportError: as `analyse_audio`.
  """
  with tempfile.TemporaryDirectory(prefix='mardjax-audio-') as tmp:
    path = os.path.join(tmp, 'track' + ext)
    with open(path, 'wb') as f:
      f.write(data)
    try:
      return analyse_audio(path)
    except BadAudio as e:
      # Essentia names the file it read: a client is told of its upload,
      # never of the server's directories.
      raise BadAudio(str(e).replace(os.path.splitext(path)[0],
                                    'the upload')) from None


def read_file(path: str) -> dict[str, Any]:
  """A recording or an AcousticBrainz .json file -> a low-level document.

  Raises:
    BadAudio: an unreadable recording or an invalid JSON file (the message
      says why).
    ImportError: a recording, and Essentia is not installed.
  """
  ext = os.path.splitext(path)[1].lower()
  with open(path, 'rb') as f:
    data = f.read()
  if ext in DOCUMENT_TYPES:
    try:
      return mard_io.loads_document(data)
    except ValueError as e:
      raise BadAudio(f'not valid JSON: {e}') from None
  if ext not in AUDIO_TYPES:
    raise BadAudio(f'unsupported file type {ext or "(none)"}')
  if not data:
    raise BadAudio('the file is empty')
  return analyse_bytes(data, ext)


def read_file_or_reason(path: str) -> tuple[dict[str, Any] | None,
                                             str | None]:
  """(document, None), or (None, why it cannot be read): `read_file` for
  worker processes that must not stop."""
  try:
    return read_file(path), None
  except BadAudio as e:
    return None, str(e)
  except ImportError:
    return None, ESSENTIA_MISSING
  except Exception as e:  # pylint: disable=broad-except
    # One odd file must not end a run over thousands: count it.
    return None, f'{type(e).__name__}: {str(e)[:200]}'
