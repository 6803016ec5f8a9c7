"""The synthetic MARD corpus: layout, realism, determinism, learnability."""

import hashlib
import json
import os

import numpy as np
import pytest

from mardjax.data import descriptors as d
from mardjax.data import mard_io
from mardjax.data import synth
from mardjax.data import text
from tests.conftest import REAL_DOCS


def _tree_digest(root):
  h = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for name in sorted(files):
      if name == synth.DONE_MARKER:
        continue
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def _lines(path):
  with open(path, 'rb') as f:
    return [json.loads(line) for line in f if line.strip()]


def test_tiny_corpus_has_exact_sizes_and_mard_layout(tiny_corpus_master):
  sizes = synth.PRESETS['tiny']
  albums = _lines(os.path.join(tiny_corpus_master, mard_io.METADATA_FILE))
  reviews = _lines(os.path.join(tiny_corpus_master, mard_io.REVIEWS_FILE))
  assert len(albums) == sizes['num_albums']
  assert len(reviews) == sizes['num_reviews']
  assert sum(len(a['songs']) for a in albums) == sizes['num_tracks']
  for key in ('amazon-id', 'artist', 'title', 'root-genre', 'categories',
              'first-release-year', 'release-group-mbid', 'songs'):
    assert all(key in a for a in albums), key
  for key in ('amazon-id', 'reviewerID', 'reviewText', 'summary', 'overall',
              'helpful', 'unixReviewTime', 'reviewTime'):
    assert all(key in r for r in reviews), key
  ids = {a['amazon-id'] for a in albums}
  assert all(r['amazon-id'] in ids for r in reviews)
  # Every form of the expanded set is present, and the original first tracks.
  files = mard_io.list_descriptor_files([
      os.path.join(tiny_corpus_master, mard_io.ORIGINAL_DESCRIPTOR_DIR),
      os.path.join(tiny_corpus_master, mard_io.EXPANDED_DESCRIPTOR_DIR)])
  kinds = {('album' if f.amazon_id else 'dump' if f.mbid else 'bulk')
           for f in files}
  assert kinds == {'album', 'dump', 'bulk'}
  originals = os.listdir(os.path.join(tiny_corpus_master,
                                      mard_io.ORIGINAL_DESCRIPTOR_DIR))
  assert originals and all(n.count('_') == 1 for n in originals)


def _all_keys(node, prefix=''):
  keys = set()
  if isinstance(node, dict):
    for k, v in node.items():
      keys.add(prefix + k)
      keys |= _all_keys(v, prefix + k + '.')
  return keys


def test_documents_have_the_real_key_set_and_realistic_values(
    tiny_corpus_master, real_ab_dir):
  with open(os.path.join(real_ab_dir, REAL_DOCS[0])) as f:
    real = json.load(f)
  pattern = os.path.join(tiny_corpus_master, mard_io.ORIGINAL_DESCRIPTOR_DIR)
  name = sorted(os.listdir(pattern))[0]
  with open(os.path.join(pattern, name)) as f:
    fake = json.load(f)
  for section in ('lowlevel', 'rhythm', 'tonal'):
    assert _all_keys(fake[section]) == _all_keys(real[section]), section
  assert fake['metadata']['version']['extractor'] == 'music 1.0'
  mbid = name.split('_')[1][:-len('.json')]
  assert fake['metadata']['tags']['musicbrainz_recordingid'] == [mbid]
  specs = d.parse_descriptor_list('paper')
  vec_fake = d.extract(fake, specs)
  vec_real = d.extract(real, specs)
  # Same orders of magnitude, value by value group.
  for lo, hi in ((0, 13), (13, 182), (182, 351), (351, 360), (360, 369)):
    mag_f = np.log10(np.abs(vec_fake[lo:hi]) + 1e-12).mean()
    mag_r = np.log10(np.abs(vec_real[lo:hi]) + 1e-12).mean()
    assert abs(mag_f - mag_r) < 1.5, (lo, hi, mag_f, mag_r)
  cov = np.array(fake['lowlevel']['mfcc']['cov'])
  icov = np.array(fake['lowlevel']['mfcc']['icov'])
  assert np.all(np.linalg.eigvalsh(cov) > 0)  # A real covariance.
  np.testing.assert_allclose(cov @ icov, np.eye(13), atol=1e-3)
  roll = fake['lowlevel']['spectral_rolloff']
  assert roll['min'] <= roll['median'] <= roll['max'] and roll['var'] > 0
  bark = fake['lowlevel']['barkbands']
  assert all(lo <= hi for lo, hi in zip(bark['min'], bark['max']))


def test_generation_is_deterministic_and_independent_of_workers(tmp_path):
  sizes = synth.SynthSizes(30, 90, 80)
  a = synth.generate(str(tmp_path / 'a'), sizes, seed=3, num_workers=1,
                     show_progress=False)
  b = synth.generate(str(tmp_path / 'b'), sizes, seed=3, num_workers=2,
                     show_progress=False)
  synth.generate(str(tmp_path / 'c'), sizes, seed=4, num_workers=1,
                 show_progress=False)
  assert a['tracks'] == b['tracks'] == 80
  assert _tree_digest(tmp_path / 'a') == _tree_digest(tmp_path / 'b')
  assert _tree_digest(tmp_path / 'a') != _tree_digest(tmp_path / 'c')


def test_complete_corpus_is_reused_and_partial_one_rewritten(tmp_path):
  sizes = synth.SynthSizes(5, 10, 10)
  out = str(tmp_path / 'c')
  first = synth.generate(out, sizes, seed=0, show_progress=False)
  assert not first['reused']
  assert synth.generate(out, sizes, seed=0, show_progress=False)['reused']
  digest = _tree_digest(out)
  # An interrupted run leaves no completion marker: everything is redone.
  os.remove(os.path.join(out, synth.DONE_MARKER))
  with open(os.path.join(out, mard_io.REVIEWS_FILE), 'ab') as f:
    f.write(b'{"half a line')
  again = synth.generate(out, sizes, seed=0, show_progress=False)
  assert not again['reused'] and _tree_digest(out) == digest


def test_bad_sizes_are_rejected(config):
  config.data.synth_num_reviews = 3
  config.data.synth_num_albums = 10
  with pytest.raises(ValueError):
    synth.sizes_from_config(config.data)
  config.data.synth_preset = 'huge'
  with pytest.raises(ValueError):
    synth.sizes_from_config(config.data)


def test_review_words_follow_the_audio(tmp_path):
  """Learnable: brighter-sounding albums get 'bright' words more often."""
  out = str(tmp_path / 'c')
  synth.generate(out, synth.SynthSizes(150, 1500, 450), seed=1,
                 show_progress=False)
  bright, murky = (set(w) for w in synth._POLE_LISTS['brightness'][::-1])  # pylint: disable=protected-access
  words = {}
  for r in _lines(os.path.join(out, mard_io.REVIEWS_FILE)):
    words.setdefault(r['amazon-id'], []).extend(text.tokenize(r['reviewText']))
  rolloff_mean = d.parse_descriptor_list('lowlevel.spectral_rolloff.mean')
  rolloff = {}
  files = mard_io.list_descriptor_files(
      [os.path.join(out, mard_io.EXPANDED_DESCRIPTOR_DIR)])
  song_album = {s['mbid']: a['amazon-id'] for a in _lines(
      os.path.join(out, mard_io.METADATA_FILE)) for s in a['songs']}
  for f in files:
    docs, _ = mard_io.documents_in_file(f)
    for mbid, _, doc in docs:
      rolloff.setdefault(song_album[mbid], []).append(
          float(d.extract(doc, rolloff_mean)[0]))
  xs, ys = [], []
  for album, ws in words.items():
    b = sum(w in bright for w in ws)
    m = sum(w in murky for w in ws)
    if b + m:
      xs.append(np.log(np.mean(rolloff[album])))
      ys.append((b - m) / (b + m))
  rank = lambda v: np.argsort(np.argsort(v))
  rho = np.corrcoef(rank(xs), rank(ys))[0, 1]
  assert rho > 0.3, rho


# The digest of the corpus below as the generator wrote it before it had
# styles: the default style must keep writing it byte for byte.
_ORIGINAL_DIGEST = (
    '98030dd0bd6601227f1f0e5edcd83a4ba71e57e7c763c1ceaab56db031ebee99')


def test_the_default_style_writes_the_original_corpus(tmp_path, config):
  assert synth.style_from_config(config.data) == synth.Style()
  synth.generate(str(tmp_path / 'a'), synth.SynthSizes(30, 90, 80), seed=3,
                 show_progress=False)
  assert _tree_digest(tmp_path / 'a') == _ORIGINAL_DIGEST


def _sentences(path):
  return [s for r in _lines(os.path.join(path, mard_io.REVIEWS_FILE))
          for s in r['reviewText'].split('. ')]


def test_each_style_knob_changes_what_it_names(tmp_path):
  """Single-track albums, the spread of reviews, the sentence mix and the
  naming of albums each move as set; a noisier impression changes the
  reviews' words and nothing of the sound or the catalogue."""
  sizes = synth.SynthSizes(120, 600, 540)

  def corpus(name, **style):
    out = str(tmp_path / name)
    synth.generate(out, sizes, seed=5, show_progress=False,
                   style=synth.Style(**style))
    return out
  base = corpus('base')
  albums = list(_lines(os.path.join(base, mard_io.METADATA_FILE)))
  single = list(_lines(os.path.join(corpus('single', single_track=0.5),
                                    mard_io.METADATA_FILE)))
  ones = lambda rows: np.mean([len(a['songs']) == 1 for a in rows])
  assert ones(single) > ones(albums) + 0.3
  per_album = lambda path: np.bincount(np.unique(
      [r['amazon-id'] for r in _lines(os.path.join(path,
                                                   mard_io.REVIEWS_FILE))],
      return_inverse=True)[1])
  assert (np.mean(per_album(corpus('tail', review_tail=2.5)) == 1) >
          np.mean(per_album(base) == 1) + 0.1)
  offtopic = {s.rstrip('.') for group in synth._NOISE.values()  # pylint: disable=protected-access
              for s in group}
  share = lambda path: np.mean([s.rstrip('.') in offtopic
                                for s in _sentences(path)])
  assert 0.08 < share(base) < 0.18
  assert share(corpus('chatty', trait=0.2, offtopic=0.5)) > 0.4
  artists = {a['amazon-id']: a['artist'] for a in albums}
  named = lambda path: np.mean([
      artists[r['amazon-id']] in r['reviewText']
      for r in _lines(os.path.join(path, mard_io.REVIEWS_FILE))])
  assert named(corpus('never', naming=0.0)) == 0
  assert named(corpus('often', naming=0.3)) > named(base) + 0.2
  noisy = corpus('noisy', impression_noise=2.0)
  for f in (mard_io.METADATA_FILE, mard_io.ORIGINAL_DESCRIPTOR_DIR,
            mard_io.EXPANDED_DESCRIPTOR_DIR):
    assert _tree_digest_of(os.path.join(noisy, f)) == _tree_digest_of(
        os.path.join(base, f))
  assert _sentences(noisy) != _sentences(base)


def _tree_digest_of(path):
  if os.path.isdir(path):
    return _tree_digest(path)
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize('field,value', [
    ('single_track', 1.5), ('review_tail', -1.0), ('trait', 0.9),
    ('offtopic', -0.1)])
def test_a_style_out_of_range_is_refused(config, tmp_path, field, value):
  from mardjax import stages  # pylint: disable=g-import-not-at-top
  from mardjax.errors import UserError  # pylint: disable=g-import-not-at-top
  config.data.synth_style[field] = value
  with pytest.raises(UserError, match=f'config.data.synth_.*{field}'):
    stages.synthesize(config, str(tmp_path), show_progress=False)
