"""Raw MARD -> TFRecords: round trip, splits, leakage, determinism, bad input."""

import collections
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from mardjax.data import manifest as manifest_lib
from mardjax.data import descriptors as d
from mardjax.data import ingest
from mardjax.data import mard_io
from mardjax.data import preprocess
from mardjax.data import records
from mardjax.data import splits
from mardjax.data import text
from mardjax.errors import UserError
from tests.conftest import REAL_DOCS


def _run(config, mard_dir, out_dir, **kw):
  return preprocess.preprocess_corpus(config, str(mard_dir), str(out_dir),
                                      show_progress=False, **kw)


def _lines(path):
  with open(path, 'rb') as f:
    return [json.loads(line) for line in f if line.strip()]


def _records(out_dir, manifest, kind, split):
  del out_dir  # The manifest knows its directory.
  paths = manifest.paths(kind, split)
  dim = manifest.descriptors.dim
  return list(records.read_numpy(paths, 'review' if kind == 'reviews' else
                                 'album', dim))


@pytest.fixture(scope='module')
def processed(tmp_path_factory, tiny_corpus_master):
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  out = str(tmp_path_factory.mktemp('processed') / 'data')
  report = _run(config, tiny_corpus_master, out)
  return config, out, report, manifest_lib.load(out)


def test_report_counts_reconcile(processed, tiny_corpus_master):
  _, _, report, manifest = processed
  assert all(report['reconcile'].values()), report['reconcile']
  reviews = _lines(os.path.join(tiny_corpus_master, mard_io.REVIEWS_FILE))
  assert sum(report['reviews'].values()) == len(reviews)
  assert report['tracks'] == 180 and report['albums'] == 40
  # The original first-track files repeat tracks of the expanded set.
  assert report['skipped'] == {
      'tracks': {'duplicate_track': report['input']['track_documents'] - 180}}
  assert manifest.counts.reviews == report['reviews']
  assert manifest.descriptors.dim == 369
  assert manifest.schema_version == records.SCHEMA_VERSION


def test_review_records_round_trip(processed, tiny_corpus_master):
  config, out, _, manifest = processed
  vocab = text.Vocabulary.load(os.path.join(out, manifest.vocab.file))
  albums = _lines(os.path.join(out, manifest_lib.ALBUMS_FILE))
  raw = {f'{r["amazon-id"]}/{r["reviewerID"]}': r for r in _lines(
      os.path.join(tiny_corpus_master, mard_io.REVIEWS_FILE))}
  seen = 0
  for split in splits.REVIEW_SPLITS:
    for ex in _records(out, manifest, 'reviews', split):
      review = raw[ex['review_id'].decode()]
      words = text.tokenize(review['reviewText'])
      assert ex['full_length'] == len(words)
      assert ex['length'] == min(len(words), config.data.max_len)
      expected, _ = vocab.encode(words, config.data.max_len)
      np.testing.assert_array_equal(ex['tokens'], expected)
      assert albums[ex['album_index']]['amazon_id'] == review['amazon-id']
      assert ex['rating'] == review['overall']
      seen += 1
  assert seen == len(raw)


def test_album_records_hold_each_tracks_descriptors(processed,
                                                    tiny_corpus_master):
  _, out, _, manifest = processed
  specs = d.parse_descriptor_list('paper')
  by_mbid = {}
  for f in mard_io.list_descriptor_files(
      [os.path.join(tiny_corpus_master, mard_io.EXPANDED_DESCRIPTOR_DIR)]):
    for mbid, _, doc in mard_io.documents_in_file(f)[0]:
      by_mbid[mbid] = d.extract(doc, specs)
  meta = {a['amazon-id']: a for a in _lines(
      os.path.join(tiny_corpus_master, mard_io.METADATA_FILE))}
  count = 0
  for split in ('train', 'test'):
    for ex in _records(out, manifest, 'albums', split):
      mbids = [m.decode() for m in ex['track_mbids']]
      # Album order of the metadata's song list.
      assert mbids == [s['mbid'] for s in meta[ex['amazon_id'].decode()][
          'songs']]
      assert ex['descriptors'].shape == (len(mbids), 369)
      for mbid, row in zip(mbids, ex['descriptors']):
        np.testing.assert_array_equal(row, by_mbid[mbid])
      count += 1
  assert count == 40


def test_no_leakage_across_splits(processed):
  _, out, _, manifest = processed
  table = _lines(os.path.join(out, manifest_lib.ALBUMS_FILE))
  test_albums = {a['album_index'] for a in table if a['split'] == 'test'}
  assert test_albums and len(test_albums) < len(table)
  for split in ('train', 'dev'):
    for ex in _records(out, manifest, 'reviews', split):
      assert ex['album_index'] not in test_albums
  for ex in _records(out, manifest, 'reviews', 'test'):
    assert ex['album_index'] in test_albums
  assert {int(ex['album_index']) for ex in _records(
      out, manifest, 'albums', 'test')} == test_albums
  ids = collections.Counter(
      ex['review_id'] for s in splits.REVIEW_SPLITS
      for ex in _records(out, manifest, 'reviews', s))
  assert max(ids.values()) == 1


def test_vocab_and_statistics_come_from_training_data_only(processed,
                                                          tiny_corpus_master):
  config, out, _, manifest = processed
  raw = {f'{r["amazon-id"]}/{r["reviewerID"]}': r for r in _lines(
      os.path.join(tiny_corpus_master, mard_io.REVIEWS_FILE))}
  train_words = collections.Counter()
  for ex in _records(out, manifest, 'reviews', 'train'):
    train_words.update(text.tokenize(raw[ex['review_id'].decode()][
        'reviewText']))
  expected = text.Vocabulary.from_counts(train_words, config.data.vocab_size)
  got = text.Vocabulary.load(os.path.join(out, manifest_lib.VOCAB_FILE))
  assert got.words == expected.words
  with open(os.path.join(out, manifest_lib.VOCAB_FILE), 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == manifest.vocab.sha256
  train_vecs = np.concatenate([ex['descriptors'] for ex in _records(
      out, manifest, 'albums', 'train')])
  t = d.transform(train_vecs.astype(np.float64), 'signed_log')
  np.testing.assert_allclose(manifest.descriptors.mean, t.mean(0),
                             rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(manifest.descriptors.std, t.std(0),
                             rtol=1e-6)
  assert manifest.descriptors.fitted_on_tracks == len(train_vecs)


def test_reruns_are_identical_and_reused(processed, tiny_corpus_master,
                                         tmp_path):
  config, out, _, _ = processed
  out2 = tmp_path / 'again'
  _run(config, tiny_corpus_master, out2)
  for name in sorted(os.listdir(out)):
    with open(os.path.join(out, name), 'rb') as a, open(out2 / name, 'rb') as b:
      if name == manifest_lib.FILE:
        ma, mb = json.load(a), json.load(b)
        for m in (ma, mb):
          m['report'].pop('tfrecord_dir')
        assert ma == mb
      else:
        assert a.read() == b.read(), name
  again = _run(config, tiny_corpus_master, out2)
  assert again['reused']
  forced = _run(config, tiny_corpus_master, out2, force=True)
  assert not forced['reused']


def test_changing_the_config_rebuilds(processed, tiny_corpus_master, tmp_path):
  config, _, _, _ = processed
  out = tmp_path / 'data'
  _run(config, tiny_corpus_master, out)
  config = config.copy_and_resolve_references()
  config.data.max_len = 8
  report = _run(config, tiny_corpus_master, out)
  assert not report['reused']
  m = manifest_lib.load(str(out))
  assert m.vocab.max_len == 8
  assert all(ex['length'] <= 8 for ex in _records(str(out), m, 'reviews',
                                                  'train'))


def test_records_of_another_corpus_are_not_replaced_unasked(
    processed, tiny_corpus_master, tmp_path):
  config, _, _, _ = processed
  out = tmp_path / 'data'
  _run(config, tiny_corpus_master, out)
  with open(out / manifest_lib.FILE, 'rb') as f:
    before = f.read()
  other = tmp_path / 'other_corpus'
  shutil.copytree(tiny_corpus_master, other)
  with pytest.raises(UserError, match='built from the corpus in') as e:
    _run(config, other, out)
  assert str(other) in str(e.value) and '--force' in str(e.value)
  with open(out / manifest_lib.FILE, 'rb') as f:
    assert f.read() == before  # Refused before any work: records intact.
  report = _run(config, other, out, force=True)
  assert not report['reused']
  assert manifest_lib.load(str(out)).source['mard_dir'] == str(other)


def test_interrupted_run_leaves_the_previous_output_intact(
    processed, tiny_corpus_master, tmp_path, monkeypatch):
  config, _, _, _ = processed
  out = tmp_path / 'data'
  _run(config, tiny_corpus_master, out)
  before = sorted(os.listdir(out))
  calls = []

  def crash(*args, **kwargs):
    calls.append(1)
    if len(calls) > 5:
      raise KeyboardInterrupt('killed mid-write')
    return original(*args, **kwargs)

  original = records.album_example
  monkeypatch.setattr(records, 'album_example', crash)
  with pytest.raises(KeyboardInterrupt):
    _run(config, tiny_corpus_master, out, force=True)
  monkeypatch.setattr(records, 'album_example', original)
  assert sorted(os.listdir(out)) == before
  assert manifest_lib.load(str(out))
  leftovers = [n for n in os.listdir(tmp_path) if n.startswith('.data.tmp-')]
  assert leftovers  # The half-written set is hidden, never read ...
  _run(config, tiny_corpus_master, out, force=True)
  assert not [n for n in os.listdir(tmp_path) if n.startswith('.data.')]


# --- Bad input --------------------------------------------------------------


def _append(path, *lines: bytes):
  with open(path, 'ab') as f:
    for line in lines:
      f.write(line.rstrip(b'\n') + b'\n')


def _json(obj) -> bytes:
  return json.dumps(obj).encode()


def test_every_kind_of_bad_input_is_counted(config, tiny_corpus, tmp_path,
                                            real_ab_dir):
  base = _run(config, tiny_corpus, tmp_path / 'base')
  meta_path = os.path.join(tiny_corpus, mard_io.METADATA_FILE)
  rev_path = os.path.join(tiny_corpus, mard_io.REVIEWS_FILE)
  albums = _lines(meta_path)
  reviews = _lines(rev_path)
  a0 = albums[0]['amazon-id']
  good = {'amazon-id': a0, 'reviewerID': 'X', 'reviewText': 'fine', 'overall': 4}
  _append(rev_path,
          b'{"amazon-id": "B1", "reviewText": ',  # Truncated JSON.
          b'this is not json at all',
          repr(dict(good, reviewerID='PYLIT')).encode(),  # A Python literal.
          _json({'reviewerID': 'R1', 'reviewText': 'no album id'}),
          _json({'amazon-id': a0, 'reviewerID': 'R2'}),  # No text.
          _json({'amazon-id': a0, 'reviewerID': 'R3', 'reviewText': '   \n'}),
          _json({'amazon-id': a0, 'reviewerID': 'R4', 'reviewText': 7}),
          _json({'amazon-id': a0, 'reviewerID': 'R6', 'reviewText': '!!! :-)'}),
          b'{"amazon-id": "' + a0.encode() + b'", "reviewerID": "R5", '
          b'"reviewText": "caf\xe9 latin-1"}',  # Not UTF-8.
          b'{"amazon-id": "' + a0.encode() + b'", "reviewerID": "R7", '
          b'"reviewText": "a lone \\ud800 surrogate"}',  # No UTF-8 for it.
          _json(dict(good, **{'amazon-id': 'BNOTINMETA'})),
          _json(reviews[0]),  # A duplicate review id.
          _json(['a', 'list']),
          _json(dict(good, reviewerID='NOAUDIO', **{'amazon-id': 'BNOAUDIO'})),
          _json(dict(good, reviewerID='NOAUDIO2', **{'amazon-id': 'BNOAUDIO'})),
          _json(dict(good, reviewerID=None, **{'product-id': a0})))
  _append(meta_path,
          _json({'amazon-id': 'BNOAUDIO', 'title': 'Silent', 'songs': [
              {'title': 't', 'mbid': '00000000-0000-4000-a000-000000000001'}]}),
          _json({'title': 'no id'}),
          _json(albums[1]),  # Duplicate album.
          b'{broken')
  exp = os.path.join(tiny_corpus, mard_io.EXPANDED_DESCRIPTOR_DIR)
  bad_dir = os.path.join(exp, 'bad')
  os.makedirs(bad_dir)
  with open(os.path.join(real_ab_dir, REAL_DOCS[0])) as f:
    real = json.load(f)
  # Tie real documents to real album songs, then break them.
  songs = [s['mbid'] for a in albums for s in a['songs']]

  def put(name, doc=None, raw=None):
    with open(os.path.join(bad_dir, name), 'wb') as f:
      f.write(raw if raw is not None else json.dumps(doc).encode())

  def broken(fn):
    doc = json.loads(json.dumps(real))
    fn(doc['lowlevel'])
    return doc

  put(f'{songs[0]}-7.json', raw=b'{"lowlevel": ')  # Not JSON.
  put(f'{songs[1]}-7.json', broken(lambda ll: ll.pop('zerocrossingrate')))
  put(f'{songs[2]}-7.json', broken(lambda ll: ll['mfcc']['cov'].pop()))
  nan_doc = json.dumps(broken(lambda ll: ll['mfcc']['mean'].__setitem__(
      0, float('nan'))))
  assert 'NaN' in nan_doc
  put(f'{songs[3]}-7.json', raw=nan_doc.encode())
  put('00000000-0000-4000-a000-00000000beef.json', real)  # No such song.
  put(f'BNOTINMETA_{songs[4]}.json', real)
  put('stray_document.json', real)  # A document not named by MBID.
  put('bulk-extra.json', {songs[5]: {'0': real}, 'not-an-mbid': {'0': real},
                          'mbid_mapping': {}})
  # A bulk file whose first recording no album lists: the next is read.
  put('bulk-unknown-first.json', {
      '00000000-0000-4000-a000-00000000cafe': {'0': real},
      songs[6]: {'0': real}})
  report = _run(config, tiny_corpus, tmp_path / 'bad')
  assert all(report['reconcile'].values()), report['reconcile']
  skipped = report['skipped']
  base_dups = base['skipped']['tracks']['duplicate_track']
  assert skipped['reviews'] == {
      'unparsable': 2, 'missing_amazon_id': 1, 'missing_review_text': 1,
      'empty_review': 1, 'review_text_not_a_string': 1, 'non_utf8': 1,
      'invalid_unicode': 1, 'unknown_album': 1, 'duplicate_review_id': 1, 'not_an_object': 1,
      'album_without_audio': 2, 'no_words': 1}
  assert report['notes']['reviews'] == {'parsed_python_literal': 1}
  assert skipped['albums'] == {'missing_amazon_id': 1, 'duplicate_album': 1,
                               'unparsable': 1, 'no_descriptor': 1}
  assert skipped['descriptor_files'] == {'not_json': 1, 'not_named_by_mbid': 1}
  assert skipped['tracks'] == {
      # songs[5] and songs[6] via the bulk files.
      'duplicate_track': base_dups + 2,
      'missing_path': 1, 'wrong_shape': 1, 'non_finite': 1,
      'not_in_metadata': 2, 'unknown_album': 1, 'bulk_entry_not_mbid': 1}
  # The python literal and the review named by product-id are kept.
  assert sum(report['reviews'].values()) == sum(base['reviews'].values()) + 2
  assert report['albums'] == base['albums']


@pytest.mark.parametrize('damage,message', [
    (lambda m: os.remove(os.path.join(m, mard_io.REVIEWS_FILE)),
     'No mard_reviews.json'),
    (lambda m: os.remove(os.path.join(m, mard_io.METADATA_FILE)),
     'No mard_metadata.json'),
    (lambda m: open(os.path.join(m, mard_io.METADATA_FILE), 'wb').write(
        b'garbage\n'), 'No usable album'),
    (lambda m: [shutil.rmtree(os.path.join(m, x)) for x in (
        mard_io.ORIGINAL_DESCRIPTOR_DIR, mard_io.EXPANDED_DESCRIPTOR_DIR)],
     'No album has a usable descriptor'),
    (lambda m: open(os.path.join(m, mard_io.REVIEWS_FILE), 'wb').write(
        b'{"amazon-id": "x", "reviewText": "a"}\n'), 'No training review'),
])
def test_nothing_usable_is_a_clear_error(config, tiny_corpus, tmp_path, damage,
                                         message):
  damage(tiny_corpus)
  with pytest.raises(UserError, match=message):
    _run(config, tiny_corpus, tmp_path / 'out')


@pytest.mark.parametrize('field,value', [
    ('vocab_size', 0), ('max_len', 0), ('dev_fraction', 1.0),
    ('test_album_fraction', -0.1), ('transform', 'log'),
    ('descriptors', 'a..b'), ('num_workers', 0)])
def test_bad_data_config_fails_before_reading(config, tmp_path, field, value):
  from mardjax import modes  # pylint: disable=g-import-not-at-top
  config.data[field] = value
  config.data.mard_dir = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match=field):
    modes.run_mode('preprocess', config, str(tmp_path / 'w'),
                   show_progress=False)


def test_extra_descriptor_dirs_and_missing_dir(config, tiny_corpus, tmp_path):
  extra = tmp_path / 'extra'
  shutil.move(os.path.join(tiny_corpus, mard_io.EXPANDED_DESCRIPTOR_DIR),
              extra)
  no_extra = _run(config, tiny_corpus, tmp_path / 'a')
  config.data.extra_descriptor_dirs = str(extra)
  with_extra = _run(config, tiny_corpus, tmp_path / 'b')
  assert no_extra['tracks'] < with_extra['tracks'] == 180
  config.data.extra_descriptor_dirs = 'does/not/exist'
  with pytest.raises(UserError, match='extra_descriptor_dirs'):
    ingest.find_sources(config.data, tiny_corpus)


def test_missing_manifest_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match='run --mode=preprocess'):
    manifest_lib.load(str(tmp_path))


def test_skip_descriptions_name_one_group():
  counts = collections.Counter({'reviews/no_words': 2, 'reviews/duplicate': 1,
                                'albums/no_audio': 4})
  assert ingest.describe_skips(counts, 'reviews') == (
      "reviews skipped: {'no_words': 2, 'duplicate': 1}.")
  assert ingest.describe_skips(counts, 'tracks') == 'tracks skipped: none.'


def test_data_layer_defaults_are_the_default_config():
  # The data layer reads no configs/ file; its defaults must not drift.
  from configs import default  # pylint: disable=g-import-not-at-top
  data = default.get_config().data
  defaults = ingest.default_data_config()
  assert {k: data[k] for k in defaults} == defaults.to_dict()


def test_a_raw_file_that_is_not_regular_is_one_line(config, tiny_corpus,
                                                    tmp_path):
  """A FIFO metadata file is refused without opening it; a link out of the
  MARD folder is refused with the field that allows it."""
  meta = os.path.join(tiny_corpus, mard_io.METADATA_FILE)
  outside = tmp_path / 'elsewhere.json'
  shutil.move(meta, outside)
  os.symlink(outside, meta)
  with pytest.raises(UserError, match='follow_outside_links=True reads it'):
    ingest.find_sources(config.data, tiny_corpus)
  config.data.follow_outside_links = True
  assert ingest.find_sources(config.data, tiny_corpus).files
  os.remove(meta)
  os.mkfifo(meta)
  with pytest.raises(UserError, match='not a regular file') as e:
    ingest.find_sources(config.data, tiny_corpus)
  assert 'follow_outside_links' not in str(e.value)


def test_a_descriptor_directory_that_is_a_file_is_one_line(config,
                                                           tiny_corpus):
  expanded = os.path.join(tiny_corpus, mard_io.EXPANDED_DESCRIPTOR_DIR)
  shutil.rmtree(expanded, ignore_errors=True)
  with open(expanded, 'w') as f:
    f.write('not a directory')
  with pytest.raises(UserError, match='is a file: AcousticBrainz'):
    ingest.find_sources(config.data, tiny_corpus)


def test_tracks_shared_or_listed_twice(config, tiny_corpus):
  """A track an album lists twice is one track of it; a track two albums
  list is each album's, and counted as shared; every kept track counts
  once for its extractor version; progress shows every descriptor file."""
  meta = os.path.join(tiny_corpus, mard_io.METADATA_FILE)
  albums = _lines(meta)
  base = ingest.load(config.data, tiny_corpus, show_progress=False)
  first = albums[0]
  kept = {a.album.amazon_id: a for a in base.albums}
  assert first['amazon-id'] in kept
  first['songs'] = first['songs'] + first['songs'][:1]  # Listed twice.
  # Shared, and listed twice by the second album too.
  albums[1]['songs'] = albums[1]['songs'] + first['songs'][:1] * 2
  with open(meta, 'w') as f:
    f.write(''.join(json.dumps(a) + '\n' for a in albums))
  corpus = ingest.load(config.data, tiny_corpus, show_progress=False)
  assert corpus.counts['tracks_notes/shared_between_albums'] == 1
  assert corpus.counts['tracks/duplicate_track'] == base.counts[
      'tracks/duplicate_track']
  got = {a.album.amazon_id: a for a in corpus.albums}
  mbid = first['songs'][0]['mbid'].lower()
  assert got[first['amazon-id']].mbids == kept[first['amazon-id']].mbids
  assert mbid in got[albums[1]['amazon-id']].mbids
  assert sum(corpus.extractors.values()) == sum(
      len(a.mbids) for a in corpus.albums)
  # Each version as the documents name it ('unknown' only without one).
  assert corpus.extractors and 'unknown' not in corpus.extractors
  assert sum(base.extractors.values()) == sum(len(a.mbids)
                                              for a in base.albums)


def test_extra_descriptor_dirs_relative_absolute_and_empty_items(tmp_path):
  mard = tmp_path / 'mard'
  (mard / 'rel').mkdir(parents=True)
  (tmp_path / 'abs').mkdir()
  dirs = ingest.descriptor_dirs(str(mard), f' , rel,,{tmp_path / "abs"}, ')
  assert dirs == [str(mard / 'rel'), str(tmp_path / 'abs')]


def test_a_raw_file_that_is_a_socket_gets_no_link_hint(config, tiny_corpus):
  import socket  # pylint: disable=g-import-not-at-top
  meta = os.path.join(tiny_corpus, mard_io.METADATA_FILE)
  os.remove(meta)
  with socket.socket(socket.AF_UNIX) as s:
    s.bind(meta)
    with pytest.raises(UserError, match='not a regular file') as e:
      ingest.find_sources(config.data, tiny_corpus)
  assert 'follow_outside_links' not in str(e.value)


def test_descriptors_only_through_outside_links_say_how_to_follow_them(
    config, tiny_corpus, tmp_path):
  """Every descriptor file a link out of the MARD folder: no album is
  usable, and the error names the field that follows such links; without
  any descriptor file, the same error has no such hint."""
  for name in (mard_io.ORIGINAL_DESCRIPTOR_DIR,
               mard_io.EXPANDED_DESCRIPTOR_DIR):
    d = os.path.join(tiny_corpus, name)
    if not os.path.isdir(d):
      continue
    moved = tmp_path / name
    shutil.move(d, moved)
    for root, _, files in os.walk(moved):
      rel = os.path.relpath(root, moved)
      os.makedirs(os.path.join(d, rel), exist_ok=True)
      for f in files:
        os.symlink(os.path.join(root, f), os.path.join(d, rel, f))
  with pytest.raises(UserError, match='follow_outside_links=True'):
    ingest.load(config.data, tiny_corpus, show_progress=False)
  for name in (mard_io.ORIGINAL_DESCRIPTOR_DIR,
               mard_io.EXPANDED_DESCRIPTOR_DIR):
    shutil.rmtree(os.path.join(tiny_corpus, name), ignore_errors=True)
    os.mkdir(os.path.join(tiny_corpus, name))
  with pytest.raises(UserError, match='No album has a usable') as e:
    ingest.load(config.data, tiny_corpus, show_progress=False)
  assert 'follow_outside_links' not in str(e.value)


def test_progress_counts_every_descriptor_file(config, tiny_corpus_master,
                                               capfd):
  corpus = ingest.load(config.data, tiny_corpus_master, show_progress=True)
  n = corpus.counts['input/descriptor_files']
  assert n > 0 and f'{n}/{n}' in capfd.readouterr().err
