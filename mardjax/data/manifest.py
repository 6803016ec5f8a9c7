"""The preprocessing output's manifest, read once into a typed record.

`manifest.json` (written last by `mardjax.data.preprocess`) describes a
TFRecord directory: its files, counts per split, the vocabulary, the
descriptor list with its training statistics, the frozen text encoder when
the records hold its features, and the preprocessing report. Every reader of
a preprocessed directory (training, evaluation, baselines, export, the
server) goes through `load`, which checks the schema version, and then uses
the fields of `Manifest` rather than walking the JSON by string keys.

This module imports neither TensorFlow nor JAX: serving reads the manifest
without the input pipeline.
"""

import dataclasses
import hashlib
import json
import os
from typing import Any

import numpy as np

from mardjax.data import files as files_lib
from mardjax.data import text as text_lib
from mardjax.errors import UserError

FILE = 'manifest.json'
VOCAB_FILE = 'vocab.txt'
ALBUMS_FILE = 'albums.jsonl'
FEATURES_FILE = 'descriptor_names.txt'
# Bump on any change of the records' layout (`mardjax.data.records`);
# readers refuse other versions.
SCHEMA_VERSION = 2


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The word vocabulary: `size` ids including padding and unknown."""
  file: str
  size: int
  sha256: str
  pad_id: int
  unk_id: int
  max_len: int


@dataclasses.dataclass(frozen=True)
class Descriptors:
  """The audio features: which descriptors, and how they are standardised.

  Attributes:
    specs: the descriptor list (`config.data.descriptors` as parsed).
    dim: F, the flattened feature count.
    transform: the stabilising transform before standardisation.
    mean, std: (F,) float64 training-split statistics after the transform.
    extractor_versions: extractor version -> training documents.
  """
  specs: tuple[str, ...]
  dim: int
  transform: str
  mean: np.ndarray
  std: np.ndarray
  fitted_on_tracks: int
  extractor_versions: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Counts:
  albums: int
  albums_by_split: dict[str, int]
  reviews: dict[str, int]
  tracks: int


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A preprocessed directory, as `load` read it.

  Attributes:
    data_dir: the directory it was read from.
    sha256: the hash of manifest.json (checkpoints record it).
    vocab, descriptors, counts: as above.
    text_features: the frozen encoder's record ('path', 'sha256', 'dim',
      'max_tokens', ...) when the records hold its features, else None.
    files: {'reviews' | 'albums': {split: [file names]}}.
    albums_file: the album metadata file (`read_albums`).
    config: the data config fields the records depend on.
    source: where the raw data came from, and its fingerprint.
    report: the preprocessing report (counts, skips, reconciliation).
  """
  data_dir: str
  sha256: str
  schema_version: int
  vocab: Vocab
  descriptors: Descriptors
  counts: Counts
  text_features: dict[str, Any] | None
  files: dict[str, dict[str, list[str]]]
  albums_file: str
  config: dict[str, Any]
  source: dict[str, Any]
  report: dict[str, Any]

  @property
  def feature_dim(self) -> int:
    """Dimension of the records' pretrained text features (0: none)."""
    return int(self.text_features['dim']) if self.text_features else 0

  @property
  def extractor_versions(self) -> dict[str, int]:
    return dict(self.report.get('extractor_versions', {}))

  def paths(self, kind: str, split: str) -> list[str]:
    """The record files of `kind` ('reviews' or 'albums') in `split`."""
    return [os.path.join(self.data_dir, n) for n in self.files[kind][split]]


def manifest_hash(data_dir: str) -> str:
  """sha256 of a preprocessing output's manifest (checkpoints refer to it)."""
  with open(os.path.join(data_dir, FILE), 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def load(data_dir: str, records: bool = True) -> Manifest:
  """Reads a finished preprocessing output; a clear error when there is none.

  Args:
    data_dir: the output folder.
    records: whether the TFRecord files must be there; a model served or
      exported from a copy of the manifest and vocabulary alone needs none
      (the files present are checked either way).

  Raises:
    UserError: no manifest, unreadable JSON, another schema version, or a
      file missing or of another size than the manifest lists.
  """
  path = os.path.join(data_dir, FILE)
  if not os.path.isfile(path):
    raise UserError(f'No {FILE} in {data_dir!r}: run --mode=preprocess '
                    'first (or point config.data.tfrecord_dir at its output).')
  try:
    with open(path, 'rb') as f:
      blob = f.read()
    raw = json.loads(blob)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is unreadable ({e}): run --mode=preprocess '
                    'again.') from None
  if raw.get('schema_version') != SCHEMA_VERSION:
    raise UserError(f'{path} has schema version '
                    f'{raw.get("schema_version")}, this code reads '
                    f'{SCHEMA_VERSION}: run --mode=preprocess again.')
  # A folder whose files come from several writes (copied together by
  # hand, or half replaced) is refused; sizes are cheap to check each start.
  files_lib.check_digests(data_dir, raw.get('written', {}),
                          f'the preprocessed data in {data_dir}',
                          'run --mode=preprocess --force', hashes=False,
                          optional=lambda name: not records and
                          name.endswith('.tfrecord'))
  return from_dict(raw, data_dir, hashlib.sha256(blob).hexdigest())


def from_dict(raw: dict[str, Any], data_dir: str, sha256: str) -> Manifest:
  """The typed form of manifest.json's content."""
  v, d, c = raw['vocab'], raw['descriptors'], raw['counts']
  return Manifest(
      data_dir=data_dir, sha256=sha256,
      schema_version=raw['schema_version'],
      vocab=Vocab(file=v['file'], size=int(v['size']), sha256=v['sha256'],
                  pad_id=v['pad_id'], unk_id=v['unk_id'],
                  max_len=v['max_len']),
      descriptors=Descriptors(
          specs=tuple(d['list']), dim=int(d['dim']), transform=d['transform'],
          mean=np.asarray(d['mean'], np.float64),
          std=np.asarray(d['std'], np.float64),
          fitted_on_tracks=int(d['fitted_on_tracks']),
          extractor_versions=dict(d.get('extractor_versions', {}))),
      counts=Counts(albums=int(c['albums']),
                    albums_by_split=dict(c['albums_by_split']),
                    reviews=dict(c['reviews']), tracks=int(c['tracks'])),
      text_features=raw.get('text_features'), files=raw['files'],
      albums_file=raw['albums_file'], config=raw.get('config', {}),
      source=raw.get('source', {}), report=raw.get('report', {}))


def read_albums(manifest: Manifest) -> dict[int, dict[str, Any]]:
  """albums.jsonl as {album_index: record} (artist, title, genre, split...)."""
  with open(os.path.join(manifest.data_dir, manifest.albums_file)) as f:
    return {a['album_index']: a for a in map(json.loads, f)}


def read_vocabulary(manifest: Manifest) -> text_lib.Vocabulary:
  """The vocabulary the records were tokenized with."""
  return text_lib.Vocabulary.load(os.path.join(manifest.data_dir,
                                               manifest.vocab.file))


def data_dir_of(config, workdir: str) -> str:
  """Where a run's preprocessed records live: config.data.tfrecord_dir, else
  WORKDIR/data."""
  return config.data.tfrecord_dir or os.path.join(workdir, 'data')
