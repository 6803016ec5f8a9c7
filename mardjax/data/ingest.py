"""Ingestion: a raw MARD directory -> validated albums, tracks and reviews.

The one parser of raw MARD in mardjax: the TFRecord writer (`preprocess`) and
the TFDS builder (`tfds_mard`) both read through it.

  1. `find_sources`: the metadata and review files and every descriptor file;
  2. `load`: albums from metadata, descriptor documents parsed in worker
     processes and tied to albums (by `<amazonid>_<mbid>` file names or by the
     albums' song MBIDs), albums with no usable document dropped (counted),
     album-level split;
  3. `Corpus.usable_reviews`: a stream of validated, de-duplicated reviews
     with their album and split. Reviews are streamed, never held.

Every record that cannot be used is counted in `Corpus.counts` under
`<group>/<reason>` (groups: albums, reviews, tracks, descriptor_files);
`<group>_notes/<what>` counts things worth knowing that lose nothing, and
`input/<what>` counts what was read, so the output can be reconciled.
"""

import collections
import dataclasses
import functools
import os
from typing import Iterator

import ml_collections
import numpy as np

from mardjax.data import descriptors as desc_lib
from mardjax.data import files as files_lib
from mardjax.data import mard_io
from mardjax import progress
from mardjax.data import splits as splits_lib
from mardjax.data import text as text_lib
from mardjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sources:
  """The input files of one raw MARD directory."""
  mard_dir: str
  dirs: list[str]  # Descriptor directories, in priority order.
  files: list[mard_io.DescriptorFile]
  # What the listing did not read: `descriptor_files/<reason>` -> files.
  skipped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  policy: files_lib.Policy = files_lib.Policy()


@dataclasses.dataclass
class KeptAlbum:
  """An album with at least one usable track.

  Attributes:
    album: its metadata.
    mbids: its tracks' MBIDs, in album order.
    descriptors: (num_tracks, dim) float32 raw descriptor values.
    split: `train` or `test` (album-level split).
  """
  album: mard_io.Album
  mbids: list[str]
  descriptors: np.ndarray
  split: str


@dataclasses.dataclass
class Corpus:
  """What `load` found. `albums[i]` has album index i in every output."""
  sources: Sources
  albums: list[KeptAlbum]
  index_of: dict[str, int]  # amazon-id -> album index.
  dropped_albums: set[str]  # amazon-ids of albums without usable audio.
  counts: collections.Counter
  extractors: collections.Counter  # Extractor version -> tracks.
  dev_fraction: float
  split_salt: str

  @property
  def album_split(self) -> list[str]:
    return [a.split for a in self.albums]

  def usable_reviews(self, counts: collections.Counter
                     ) -> Iterator[tuple[mard_io.Review, list[str], int, str]]:
    """Streams (review, words, album index, split) for every usable review.

    Each call reads the review file again and counts its skips and its input
    lines into `counts`; the first of several reviews with one id wins. A
    review without a single word ("!!!") is skipped as `no_words`.
    """
    seen = set()
    for review in mard_io.iter_reviews(self.sources.mard_dir, counts,
                                       self.sources.policy):
      counts['input/review_lines'] += 1
      if review is None:
        continue
      if review.review_id in seen:
        counts['reviews/duplicate_review_id'] += 1
        continue
      seen.add(review.review_id)
      idx = self.index_of.get(review.amazon_id)
      if idx is None:
        counts['reviews/album_without_audio' if review.amazon_id in
               self.dropped_albums else 'reviews/unknown_album'] += 1
        continue
      words = text_lib.tokenize(review.text)
      if not words:
        counts['reviews/no_words'] += 1
        continue
      split = splits_lib.review_split(review.review_id,
                                      self.albums[idx].split,
                                      self.dev_fraction, self.split_salt)
      yield review, words, idx, split


def describe_skips(counts: collections.Counter, group: str) -> str:
  items = {k.partition('/')[2]: v for k, v in counts.items()
           if k.startswith(group + '/')}
  return f'{group} skipped: {items or "none"}.'


def descriptor_dirs(mard_dir: str, extra: str) -> list[str]:
  """The original directory, `acousticbrainz_expanded`, then the extras."""
  dirs = [os.path.join(mard_dir, mard_io.ORIGINAL_DESCRIPTOR_DIR),
          os.path.join(mard_dir, mard_io.EXPANDED_DESCRIPTOR_DIR)]
  for item in (extra or '').split(','):
    item = item.strip()
    if not item:
      continue
    path = item if os.path.isabs(item) else os.path.join(mard_dir, item)
    if not os.path.isdir(path):
      raise UserError(f'config.data.extra_descriptor_dirs: {path!r} is not a '
                      'directory.')
    dirs.append(path)
  for d in dirs:
    if os.path.exists(d) and not os.path.isdir(d):
      raise UserError(f'{d!r} is a file: AcousticBrainz descriptors are read '
                      'from a directory of documents.')
  return [d for d in dirs if os.path.isdir(d)]


def _check_required(path: str, mard_dir: str, policy: files_lib.Policy
                    ) -> None:
  """One line when a metadata or reviews file is missing or is not a
  regular file (a FIFO would block, a device never end)."""
  if not os.path.lexists(path):
    raise UserError(f'No {os.path.basename(path)} in {mard_dir!r}: is this '
                    'a MARD directory? (README: "Real MARD data")')
  try:
    files_lib.check(path, mard_dir, policy.follow_outside_links)
  except files_lib.Skip as e:
    hint = (': config.data.follow_outside_links=True reads it' if
            e.reason == files_lib.OUTSIDE_LINK else '')
    raise UserError(f'{path} is not a regular file ({e}){hint}.') from None


def find_sources(data: ml_collections.ConfigDict, mard_dir: str) -> Sources:
  """Checks the raw files exist and lists the descriptor files.

  Raises:
    UserError: no MARD directory, a metadata or reviews file that is missing
      or not a regular file.
  """
  if not os.path.isdir(mard_dir):
    raise UserError(f'MARD directory {mard_dir!r} does not exist.')
  policy = files_lib.Policy.from_config(data)
  for name in (mard_io.METADATA_FILE, mard_io.REVIEWS_FILE):
    _check_required(os.path.join(mard_dir, name), mard_dir, policy)
  dirs = descriptor_dirs(mard_dir, data.extra_descriptor_dirs)
  skipped = collections.Counter()
  found = mard_io.list_descriptor_files(dirs, skipped, policy)
  return Sources(mard_dir, dirs, found, skipped, policy)


def _parse_descriptor_file(file: mard_io.DescriptorFile,
                           specs: tuple[desc_lib.DescriptorSpec, ...],
                           max_bytes: int | None = None):
  """Worker: one file -> [(file, mbid, offset, vector | reason, extractor)]."""
  docs, counts = mard_io.documents_in_file(file, max_bytes)
  out = []
  for mbid, offset, doc in docs:
    try:
      vec = desc_lib.extract(doc, specs)
    except desc_lib.DescriptorError as e:
      vec = e.reason
    out.append((mbid, offset, vec, desc_lib.extractor_version(doc)))
  return file, out, counts


@dataclasses.dataclass
class _AlbumAudio:
  tracks: dict[str, np.ndarray]  # mbid -> (dim,) float32, first found wins.


def _collect_tracks(albums: list[mard_io.Album],
                    files: list[mard_io.DescriptorFile],
                    specs, num_workers: int, counts: collections.Counter,
                    show_progress: bool, max_bytes: int | None = None):
  """Parses every descriptor file and ties its documents to albums.

  Returns:
    (audio per album position, extractor version counts).
  """
  by_amazon = {a.amazon_id: i for i, a in enumerate(albums)}
  by_mbid = collections.defaultdict(list)
  for i, album in enumerate(albums):
    for _, mbid in album.songs:
      if not by_mbid[mbid] or by_mbid[mbid][-1] != i:
        by_mbid[mbid].append(i)
  audio = [_AlbumAudio({}) for _ in albums]
  extractors = collections.Counter()
  bar = progress.bar(len(files), 'descriptor files', 'file', show_progress)
  parse = functools.partial(_parse_descriptor_file, specs=specs,
                            max_bytes=max_bytes)
  with progress.pool_map(num_workers, chunksize=64) as pmap:
    for file, docs, file_counts in pmap(parse, files):
      bar.update(1)
      counts.update(file_counts)
      # Entries of a bulk file that name no recording are track-level skips.
      counts['input/track_documents'] += sum(
          v for k, v in file_counts.items() if k.startswith('tracks/'))
      counts['input/descriptor_files'] += 1
      if not any(k.startswith('descriptor_files/') for k in file_counts):
        counts['input/descriptor_files_read'] += 1
      for mbid, _, vec, extractor in docs:
        if file.amazon_id is not None:
          owners = [by_amazon[file.amazon_id]] if (
              file.amazon_id in by_amazon) else []
          missing = 'tracks/unknown_album'
        else:
          owners = by_mbid.get(mbid, [])
          missing = 'tracks/not_in_metadata'
        if not owners:
          counts['input/track_documents'] += 1
          counts[missing] += 1
          continue
        if len(owners) > 1:
          counts['tracks_notes/shared_between_albums'] += 1
        for owner in owners:
          counts['input/track_documents'] += 1
          if isinstance(vec, str):
            counts[f'tracks/{vec}'] += 1
          elif mbid in audio[owner].tracks:
            counts['tracks/duplicate_track'] += 1
          else:
            audio[owner].tracks[mbid] = vec
            extractors[extractor or 'unknown'] += 1
  bar.close()
  return audio, extractors


def _ordered_tracks(album: mard_io.Album, audio: _AlbumAudio
                    ) -> tuple[list[str], np.ndarray]:
  """Tracks in album order (songs list), then any others by MBID; a track
  the list names twice is one track."""
  order = list(dict.fromkeys(m for _, m in album.songs if m in audio.tracks))
  seen = set(order)
  order += sorted(m for m in audio.tracks if m not in seen)
  return order, np.stack([audio.tracks[m] for m in order])


def default_data_config() -> ml_collections.ConfigDict:
  """The `config.data` fields that `find_sources` and `load` read, at their
  defaults: what a reader without a full config (the TFDS builder) starts
  from. `configs/default.py` sets the same values (a test keeps them
  equal)."""
  return ml_collections.ConfigDict({
      'descriptors': 'paper', 'extra_descriptor_dirs': '',
      'dev_fraction': 0.1, 'test_album_fraction': 0.1,
      'split_salt': 'mardjax-split-v1', 'num_workers': 2,
      'follow_outside_links': False, 'max_document_mb': 64.0})


def load(data: ml_collections.ConfigDict, mard_dir: str,
         sources: Sources | None = None, show_progress: bool = True) -> Corpus:
  """Reads albums and descriptors (stages 1-2); reviews stay on disk.

  Raises:
    UserError: missing files, or no album with usable audio.
  """
  sources = sources or find_sources(data, mard_dir)
  specs = desc_lib.parse_descriptor_list(data.descriptors)
  counts = collections.Counter(sources.skipped)
  # Files the listing did not read are input that is accounted for.
  counts['input/descriptor_files'] += sum(sources.skipped.values())
  albums, metadata_lines = mard_io.read_albums(mard_dir, counts,
                                               sources.policy)
  counts['input/metadata_lines'] = metadata_lines
  if not albums:
    raise UserError(f'No usable album in {mard_io.METADATA_FILE}: '
                    f'{describe_skips(counts, "albums")}')
  audio, extractors = _collect_tracks(albums, sources.files, specs,
                                      data.num_workers, counts, show_progress,
                                      sources.policy.max_bytes)
  kept = []
  for album, aud in zip(albums, audio):
    if aud.tracks:
      mbids, vecs = _ordered_tracks(album, aud)
      kept.append(KeptAlbum(album, mbids, vecs, splits_lib.album_split(
          album.amazon_id, data.test_album_fraction, data.split_salt)))
    else:
      counts['albums/no_descriptor'] += 1
  if not kept:
    hint = (' Links leaving their directory are followed with '
            'config.data.follow_outside_links=True.' if counts[
                f'descriptor_files/{files_lib.OUTSIDE_LINK}'] else '')
    raise UserError(
        'No album has a usable descriptor document (searched '
        f'{sources.dirs}); {describe_skips(counts, "tracks")} '
        f'{describe_skips(counts, "descriptor_files")}{hint}')
  index_of = {k.album.amazon_id: i for i, k in enumerate(kept)}
  return Corpus(sources=sources, albums=kept, index_of=index_of,
                dropped_albums={a.amazon_id for a in albums} - set(index_of),
                counts=counts, extractors=extractors,
                dev_fraction=data.dev_fraction, split_salt=data.split_salt)
