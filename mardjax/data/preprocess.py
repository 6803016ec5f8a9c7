"""Raw MARD directory -> validated, split, tokenized TFRecords + manifest.

The stages of `preprocess_corpus`, each a function of its own:

  0. reuse: unchanged inputs and config give the old output, and records
     of another corpus folder are refused (`_reused`);
  1. metadata: albums, their songs' MBIDs (`ingest.load`);
  2. descriptor documents from the original and expanded directories, parsed
     in worker processes, tied to albums, flattened (`descriptors.extract`);
  3. splits: albums held out by hash (test), then reviews by hash (dev/train);
  4. pass 1 over reviews: validate, de-duplicate, count training words
     (`_count_reviews`);
  5. vocabulary and feature statistics, fitted on the training split only
     (`_descriptor_moments`);
  6. into a fresh temporary directory (`files.fresh_tmp`): pass 2 over
     reviews, tokenized and written (`_write_reviews`); albums with their
     tracks (`_write_albums`); the report with its reconciliation
     (`_report`);
  7. manifest.json last, then the directory swapped in atomically
     (`files.swap_in`); a full disk is one line and leaves no output.

Memory stays bounded: reviews are streamed twice rather than held; what is
held is one float32 vector per track (~0.5 GB at MARD's 343,882 tracks), the
album table and the set of review ids.

Every input record ends up either in the output or in a skip count with its
reason (`report['skipped']`), and `report['reconcile']` checks the sums.
"""

import collections
import dataclasses
import errno
import hashlib
import json
import os
import resource
import shutil
import time
from typing import Any

import ml_collections
import numpy as np
import orjson

from mardjax.data import descriptors as desc_lib
from mardjax.data import files as files_lib
from mardjax.data import ingest
from mardjax.data import manifest as manifest_lib
from mardjax.data import mard_io
from mardjax import progress
from mardjax.data import splits as splits_lib
from mardjax.data import text as text_lib
from mardjax.data import text_features
from mardjax.errors import UserError

# Config fields that change what preprocessing writes.
_DATA_FIELDS = ('descriptors', 'transform', 'vocab_size', 'min_word_count',
                'max_len', 'dev_fraction', 'test_album_fraction', 'split_salt',
                'examples_per_shard', 'albums_per_shard', 'text_encoder_path',
                'text_encoder_max_tokens')



def _fingerprint(mard_dir: str, files: list[mard_io.DescriptorFile],
                 data: ml_collections.ConfigDict,
                 encoder_id: dict[str, Any]) -> str:
  """Hash of what the output depends on: inputs' names, sizes, mtimes, config."""
  h = hashlib.sha256()
  for name in (mard_io.METADATA_FILE, mard_io.REVIEWS_FILE):
    st = os.stat(os.path.join(mard_dir, name))
    h.update(f'{name}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  for f in files:
    st = os.stat(f.path)
    h.update(f'{f.priority}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  config = {k: data[k] for k in _DATA_FIELDS}
  config['text_encoder'] = encoder_id
  # Which files are read at all.
  config['read_policy'] = [data.get('follow_outside_links', False),
                           data.get('max_document_mb', 0)]
  h.update(json.dumps(config, sort_keys=True).encode())
  h.update(f'schema{manifest_lib.SCHEMA_VERSION}'.encode())
  return h.hexdigest()



class _ShardedWriter:
  """Writes records into `num_shards` files named `<prefix>-<i>-of-<n>`.

  TensorFlow reports a full disk as ResourceExhaustedError (no errno, no
  path); it is raised here as the OSError Python's own writes give, so one
  handler names the path.
  """

  def __init__(self, out_dir: str, prefix: str, num_shards: int):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    # Once here, not per record: the errors a refused write raises.
    self._refusals = ((tf.errors.ResourceExhaustedError, errno.ENOSPC),
                      (tf.errors.PermissionDeniedError, errno.EACCES))
    self.names = [f'{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord'
                  for i in range(num_shards)]
    self._paths = [os.path.join(out_dir, n) for n in self.names]
    self._writers = [self._call(path, tf.io.TFRecordWriter, path)
                     for path in self._paths]

  def _call(self, path: str, fn, *args):
    try:
      return fn(*args)
    except tuple(e for e, _ in self._refusals) as e:
      code = next(c for cls, c in self._refusals if isinstance(e, cls))
      raise OSError(code, os.strerror(code), path) from None

  def write(self, shard: int, record: bytes) -> None:
    self._call(self._paths[shard], self._writers[shard].write, record)

  def close(self) -> None:
    for path, w in zip(self._paths, self._writers):
      self._call(path, w.close)


def _num_shards(count: int, per_shard: int) -> int:
  return max(1, -(-count // per_shard))


def _peak_rss_mb() -> float:
  # ru_maxrss is in KiB on Linux; workers are counted separately.
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return round(max(own, children) / 1024, 1)


@dataclasses.dataclass
class _Pass1:
  """What the first pass over the reviews learns."""
  split_counts: collections.Counter
  word_counts: collections.Counter
  reviews_per_album: dict[int, collections.Counter]


def _reused(out_dir: str, mard_dir: str, fingerprint: str
            ) -> dict[str, Any] | None:
  """The old report when `out_dir` was built from these very inputs.

  Raises:
    UserError: `out_dir` holds records built from another corpus folder:
      rebuilding there would silently replace them (a changed config or
      changed files of the same corpus rebuild as usual).
  """
  existing = os.path.join(out_dir, manifest_lib.FILE)
  if not os.path.isfile(existing):
    return None
  with open(existing) as f:
    old = json.load(f)
  source = old.get('source', {})
  stored = source.get('mard_dir')
  if stored and os.path.realpath(stored) != os.path.realpath(mard_dir):
    raise UserError(
        f'{out_dir} holds records built from the corpus in {stored}, not '
        f'from {os.path.abspath(mard_dir)}: set --config.data.tfrecord_dir '
        'to another folder, or pass --force (with --mode=preprocess or '
        'train) to replace them.')
  if source.get('fingerprint') != fingerprint:
    return None
  return old['report']


def _count_reviews(corpus: ingest.Corpus, show_progress: bool) -> _Pass1:
  """Pass 1 over the reviews: split sizes, reviews per album, and the
  training split's words."""
  out = _Pass1(collections.Counter(), collections.Counter(),
               collections.defaultdict(collections.Counter))
  bar = progress.bar(None, 'reviews pass 1/2', 'review', show_progress)
  for _, words, idx, split in corpus.usable_reviews(corpus.counts):
    bar.update(1)
    out.split_counts[split] += 1
    out.reviews_per_album[idx][split] += 1
    if split == splits_lib.TRAIN:
      out.word_counts.update(words)
  bar.close()
  if not out.split_counts[splits_lib.TRAIN]:
    raise UserError('No training review is left after validation: '
                    f'{ingest.describe_skips(corpus.counts, "reviews")}')
  return out


def _descriptor_moments(corpus: ingest.Corpus, data, dim: int
                        ) -> desc_lib.RunningMoments:
  """Feature statistics after the transform, from training albums only."""
  moments = desc_lib.RunningMoments(dim)
  for k in corpus.albums:
    if k.split == splits_lib.TRAIN:
      moments.update(desc_lib.transform(k.descriptors.astype(np.float64),
                                        data.transform))
  return moments


def _write_reviews(tmp: str, corpus: ingest.Corpus, vocab, data,
                   split_counts: collections.Counter, encoder,
                   show_progress: bool) -> tuple[dict[str, list[str]], int]:
  """Pass 2 over the reviews: tokenize (and encode, with a frozen encoder)
  and write them; returns ({split: files}, reviews truncated to max_len)."""
  from mardjax.data import records  # pylint: disable=g-import-not-at-top
  writers = {split: _ShardedWriter(
      tmp, f'reviews-{split}',
      _num_shards(split_counts[split], data.examples_per_shard))
             for split in splits_lib.REVIEW_SPLITS}
  written = collections.Counter()
  truncated = 0
  pending = []  # Reviews waiting for their encoder features, in order.

  def flush():
    feats = (encoder.encode([p[-1] for p in pending]) if encoder else
             [None] * len(pending))
    for (split, shard, args, _), f in zip(pending, feats):
      writers[split].write(shard, records.review_example(
          *args, text_features=f))
      written[split] += 1
    pending.clear()

  bar = progress.bar(sum(split_counts.values()), 'reviews pass 2/2', 'review',
                     show_progress)
  for review, words, idx, split in corpus.usable_reviews(
      collections.Counter()):
    bar.update(1)
    ids, full_len = vocab.encode(words, data.max_len)
    truncated += full_len > data.max_len
    shard = int(splits_lib.hash_unit(review.review_id, 'shard') *
                len(writers[split].names))
    pending.append((split, shard, (review.review_id, idx, ids, full_len,
                                   review.rating),
                    text_features.review_text(review.summary, review.text)
                    if encoder else None))
    if len(pending) >= 256:
      flush()
  flush()
  bar.close()
  for w in writers.values():
    w.close()
  if written != split_counts:  # The input changed under us.
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f'{mard_io.REVIEWS_FILE} changed while it was read '
                    f'({dict(split_counts)} then {dict(written)}); run again.')
  return {s: w.names for s, w in writers.items()}, int(truncated)


def _write_albums(tmp: str, corpus: ingest.Corpus, data,
                  reviews_per_album: dict[int, collections.Counter]
                  ) -> tuple[dict[str, list[str]], int]:
  """Album records (tracks' descriptors) and albums.jsonl; returns
  ({split: files}, tracks written)."""
  from mardjax.data import records  # pylint: disable=g-import-not-at-top
  kept, album_split = corpus.albums, corpus.album_split
  files, tracks_written = {}, 0
  for split in (splits_lib.TRAIN, splits_lib.TEST):
    members = [i for i, s in enumerate(album_split) if s == split]
    n = _num_shards(len(members), data.albums_per_shard)
    writer = _ShardedWriter(tmp, f'albums-{split}', n)
    files[split] = writer.names
    for pos, i in enumerate(members):
      album, mbids, vecs = kept[i].album, kept[i].mbids, kept[i].descriptors
      writer.write(pos * n // max(1, len(members)),
                   records.album_example(i, album.amazon_id, mbids, vecs))
      tracks_written += len(mbids)
    writer.close()
  with open(os.path.join(tmp, manifest_lib.ALBUMS_FILE), 'wb') as f:
    for i, k in enumerate(kept):
      album = k.album
      f.write(orjson.dumps({
          'album_index': i, 'amazon_id': album.amazon_id,
          'artist': album.artist, 'title': album.title,
          'genre': album.genre, 'year': album.year, 'split': album_split[i],
          'num_tracks': len(k.mbids),
          'num_reviews': {s: reviews_per_album[i][s]
                          for s in splits_lib.REVIEW_SPLITS}}) + b'\n')
  return files, tracks_written


def _report(corpus: ingest.Corpus, out_dir: str, mard_dir: str,
            pass1: _Pass1, vocab_size: int, dim: int, truncated: int,
            tracks_written: int) -> dict[str, Any]:
  """Counts per split, skips by reason, and the check that every input
  record is either written or counted as skipped."""
  counts, kept = corpus.counts, corpus.albums
  split_counts = pass1.split_counts
  skipped = {}
  for key, value in sorted(counts.items()):
    group, _, reason = key.partition('/')
    if not key.startswith('input/'):
      skipped.setdefault(group, {})[reason] = value
  reconcile = {
      'albums': counts['input/metadata_lines'] == len(kept) + sum(
          skipped.get('albums', {}).values()),
      'reviews': counts['input/review_lines'] == sum(split_counts.values()) +
                 sum(skipped.get('reviews', {}).values()),
      'tracks': counts['input/track_documents'] == tracks_written + sum(
          skipped.get('tracks', {}).values()),
      'descriptor_files': counts['input/descriptor_files'] ==
                          counts['input/descriptor_files_read'] + sum(
                              skipped.get('descriptor_files', {}).values()),
  }
  album_counts = collections.Counter(corpus.album_split)
  report = {
      'tfrecord_dir': os.path.abspath(out_dir),
      'mard_dir': os.path.abspath(mard_dir),
      'albums': len(kept),
      'albums_by_split': {s: album_counts[s] for s in (splits_lib.TRAIN,
                                                       splits_lib.TEST)},
      'albums_without_reviews': sum(
          1 for i in range(len(kept)) if not pass1.reviews_per_album[i]),
      'reviews': {s: split_counts[s] for s in splits_lib.REVIEW_SPLITS},
      'tracks': tracks_written,
      'vocab_size': vocab_size,
      'descriptor_dim': dim,
      'reviews_truncated': truncated,
      'extractor_versions': dict(corpus.extractors),
      'input': {k.partition('/')[2]: v for k, v in sorted(counts.items())
                if k.startswith('input/')},
      'skipped': {g: r for g, r in skipped.items() if not g.endswith('_notes')},
      'notes': {g[:-len('_notes')]: r for g, r in skipped.items()
                if g.endswith('_notes')},
      'reconcile': reconcile,
  }
  if len(corpus.extractors) > 1:
    report['warnings'] = [f'descriptor documents come from several extractors '
                          f'{dict(corpus.extractors)}: their values may not be '
                          'comparable']
  return report


def _manifest(data, specs, sources: ingest.Sources, fingerprint: str, vocab,
              vocab_sha: str, encoder, moments: desc_lib.RunningMoments,
              corpus: ingest.Corpus, report: dict[str, Any],
              files: dict[str, dict[str, list[str]]]) -> dict[str, Any]:
  """manifest.json's content (`manifest_lib.Manifest` reads it)."""
  return {
      'schema_version': manifest_lib.SCHEMA_VERSION,
      'source': {'mard_dir': os.path.abspath(sources.mard_dir),
                 'descriptor_dirs': [os.path.abspath(d)
                                     for d in sources.dirs],
                 'fingerprint': fingerprint},
      'config': {k: data[k] for k in _DATA_FIELDS},
      'files': files,
      'albums_file': manifest_lib.ALBUMS_FILE,
      'vocab': {'file': manifest_lib.VOCAB_FILE, 'size': len(vocab),
                'sha256': vocab_sha,
                'pad_id': text_lib.PAD_ID, 'unk_id': text_lib.UNK_ID,
                'max_len': data.max_len},
      'text_features': encoder.info if encoder else None,
      'descriptors': {'list': [str(s) for s in specs],
                      'dim': desc_lib.dim(specs),
                      'names_file': manifest_lib.FEATURES_FILE,
                      'transform': data.transform,
                      'mean': moments.mean.tolist(),
                      'std': moments.std().tolist(),
                      'fitted_on_tracks': moments.count,
                      'extractor_versions': dict(corpus.extractors)},
      'counts': {'albums': report['albums'],
                 'albums_by_split': report['albums_by_split'],
                 'reviews': report['reviews'], 'tracks': report['tracks']},
      'report': report,
  }


def preprocess_corpus(config: ml_collections.ConfigDict, mard_dir: str,
                      out_dir: str, force: bool = False,
                      show_progress: bool = True) -> dict[str, Any]:
  """Preprocesses `mard_dir` into `out_dir` in the module docstring's stages.

  Args:
    config: the full config (uses `config.data`, validated by the caller).
    mard_dir: raw MARD directory.
    out_dir: output directory; replaced atomically when done.
    force: rebuild even when `out_dir` is up to date.
    show_progress: progress bars on stderr.

  Returns:
    The report: counts per split, skips by reason, paths, timings.

  Raises:
    UserError: missing files, nothing usable in the input, or `out_dir`
      holding records of another corpus folder (without `force`).
  """
  t0 = time.time()
  data = config.data
  files_lib.check_writable_dirs([out_dir])  # Before minutes of work.
  specs = desc_lib.parse_descriptor_list(data.descriptors)
  dim = desc_lib.dim(specs)
  sources = ingest.find_sources(data, mard_dir)
  # The encoder's weights are hashed once: they may be hundreds of MB.
  encoder_id = text_features.encoder_fingerprint(data.text_encoder_path)
  fingerprint = _fingerprint(mard_dir, sources.files, data, encoder_id)
  old = None if force else _reused(out_dir, mard_dir, fingerprint)
  if old is not None:
    return dict(old, reused=True, seconds=round(time.time() - t0, 2))
  corpus = ingest.load(data, mard_dir, sources, show_progress)  # 1-3.
  pass1 = _count_reviews(corpus, show_progress)  # 4.
  vocab = text_lib.Vocabulary.from_counts(pass1.word_counts, data.vocab_size,
                                          data.min_word_count)  # 5.
  moments = _descriptor_moments(corpus, data, dim)
  # 6. A full disk: one line naming the path, and no half output.
  with files_lib.whole_folder(out_dir) as tmp:
    vocab_sha = vocab.save(os.path.join(tmp, manifest_lib.VOCAB_FILE))
    with open(os.path.join(tmp, manifest_lib.FEATURES_FILE), 'w') as f:
      f.write('\n'.join(desc_lib.feature_names(specs)) + '\n')
    encoder = (text_features.FrozenEncoder(data.text_encoder_path,
                                           data.text_encoder_max_tokens,
                                           sha256=encoder_id['sha256'])
               if data.text_encoder_path else None)
    review_files, truncated = _write_reviews(
        tmp, corpus, vocab, data, pass1.split_counts, encoder, show_progress)
    album_files, tracks_written = _write_albums(tmp, corpus, data,
                                                pass1.reviews_per_album)
    report = _report(corpus, out_dir, mard_dir, pass1, len(vocab), dim,
                     truncated, tracks_written)
    manifest = _manifest(data, specs, sources, fingerprint, vocab, vocab_sha,
                         encoder, moments, corpus, report,
                         {'reviews': review_files, 'albums': album_files})
    # Each file's size and hash: a reader refuses files of other writes.
    manifest['written'] = files_lib.digests(tmp, os.listdir(tmp))
    with open(os.path.join(tmp, manifest_lib.FILE), 'w') as f:  # 7: last.
      json.dump(manifest, f, indent=1, sort_keys=True)
  return dict(report, reused=False, manifest=os.path.join(
      os.path.abspath(out_dir), manifest_lib.FILE),
              seconds=round(time.time() - t0, 2),
              peak_rss_mb=_peak_rss_mb())
