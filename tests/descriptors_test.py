"""Descriptor extraction against the real AcousticBrainz documents."""

import dataclasses
import json
import math
import os
import types

import numpy as np
import pytest

from mardjax.data import descriptors as d
from mardjax.data import mard_io
from mardjax.errors import UserError
from tests.conftest import BULK_SAMPLE, REAL_DOCS

PAPER = d.parse_descriptor_list('paper')


def _load(real_ab_dir, name):
  with open(os.path.join(real_ab_dir, name)) as f:
    return json.load(f)


def test_paper_set_is_369_values_in_documented_order():
  assert d.dim(PAPER) == 369
  names = d.feature_names(PAPER)
  assert len(names) == 369
  assert names[0] == 'lowlevel.mfcc.mean[0]'
  assert names[13] == 'lowlevel.mfcc.cov[0,0]'
  assert names[14] == 'lowlevel.mfcc.cov[0,1]'  # Row-major.
  assert names[13 + 169] == 'lowlevel.mfcc.icov[0,0]'
  assert names[351:360] == [f'lowlevel.spectral_rolloff.{s}' for s in d.STATS]
  assert names[360:] == [f'lowlevel.zerocrossingrate.{s}' for s in d.STATS]


@pytest.mark.parametrize('name', REAL_DOCS)
def test_every_extracted_value_matches_the_real_document(real_ab_dir, name):
  doc = _load(real_ab_dir, name)
  vec = d.extract(doc, PAPER)
  assert vec.shape == (369,) and vec.dtype == np.float32
  ll = doc['lowlevel']
  expected = (list(ll['mfcc']['mean']) +
              [x for row in ll['mfcc']['cov'] for x in row] +
              [x for row in ll['mfcc']['icov'] for x in row] +
              [ll['spectral_rolloff'][s] for s in d.STATS] +
              [ll['zerocrossingrate'][s] for s in d.STATS])
  assert len(expected) == 369
  for i, (got, want) in enumerate(zip(vec.tolist(), expected)):
    assert got == pytest.approx(want, rel=1e-6, abs=1e-30), (
        d.feature_names(PAPER)[i])
  assert d.extractor_version(doc) == 'music 1.0'


def test_configurable_lists_scalars_and_vector_stats(real_ab_dir):
  doc = _load(real_ab_dir, REAL_DOCS[0])
  specs = d.parse_descriptor_list(
      'rhythm.bpm, lowlevel.spectral_centroid.mean, lowlevel.barkbands:statsx27')
  vec = d.extract(doc, specs)
  assert vec.shape == (2 + 9 * 27,)
  assert vec[0] == pytest.approx(doc['rhythm']['bpm'])
  assert vec[1] == pytest.approx(doc['lowlevel']['spectral_centroid']['mean'])
  bark = doc['lowlevel']['barkbands']
  np.testing.assert_allclose(vec[2:29], bark['min'], rtol=1e-6)
  np.testing.assert_allclose(vec[-27:], bark['dvar2'], rtol=1e-6)
  assert str(specs[2]) == 'lowlevel.barkbands:statsx27'


@pytest.mark.parametrize('bad', ['', ',', 'a..b', 'x:0', 'x:3xq',
                                 'a.b,a.b', 'nonexistent_set_name:stats:2'])
def test_malformed_descriptor_lists_are_rejected(bad):
  with pytest.raises(ValueError):
    d.parse_descriptor_list(bad)


def _mutated(real_ab_dir, fn):
  doc = _load(real_ab_dir, REAL_DOCS[0])
  fn(doc['lowlevel'])
  return doc


@pytest.mark.parametrize('mutate,reason', [
    (lambda ll: ll.pop('mfcc'), 'missing_path'),
    (lambda ll: ll['spectral_rolloff'].pop('dvar2'), 'missing_path'),
    (lambda ll: ll['mfcc']['cov'].pop(), 'wrong_shape'),  # 12x13.
    (lambda ll: ll['mfcc']['cov'][3].pop(), 'wrong_shape'),  # Ragged.
    (lambda ll: ll['mfcc'].__setitem__('mean', 3.0), 'wrong_shape'),
    (lambda ll: ll.__setitem__('zerocrossingrate', [1, 2]), 'wrong_shape'),
    (lambda ll: ll['mfcc']['mean'].__setitem__(2, float('nan')), 'non_finite'),
    (lambda ll: ll['spectral_rolloff'].__setitem__('var', float('inf')),
     'non_finite'),
    (lambda ll: ll['spectral_rolloff'].__setitem__('var', 1e300),
     'non_finite'),  # Overflows float32.
    (lambda ll: ll['spectral_rolloff'].__setitem__('mean', 'fast'),
     'not_numeric'),
    (lambda ll: ll['spectral_rolloff'].__setitem__('mean', True),
     'not_numeric'),
])
def test_bad_documents_raise_with_a_reason(real_ab_dir, mutate, reason):
  doc = _mutated(real_ab_dir, mutate)
  with pytest.raises(d.DescriptorError) as e:
    d.extract(doc, PAPER)
  assert e.value.reason == reason


def test_not_a_document():
  with pytest.raises(d.DescriptorError) as e:
    d.extract([1, 2, 3], PAPER)
  assert e.value.reason == 'not_a_document'


def test_bulk_response_sample_is_read_and_partial_documents_are_caught(
    real_ab_dir):
  path = os.path.join(real_ab_dir, BULK_SAMPLE)
  file = mard_io.DescriptorFile(path, (0, BULK_SAMPLE), None, None, 0)
  docs, counts = mard_io.documents_in_file(file)
  assert not counts
  assert sorted((m, o) for m, o, _ in docs) == [
      ('0dad432b-16cc-4bf0-8961-fd31d124b01b', 0),
      ('0dad432b-16cc-4bf0-8961-fd31d124b01b', 1),
      ('e8afe383-1478-497e-90b1-7885c7f37f6e', 0)]
  # The sample holds abridged documents: no MFCC, so no paper features.
  for _, _, doc in docs:
    with pytest.raises(d.DescriptorError) as e:
      d.extract(doc, PAPER)
    assert e.value.reason == 'missing_path'
  specs = d.parse_descriptor_list('lowlevel.average_loudness')
  assert d.extract(docs[0][2], specs)[0] == pytest.approx(0.048737552017)


def test_signed_log_keeps_sign_and_compresses():
  x = np.array([-5368628.0, -1.0, 0.0, 1.0, 14701.6])
  y = d.transform(x, 'signed_log')
  np.testing.assert_allclose(y, [-math.log1p(5368628), -math.log(2), 0,
                                 math.log(2), math.log1p(14701.6)])
  np.testing.assert_array_equal(d.transform(x, 'none'), x)
  for unknown in ('log10', 'sqrt', ''):
    with pytest.raises(ValueError, match='Unknown descriptor transform'):
      d.transform(x, unknown)


def test_running_moments_match_numpy():
  rng = np.random.default_rng(0)
  data = rng.normal(3, 2, (1000, 5)) * [1, 10, 100, 1e3, 1e4]
  data[:, 4] = 7.0  # A constant feature gets std 1, not 0.
  m = d.RunningMoments(5)
  for chunk in np.array_split(data, [1, 10, 400, 401]):
    m.update(chunk)
  assert m.count == 1000
  np.testing.assert_allclose(m.mean, data.mean(0), rtol=1e-12)
  np.testing.assert_allclose(m.std()[:4], data.std(0)[:4], rtol=1e-10)
  assert m.std()[4] == 1.0
  with pytest.raises(ValueError):
    d.RunningMoments(3).std()


def test_names_and_text_of_every_entry_kind():
  specs = d.parse_descriptor_list(
      ' a.s ,a.t:scalar, b:stats, c:statsx2, m:2x3, v:1 ')
  assert [str(s) for s in specs] == ['a.s', 'a.t', 'b:stats', 'c:statsx2',
                                     'm:2x3', 'v:1']
  assert d.parse_descriptor_list([str(s) for s in specs]) == specs
  assert [s.size for s in specs] == [1, 1, 9, 18, 6, 1]
  names = d.feature_names(specs)
  assert len(names) == d.dim(specs) == 36
  assert names[:4] == ['a.s', 'a.t', 'b.min', 'b.max']
  # statsxN: statistic-major, then the cells.
  assert names[11:15] == ['c.min[0]', 'c.min[1]', 'c.max[0]', 'c.max[1]']
  assert names[28] == 'c.dvar2[1]'
  assert names[29:] == ['m[0,0]', 'm[0,1]', 'm[0,2]', 'm[1,0]', 'm[1,1]',
                        'm[1,2]', 'v[0]']


@pytest.mark.parametrize('bad,message', [
    (':3', 'empty path component'), ('a.:3', 'empty path component'),
    ('x:-2', 'bad shape'), ('x:2x0', 'bad shape'), ('x:statsx0', 'bad shape'),
    ('x:statsx', 'bad shape'), (' , ', 'descriptor list is empty'),
    ('a, b, a:3', 'repeats a path'),
])
def test_malformed_descriptor_lists_name_their_fault(bad, message):
  with pytest.raises(ValueError, match=message):
    d.parse_descriptor_list(bad)


def test_specs_are_frozen_values():
  spec = d.parse_spec_entry('a:2')
  assert spec == d.DescriptorSpec('a', False, (2,))
  assert len({spec, d.parse_spec_entry(' a:2 ')}) == 1  # Hashable.
  with pytest.raises(dataclasses.FrozenInstanceError):
    spec.path = 'b'


def test_set_names_and_lists():
  assert d.parse_descriptor_list(' paper ') == PAPER
  assert d.parse_descriptor_list(list(d.DESCRIPTOR_SETS['paper'])) == PAPER


def test_check_config_names_the_field():
  good = types.SimpleNamespace(transform='signed_log', descriptors='paper')
  d.check_config(good)
  d.check_config(types.SimpleNamespace(transform='none', descriptors='a:2'))
  with pytest.raises(UserError, match='data.transform'):
    d.check_config(types.SimpleNamespace(transform='log',
                                         descriptors='paper'))
  with pytest.raises(UserError, match=r'^config\.data\.descriptors: .*bad '
                     'shape'):
    d.check_config(types.SimpleNamespace(transform='none',
                                         descriptors='a:0'))


SMALL = d.parse_descriptor_list('r.bpm, r.v:3, s:stats')


def _small_doc(**changes):
  doc = {'r': {'bpm': 120, 'v': [1.5, -2, 3e5]},
         's': {s: float(i) for i, s in enumerate(d.STATS)}}
  for key, value in changes.items():
    if key in ('bpm', 'v'):
      doc['r'][key] = value
    else:
      doc['s'][key] = value
  return doc


def test_extract_small_document_exactly():
  vec = d.extract(_small_doc(), SMALL)
  assert vec.dtype == np.float32
  np.testing.assert_array_equal(vec, [120, 1.5, -2, 3e5] + list(range(9)))


@pytest.mark.parametrize('change,reason', [
    (dict(bpm=10 ** 400), 'non_finite'),  # Valid JSON, beyond any float.
    (dict(v=[1, 10 ** 400, 2]), 'non_finite'),
    (dict(v=[1, 2, 1e39]), 'non_finite'),  # Beyond float32.
    (dict(mean=[1.0]), 'wrong_shape'),
    (dict(mean={'x': 1.0}), 'wrong_shape'),
    (dict(mean=None), 'not_numeric'),
    (dict(bpm=False), 'not_numeric'),
    (dict(v='1,2,3'), 'not_numeric'),
    (dict(v={'a': 1}), 'not_numeric'),
    (dict(v=True), 'not_numeric'),
    (dict(v=None), 'wrong_shape'),
    (dict(v=3.0), 'wrong_shape'),
    (dict(v=[1, 'a', 2]), 'wrong_shape'),
    (dict(v=[[1, 2, 3]]), 'wrong_shape'),
    (dict(v=[1, 2, 3, 4]), 'wrong_shape'),  # Longer: must not spill over.
    (dict(v=[1, 2]), 'wrong_shape'),
])
def test_bad_values_raise_with_a_reason(change, reason):
  with pytest.raises(d.DescriptorError) as e:
    d.extract(_small_doc(**change), SMALL)
  assert e.value.reason == reason


def test_non_finite_error_names_the_first_bad_value():
  with pytest.raises(d.DescriptorError, match=r'^r\.v\[1\] is not finite'):
    d.extract(_small_doc(v=[1, float('nan'), float('inf')]), SMALL)
  with pytest.raises(d.DescriptorError, match=r'^s\.dvar is not finite'):
    d.extract(_small_doc(dvar=float('-inf')), SMALL)


def test_paths_through_non_dicts_are_missing():
  # 'e' is a substring of the string the path runs into, 'x' of nothing.
  doc = {'meta': 'version', 'n': 3, 'l': [1]}
  for path in ('meta.e', 'n.x', 'l.x', 'meta.version'):
    with pytest.raises(d.DescriptorError) as e:
      d.extract(doc, d.parse_descriptor_list(path))
    assert e.value.reason == 'missing_path'


def test_extractor_version_of_odd_documents_is_empty():
  assert d.extractor_version({}) == ''
  assert d.extractor_version({'metadata': {'version': {}}}) == ''
  assert d.extractor_version([1]) == ''
  assert d.extractor_version({'metadata': 'x'}) == ''
  assert d.extractor_version(
      {'metadata': {'version': {'extractor': 2.1}}}) == '2.1'


def test_running_moments_small_scales_and_empty_batches():
  m = d.RunningMoments(2)
  m.update(np.zeros((0, 2)))  # An empty batch changes nothing.
  assert m.count == 0
  m.update([[1.0, 0.0], [1.002, 1.0]])
  m.update(np.zeros((0, 2)))
  assert m.count == 2
  np.testing.assert_allclose(m.mean, [1.001, 0.5], rtol=1e-12)
  # A std of 0.001 is kept (eps is 1e-6); one exactly eps is kept too.
  np.testing.assert_allclose(m.std(), [0.001, 0.5], rtol=1e-9)
  np.testing.assert_array_equal(m.std(eps=0.5), [1.0, 0.5])


def test_normalize_is_transform_then_standardise():
  x = np.array([[-3.0, 0.0, 10.0], [1.0, 2.0, 3.0]])
  mean = np.array([0.5, -1.0, 2.0])
  std = np.array([2.0, 4.0, 0.5])
  got = d.normalize(x, 'signed_log', mean, std)
  assert got.dtype == np.float32
  want = (np.sign(x) * np.log1p(np.abs(x)) - mean) / std
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(d.normalize(x, 'none', mean, std),
                             (x - mean) / std, rtol=1e-6)
