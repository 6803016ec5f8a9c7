"""Readers for the raw MARD release's layout. Streaming; never `eval`.

* `mard_metadata.json`: one album per line.
* `mard_reviews.json`: one review per line.
* AcousticBrainz documents: `acousticbrainz_descriptors/<amazonid>_<mbid>.json`
  (first track, original MARD) and, in extra directories, the expanded set:
  `<amazonid>_<mbid>.json`, dump files named by MBID (`<mbid>.json`,
  `<mbid>-<n>.json`, possibly nested) or bulk API responses
  `{mbid: {"0": doc, ...}}`.

Lines are JSON; some MARD-derived files hold Python dict literals, which are
parsed with `ast.literal_eval` and counted. Every record that cannot be used is
counted under a reason in a `collections.Counter`, so callers can reconcile
input against output. Files are opened through `mardjax.data.files`: only
regular files, links kept inside their folder unless a `files.Policy` says
otherwise, documents and lines no larger than its cap.
"""

import ast
import collections
import dataclasses
import gzip
import hashlib
import json
import os
import re
from typing import Any, Iterator

import orjson

from mardjax.data import files
from mardjax.errors import UserError

METADATA_FILE = 'mard_metadata.json'
REVIEWS_FILE = 'mard_reviews.json'
ORIGINAL_DESCRIPTOR_DIR = 'acousticbrainz_descriptors'
EXPANDED_DESCRIPTOR_DIR = 'acousticbrainz_expanded'

_UUID = r'[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}'
_UUID_RE = re.compile(rf'^{_UUID}$')
_ALBUM_TRACK_RE = re.compile(rf'^(?P<amazon>[^_/]+)_(?P<mbid>{_UUID})\.json$')
_DUMP_RE = re.compile(rf'^(?P<mbid>{_UUID})(?:-(?P<offset>\d+))?\.json$')


def is_mbid(text: Any) -> bool:
  return isinstance(text, str) and bool(_UUID_RE.match(text))


def parse_record(raw: bytes, counts: collections.Counter,
                 prefix: str) -> dict[str, Any] | None:
  """Parses one line: JSON first, then a Python literal.

  Args:
    raw: the line's bytes, newline included or not.
    counts: skip and note counts; keys are `f'{prefix}/{reason}'`.
    prefix: `reviews` or `albums`.

  Returns:
    The record as a dict, or None when the line was skipped (and counted).
  """
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    counts[f'{prefix}/non_utf8'] += 1
    return None
  try:
    record = orjson.loads(text)
  except orjson.JSONDecodeError:
    try:
      record = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      counts[f'{prefix}/unparsable'] += 1
      return None
    if not _valid_unicode(record):
      counts[f'{prefix}/invalid_unicode'] += 1
      return None
    counts[f'{prefix}_notes/parsed_python_literal'] += 1
  if not isinstance(record, dict):
    counts[f'{prefix}/not_an_object'] += 1
    return None
  return record


# Magic numbers of compressed files someone may hand us for a .json.
_COMPRESSED = {b'BZh': 'bzip2', b'\xfd7zXZ': 'xz', b'\x28\xb5\x2f\xfd': 'zstd',
               b'PK\x03\x04': 'zip'}


def open_text_file(path: str, policy: files.Policy = files.Policy()):
  """A binary file object over `path`'s lines: gzip-compressed files (as
  MARD files are often shipped) are read through gzip.

  Raises:
    UserError: not a regular file (a FIFO, a device, a link loop or one
      leaving the MARD folder), or another compression, which must be
      undone first.
  """
  f = files.open_regular(path, os.path.dirname(os.path.abspath(path)),
                         policy.follow_outside_links, 'MARD file')
  try:
    head = f.read(6)
    f.seek(0)
  except BaseException:
    f.close()
    raise
  if head.startswith(b'\x1f\x8b'):
    return gzip.GzipFile(fileobj=f, mode='rb')
  for magic, name in _COMPRESSED.items():
    if head.startswith(magic):
      f.close()
      raise UserError(f'{path} is {name}-compressed: decompress it first '
                      '(gzip-compressed files are read as they are).')
  return f


# Stands for a line longer than the policy's cap: skipped and counted.
TOO_LONG = None


def iter_lines(path: str, policy: files.Policy = files.Policy()
               ) -> Iterator[bytes | None]:
  """Yields the non-blank lines of a file as bytes (decoding is per line);
  `TOO_LONG` for a line over `policy.max_bytes`, which is never held whole."""
  limit = policy.max_bytes
  with open_text_file(path, policy) as f:
    raw = getattr(f, 'fileobj', None)
    while True:
      line = f.readline() if limit is None else f.readline(limit + 1)
      if not line:
        break
      if limit is not None and len(line) > limit:
        while not line.endswith(b'\n'):  # Skip to the end of the line.
          line = f.readline(files.CHUNK)
          if not line:
            break
        yield TOO_LONG
        continue
      if line.strip():
        yield line
    if raw is not None:
      raw.close()  # GzipFile leaves a file object it was given open.


@dataclasses.dataclass
class Album:
  """The metadata fields mardjax uses of one album."""
  amazon_id: str
  artist: str
  title: str
  genre: str
  categories: list[str]
  year: str
  release_group_mbid: str
  songs: list[tuple[str, str]]  # (title, mbid), in album order.


def _text(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, list):  # Some MARD fields are lists of one string.
    return ', '.join(_text(v) for v in value)
  return str(value)


def _categories(value: Any) -> list[str]:
  # MARD's `categories` is a list of category paths (lists of strings).
  out = []
  for item in value if isinstance(value, list) else []:
    out.append(' > '.join(map(str, item)) if isinstance(item, list)
               else str(item))
  return out


def album_from_record(record: dict[str, Any], counts: collections.Counter
                      ) -> Album | None:
  """Validates one metadata record; None (counted) when it cannot be used."""
  amazon_id = record.get('amazon-id', record.get('product-id'))
  if not isinstance(amazon_id, str) or not amazon_id.strip():
    counts['albums/missing_amazon_id'] += 1
    return None
  songs = []
  for song in record.get('songs') or []:
    if isinstance(song, dict) and is_mbid(song.get('mbid')):
      songs.append((_text(song.get('title')), song['mbid'].lower()))
    else:
      counts['albums_notes/song_without_mbid'] += 1
  return Album(
      amazon_id=amazon_id.strip(),
      artist=_text(record.get('artist')),
      title=_text(record.get('title')),
      genre=_text(record.get('root-genre')),
      categories=_categories(record.get('categories')),
      year=_text(record.get('first-release-year')),
      release_group_mbid=_text(record.get('release-group-mbid')),
      songs=songs)


def read_albums(mard_dir: str, counts: collections.Counter,
                policy: files.Policy = files.Policy()
                ) -> tuple[list[Album], int]:
  """Reads `mard_metadata.json`; duplicates of an amazon-id are counted.

  Returns:
    (albums in file order, number of non-blank input lines).
  """
  path = os.path.join(mard_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise UserError(f'No {METADATA_FILE} in {mard_dir!r}: is this a MARD '
                    'directory? (README: "Real MARD data")')
  albums, seen, lines = [], set(), 0
  for raw in iter_lines(path, policy):
    lines += 1
    if raw is TOO_LONG:
      counts[f'albums/{files.TOO_LARGE}'] += 1
      continue
    record = parse_record(raw, counts, 'albums')
    album = None if record is None else album_from_record(record, counts)
    if album is None:
      continue
    if album.amazon_id in seen:
      counts['albums/duplicate_album'] += 1
      continue
    seen.add(album.amazon_id)
    albums.append(album)
  return albums, lines


@dataclasses.dataclass
class Review:
  """The fields mardjax uses of one review."""
  review_id: str
  amazon_id: str
  reviewer_id: str
  text: str
  summary: str
  rating: float


def review_from_record(record: dict[str, Any], counts: collections.Counter
                       ) -> Review | None:
  """Validates one review record; None (counted) when it cannot be used.

  The review id is `<amazon-id>/<reviewerID>` (one review per reviewer and
  album on Amazon), or the album and a hash of the text when the reviewer is
  unknown.
  """
  amazon_id = record.get('amazon-id', record.get('product-id'))
  if not isinstance(amazon_id, str) or not amazon_id.strip():
    counts['reviews/missing_amazon_id'] += 1
    return None
  text = record.get('reviewText')
  if text is None:
    counts['reviews/missing_review_text'] += 1
    return None
  if not isinstance(text, str):
    counts['reviews/review_text_not_a_string'] += 1
    return None
  if not text.strip():
    counts['reviews/empty_review'] += 1
    return None
  amazon_id = amazon_id.strip()
  reviewer = record.get('reviewerID')
  if isinstance(reviewer, str) and reviewer.strip():
    review_id = f'{amazon_id}/{reviewer.strip()}'
  else:
    digest = hashlib.blake2b(text.encode('utf-8'), digest_size=8).hexdigest()
    review_id = f'{amazon_id}/text-{digest}'
    reviewer = ''
  try:
    rating = float(record.get('overall', 0.0) or 0.0)
  except (TypeError, ValueError):
    rating = 0.0
  return Review(review_id=review_id, amazon_id=amazon_id,
                reviewer_id=str(reviewer), text=text,
                summary=_text(record.get('summary')), rating=rating)


def iter_reviews(mard_dir: str, counts: collections.Counter,
                 policy: files.Policy = files.Policy()
                 ) -> Iterator[Review | None]:
  """Streams `mard_reviews.json`: one item per non-blank line.

  Yields None for a line that was skipped (and counted), so callers can count
  input lines without a second pass. Duplicate ids are the caller's business.
  """
  path = os.path.join(mard_dir, REVIEWS_FILE)
  if not os.path.isfile(path):
    raise UserError(f'No {REVIEWS_FILE} in {mard_dir!r}.')
  for raw in iter_lines(path, policy):
    if raw is TOO_LONG:
      counts[f'reviews/{files.TOO_LARGE}'] += 1
      yield None
      continue
    record = parse_record(raw, counts, 'reviews')
    yield None if record is None else review_from_record(record, counts)


# --- AcousticBrainz documents ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class DescriptorFile:
  """A file that may hold AcousticBrainz documents.

  Attributes:
    path: file path.
    priority: (directory rank, relative path): earlier wins among duplicates.
    amazon_id: from `<amazonid>_<mbid>.json` names, else None.
    mbid: from the file name, else None (bulk responses name theirs inside).
    offset: submission number from `<mbid>-<n>.json`, else 0.
  """
  path: str
  priority: tuple[int, str]
  amazon_id: str | None
  mbid: str | None
  offset: int


def list_descriptor_files(dirs: list[str],
                          counts: collections.Counter | None = None,
                          policy: files.Policy = files.Policy()
                          ) -> list[DescriptorFile]:
  """Finds `*.json` files under the given directories (recursively).

  Directories that do not exist are skipped by the caller's choice; files are
  returned sorted so every later decision (which duplicate wins) is stable.
  What is not a regular file of at most `policy.max_bytes` (FIFOs, devices,
  link loops, dangling links, links leaving their directory, over-size
  files) is counted in `counts` as `descriptor_files/<reason>`, never opened.
  """
  counts = collections.Counter() if counts is None else counts
  skips = collections.Counter()
  found = []
  for rank, top in enumerate(dirs):
    for path, _ in files.walk(top, ('.json',), skips,
                              policy.follow_outside_links, policy.max_bytes):
      name = os.path.basename(path)
      rel = os.path.relpath(path, top)
      m = _ALBUM_TRACK_RE.match(name)
      if m:
        found.append(DescriptorFile(path, (rank, rel), m['amazon'],
                                    m['mbid'].lower(), 0))
        continue
      m = _DUMP_RE.match(name)
      if m:
        found.append(DescriptorFile(path, (rank, rel), None,
                                    m['mbid'].lower(),
                                    int(m['offset'] or 0)))
        continue
      found.append(DescriptorFile(path, (rank, rel), None, None, 0))
  for reason, n in skips.items():
    counts[f'descriptor_files/{reason}'] += n
  return found


def documents_in_file(file: DescriptorFile,
                      max_bytes: int | None = None) -> tuple[
    list[tuple[str, int, Any]], collections.Counter]:
  """Parses a descriptor file into (mbid, offset, document) triples.

  A file named by MBID holds one document; any other file must be a bulk API
  response `{mbid: {"<offset>": doc}}`. The file is read only when it is
  (still) a regular file, and at most `max_bytes` of it.

  Returns:
    (documents, counts of what was skipped inside the file).
  """
  counts = collections.Counter()
  try:
    # Listing checked the path; it may have been swapped since.
    raw = files.read_bytes(file.path, max_bytes)
  except files.Skip as e:
    counts[f'descriptor_files/{e.reason}'] += 1
    return [], counts
  try:
    data = loads_document(raw)
  except ValueError:
    counts['descriptor_files/not_json'] += 1
    return [], counts
  if file.mbid is not None:
    return [(file.mbid, file.offset, data)], counts
  if not isinstance(data, dict) or 'lowlevel' in data:
    # A single document with no MBID in its name cannot be tied to a track.
    counts['descriptor_files/not_named_by_mbid'] += 1
    return [], counts
  docs, counts = bulk_documents(data, counts)
  if not docs and not counts:
    counts['descriptor_files/empty_bulk_response'] += 1
  return docs, counts


def loads_document(raw: bytes) -> Any:
  """A JSON document from bytes, refusing what would crash a parser.

  orjson first (fast, and it refuses nesting deeper than 1,024 levels);
  Python's json for the NaN and Infinity that Python writes and orjson
  rejects, so such values reach the checks that report them as non-finite.

  Raises:
    ValueError: not JSON, not UTF-8, or nested too deeply to parse.
  """
  try:
    return orjson.loads(raw)
  except orjson.JSONDecodeError as first:
    try:
      return json.loads(raw)
    except RecursionError:
      raise ValueError('nested too deeply to parse') from None
    except (ValueError, UnicodeDecodeError):
      raise ValueError(str(first)) from None


def _valid_unicode(value: Any) -> bool:
  """Whether every string in `value` can be written as UTF-8: a Python
  literal's `\\ud800` escapes decode to lone surrogates that no writer
  takes (orjson refuses them while parsing JSON)."""
  try:
    orjson.dumps(value)
  except TypeError as e:  # Also sets, bytes: those are not our concern.
    return 'not valid UTF-8' not in str(e)
  return True


def bulk_documents(data: dict[str, Any],
                   counts: collections.Counter | None = None
                   ) -> tuple[list[tuple[str, int, Any]], collections.Counter]:
  """A bulk API response `{mbid: {"<offset>": doc}}` -> ((mbid, offset,
  document) triples, counts of entries skipped)."""
  counts = collections.Counter() if counts is None else counts
  docs = []
  for key, subs in data.items():
    if key == 'mbid_mapping':  # Bulk API bookkeeping, not a recording.
      continue
    if not is_mbid(key) or not isinstance(subs, dict):
      counts['tracks/bulk_entry_not_mbid'] += 1
      continue
    for offset, doc in subs.items():
      try:
        off = int(offset)
      except ValueError:
        counts['tracks/bad_bulk_offset'] += 1
        continue
      docs.append((key.lower(), off, doc))
  return docs, counts
