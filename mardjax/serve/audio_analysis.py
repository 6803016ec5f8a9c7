"""Recordings and AcousticBrainz documents -> low-level descriptor documents.

Recordings go through Essentia's MusicExtractor, the extractor AcousticBrainz
ran, with every statistic AcousticBrainz stored, so the result has the same
layout as the training documents. Only numpy, Essentia and the JSON reader
(`mard_io`) are imported here, so worker processes (the batch embedder's,
the server's analysis pool) start quickly.
"""

import os
import struct
import tempfile
from typing import Any

import numpy as np

from mardjax.data import files as files_lib
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


class TooLong(BadAudio):
  """A recording longer than the analysis allows (the message says how
  long, and the limit)."""


def preload() -> None:
  """Imports Essentia, for a worker process to do before its first
  analysis. Essentia missing is the analysis' to report (a 415); any other
  failure (a library that cannot load) is raised."""
  try:
    import essentia.standard  # pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as e:
    if e.name != 'essentia':
      raise


def _wav_seconds(data: bytes) -> float | None:
  """A RIFF/WAVE file's duration from its fmt and data chunk headers. The
  samples are uncompressed, so the bytes present bound it too (streaming
  writers leave the data size at 0 or 2**32 - 1)."""
  if data[:4] != b'RIFF' or data[8:12] != b'WAVE':
    return None
  pos, byte_rate = 12, None
  while pos + 8 <= min(len(data), 2**16):
    chunk = data[pos:pos + 4]
    size = struct.unpack('<I', data[pos + 4:pos + 8])[0]
    if chunk == b'fmt ' and pos + 16 <= len(data):
      byte_rate = struct.unpack('<I', data[pos + 16:pos + 20])[0]
    elif chunk == b'data':
      present = len(data) - pos - 8
      size = present if size in (0, 2**32 - 1) else min(size, present)
      return size / byte_rate if byte_rate else None
    pos += 8 + size + (size & 1)
  return None


def _streaminfo(head: bytes) -> tuple[int, int] | None:
  """(sample rate, total samples) of a FLAC stream starting at 'fLaC'."""
  if head[:4] != b'fLaC' or len(head) < 8 + 18 or head[4] & 0x7f != 0:
    return None
  info = int.from_bytes(head[8 + 10:8 + 18], 'big')
  return info >> 44, info & (2**36 - 1)


def _flac_seconds(head: bytes) -> float | None:
  """A FLAC file's duration from its STREAMINFO block (None when the
  encoder left the total unknown)."""
  if head[:3] == b'ID3' and len(head) >= 10:  # An ID3v2 tag may come first.
    size = 0
    for b in head[6:10]:
      size = size << 7 | (b & 0x7f)
    head = head[10 + size:]
  rate, total = _streaminfo(head) or (0, 0)
  return total / rate if rate and total else None


def _ogg_seconds(data: bytes) -> float | None:
  """An Ogg (Vorbis, Opus or FLAC) file's duration: its last page's
  granule position over the rate of its identification header."""
  if data[:4] != b'OggS':
    return None
  vorbis = data.find(b'\x01vorbis', 0, 512)
  flac = data.find(b'\x7fFLAC', 0, 512)
  if vorbis >= 0 and len(data) >= vorbis + 16:
    rate = struct.unpack('<I', data[vorbis + 12:vorbis + 16])[0]
  elif flac >= 0:
    rate = (_streaminfo(data[flac + 9:flac + 9 + 64]) or (0, 0))[0]
  elif data.find(b'OpusHead', 0, 512) >= 0:
    rate = 48000  # Opus granules count 48 kHz samples, whatever the input.
  else:
    return None
  last = data.rfind(b'OggS', max(0, len(data) - 2**16))
  if last < 0 or len(data) < last + 14 or not rate:
    return None
  granule = struct.unpack('<q', data[last + 6:last + 14])[0]
  return granule / rate if granule > 0 else None


def declared_seconds(data: bytes, ext: str) -> float | None:
  """A recording's duration as its container's headers declare it, read
  without decoding; None when they do not say (the decoder's bound then
  holds)."""
  try:
    if ext == '.wav':
      return _wav_seconds(data)
    if ext == '.flac':
      return _flac_seconds(data[:2**20])
    if ext == '.ogg':
      return _ogg_seconds(data)
  except (struct.error, ValueError, IndexError):
    return None
  return None  # mp3 frames carry no total: the decoder's bound holds.


def _too_long(seconds: float, max_seconds: float, exact: bool = True
              ) -> TooLong:
  return TooLong(
      f'the recording lasts {"" if exact else "more than "}'
      f'{_duration(seconds)}; the server analyses at most '
      f'{_duration(max_seconds)} (serve.max_audio_seconds = {max_seconds:g})')


def _duration(seconds: float) -> str:
  return (f'{seconds:.1f} s' if seconds < 120 else
          f'{seconds / 60:.1f} min')


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


def analyse_audio(path: str, max_seconds: float | None = None
                  ) -> dict[str, Any]:
  """A recording -> an AcousticBrainz-style low-level document (nested dict).

  The recording is decoded to mono 44.1 kHz (at most `max_seconds` and one
  more second of it, so a long recording never fills memory) and written
  as a wav beside it, which MusicExtractor analyses; the file must thus
  sit in a private, writable directory (`analyse_bytes` makes one).

  Raises:
    TooLong: longer than `max_seconds` (None: no limit).
    BadAudio: not decodable, or shorter than MIN_SECONDS.
    ImportError: Essentia is not installed.
  """
  import essentia  # pylint: disable=g-import-not-at-top
  import essentia.standard as es  # pylint: disable=g-import-not-at-top
  essentia.log.infoActive = False
  essentia.log.warningActive = False
  rate = 44100
  try:
    # Essentia's FFmpeg loader decodes every format alike (the extractor's
    # own metadata reader knows only wav/aiff in the PyPI build, without
    # taglib); EasyLoader is MonoLoader with an end time.
    options = {} if max_seconds is None else {'endTime': max_seconds + 1.0}
    samples = es.EasyLoader(filename=path, sampleRate=rate, **options)()
    if max_seconds is not None and len(samples) > max_seconds * rate:
      raise _too_long(max_seconds, max_seconds, exact=False)
    path = os.path.splitext(path)[0] + '.decoded.wav'
    es.MonoWriter(filename=path, format='wav', sampleRate=rate)(samples)
    del samples
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


def analyse_bytes(data: bytes, ext: str, max_seconds: float | None = None
                  ) -> dict[str, Any]:
  """An encoded recording (`ext`: one of AUDIO_TYPES) -> a low-level document.

  A recording whose headers declare more than `max_seconds` is refused
  before any decoding; the decoder holds the same bound for the others.
  The bytes are written under a name of our own in a private temporary
  directory, deleted when done: nothing a caller or client sends decides
  where bytes land, and the extractor's decoded copy goes with it.

  Raises:
    TooLong, BadAudio, ImportError: as `analyse_audio`.
  """
  if max_seconds is not None:
    seconds = declared_seconds(data, ext)
    if seconds is not None and seconds > max_seconds:
      raise _too_long(seconds, max_seconds)
  with tempfile.TemporaryDirectory(prefix='mardjax-audio-') as tmp:
    path = os.path.join(tmp, 'track' + ext)
    with open(path, 'wb') as f:
      f.write(data)
    try:
      return analyse_audio(path, max_seconds)
    except BadAudio as e:
      # Essentia names the file it read: a client is told of its upload,
      # never of the server's directories.
      message = str(e)
      for name in ('track.decoded.wav', 'track' + ext):
        message = message.replace(os.path.join(tmp, name), 'the upload')
      raise type(e)(message) from None


def read_file(path: str, max_bytes: int | None = None,
              max_seconds: float | None = None) -> dict[str, Any]:
  """A recording or an AcousticBrainz .json file -> a low-level document.

  Only a regular file is read (`files.read_bytes`: a FIFO or a device is
  refused, not opened), and at most `max_bytes` of it; a recording is
  analysed up to `max_seconds` (`analyse_bytes`).

  Raises:
    BadAudio: not a recording or a document, unreadable, empty, invalid JSON
      or an unreadable recording (the message says why).
    ImportError: a recording, and Essentia is not installed.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext not in AUDIO_TYPES + DOCUMENT_TYPES:
    raise BadAudio(f'not a recording or an AcousticBrainz document (read: '
                   f'{", ".join(AUDIO_TYPES + DOCUMENT_TYPES)})')
  try:
    data = files_lib.read_bytes(path, max_bytes, follow_outside_links=True)
  except files_lib.Skip as e:
    raise BadAudio(f'cannot be read: {e}') from None
  if not data:
    raise BadAudio('the file is empty')
  if ext in DOCUMENT_TYPES:
    try:
      return mard_io.loads_document(data)
    except ValueError as e:
      raise BadAudio(f'not valid JSON: {e}') from None
  return analyse_bytes(data, ext, max_seconds)


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
