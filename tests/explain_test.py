"""Explanations of the room's answers: leave-one-out, faithful to the model."""

import io
import os

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from mardjax.data import input_pipeline
from mardjax.data import text as text_lib
from mardjax.models import embed
from mardjax.models import two_branch
from mardjax.serve import explain
from mardjax.serve import web
from tests.conftest import REAL_AB_DIR, REAL_DOCS, write_tone


@pytest.fixture(scope='module')
def room(trained_room):
  return trained_room[2]


@pytest.fixture(scope='module')
def tracks(room):
  """(N, F) standardised descriptors of the corpus's tracks."""
  return input_pipeline.load_audio_table(room.embedder.manifest).descriptors


def _cos(e, a, b):
  return float(np.asarray(e.embed_text(a)[0])[0] @ b)


def _reviews_with_text(room, n):
  metas = [m for m in room.bank['review_meta'] if m.get('text')]
  assert len(metas) >= n
  return metas[:n]


def test_word_weights_equal_embedding_each_text_again(room):
  """One call over every variant gives what embedding each text without
  one of its words, one by one, gives: the weight is the fall in cosine."""
  e, ex = room.embedder, room.explainer
  rng = np.random.default_rng(0)
  for meta in _reviews_with_text(room, 3):
    query = rng.normal(size=e.model.embed_dim).astype(np.float32)
    query /= np.linalg.norm(query)
    body = meta['text'][meta['body_start']:]
    tokens = text_lib.tokenize(body)[:e.config.data.max_len]
    ids = ex._token_ids(tokens)
    words, weights = ex._word_weights(ids, query[None, :])
    assert len(words) == len(set(ids[ids > text_lib.UNK_ID].tolist())) > 1
    full = _cos(e, ' '.join(tokens), query)
    for w, weight in zip(words[:6], weights[:6, 0]):
      rest = ' '.join(t for t, i in zip(tokens, ids) if i != w)
      want = full - (_cos(e, rest, query) if rest else 0.0)
      np.testing.assert_allclose(weight, want, atol=2e-5)


def test_the_explained_review_is_the_one_in_the_bank(room):
  """The body the words are taken from embeds to the review's vector in
  the bank: the explanation is of the review as it was matched."""
  e = room.embedder
  for meta in _reviews_with_text(room, 5):
    row = room.bank['review_meta'].index(meta)
    body = meta['text'][meta['body_start']:]
    np.testing.assert_allclose(np.asarray(e.embed_text(body)[0])[0],
                               room.bank['reviews'][row], atol=2e-5)


def test_deleting_the_top_words_lowers_similarity_more_than_random_words(
    room, tracks):
  """Over the top 10 reviews of 20 recordings: taking out a review's 3
  highest-weight words lowers its similarity to the recording more than 3
  random words of it, in at least 90% of cases."""
  e, ex = room.embedder, room.explainer
  rng = np.random.default_rng(1)
  queries = e.embed_audio(tracks[rng.choice(len(tracks), 20, replace=False)])
  wins = cases = 0
  for q in queries:
    idx, _ = room.bank['review_index'].search(q[None], 10)
    for i in idx[0]:
      meta = room.bank['review_meta'][i]
      if not meta.get('text'):
        continue
      tokens = text_lib.tokenize(meta['text'][meta['body_start']:])[
          :e.config.data.max_len]
      ids = ex._token_ids(tokens)
      words, weights = ex._word_weights(ids, q[None, :])
      if len(words) < 6:
        continue
      top = words[np.argsort(-weights[:, 0])[:3]]
      rand = rng.choice(words, 3, replace=False)

      def without(drop):
        rest = ' '.join(t for t, j in zip(tokens, ids) if j not in drop)
        return _cos(e, rest, q)

      wins += without(top) < without(rand)
      cases += 1
  assert cases >= 150, cases
  assert wins / cases >= 0.9, (wins, cases)


def test_one_word_and_unknown_word_reviews_get_a_defined_answer(room):
  e, ex = room.embedder, room.explainer
  known = e.vocab.words[5]
  query = np.asarray(e.embed_text(known)[0])[0]
  out = ex.review_words(f'{known} {known}', 0, query, 300)
  # Nothing is left without the word: its weight is the whole similarity,
  # here of the text with itself.
  assert [w['word'] for w in out['why']] == [known]
  np.testing.assert_allclose(out['why'][0]['weight'], 1.0, atol=1e-4)
  assert out['highlights'] == [[0, len(known)],
                               [len(known) + 1, 2 * len(known) + 1]]
  # An unknown word is read (as the unknown token) but never weighed.
  out = ex.review_words(f'{known} zzqxunknown', 0, query, 300)
  assert [w['word'] for w in out['why']] == [known]
  assert np.isfinite(out['why'][0]['weight'])
  assert out['excerpt'] == f'{known} zzqxunknown'
  out = ex.review_words('zzqxunknown', 0, query, 300)
  assert out['why'] == [] and out['highlights'] == []
  out = ex.review_words(None, 0, query, 300)
  assert out['why'] is None and 'missing' in out['why_unavailable']


def test_the_excerpt_is_the_window_around_the_strongest_words(room):
  e, ex = room.embedder, room.explainer
  word = e.vocab.words[7]
  query = np.asarray(e.embed_text(word)[0])[0]
  # Within the words the model reads (config.data.max_len), far from the
  # start of a long review.
  before, after = ' '.join(['zzfill'] * 30), ' '.join(['zzfill'] * 300)
  summary = 'Summary line. '
  text = f'{summary}{before} {word} {after} {word}'
  out = ex.review_words(text, len(summary), query, 120)
  assert out['why'][0]['word'] == word and out['why'][0]['weight'] > 0
  assert out['excerpt'].startswith('…') and out['excerpt'].endswith('…')
  assert len(out['excerpt']) <= 122
  (a, b), = out['highlights']
  assert out['excerpt'][a:b] == word
  # A word of the summary line is shown but was not read: not weighed.
  out = ex.review_words(f'{word}. {after}', len(word) + 2, query, 120)
  assert out['why'] == [] and out['highlights'] == []


def test_sound_group_weights_are_each_group_at_its_training_mean(room,
                                                                  tracks):
  e, ex = room.embedder, room.explainer
  assert ex.group_names == ['timbre (MFCC means)',
                            'timbre variation (MFCC covariance)',
                            'brightness (spectral shape)',
                            'noisiness (zero crossings, dissonance)']
  z = tracks[3]
  targets = room.bank['albums'][:4]
  got = ex.sound_groups(z * 2, z, targets)
  full = e.embed_audio(z[None])[0] @ targets.T
  for t, groups in enumerate(got):
    assert len(groups) == 4
    assert [g['weight'] for g in groups] == sorted(
        [g['weight'] for g in groups], reverse=True)
    for g in groups:
      zero = z.copy()
      zero[np.array(ex.groups) == g['group']] = 0.0
      want = full[t] - e.embed_audio(zero[None])[0] @ targets[t]
      np.testing.assert_allclose(g['weight'], want, atol=2e-5)
      # The values shown are the group's furthest from the mean, in sd.
      v = g['values'][0]
      assert explain.group_of(v['name']) == g['group']
      members = np.array(ex.groups) == g['group']
      assert abs(v['sd']) == pytest.approx(np.abs(z[members]).max(), 1e-5)
      assert v['value'] == pytest.approx(2 * v['sd'], 1e-5)


def test_setting_the_top_group_to_its_mean_lowers_similarity_most(room,
                                                                  tracks):
  """Over the top 10 albums of 20 recordings: the highest-weight group set
  to its training mean lowers the similarity more than a random other
  group, in at least 90% of cases (the weights are those falls, so this
  checks the ranking and the bookkeeping)."""
  e, ex = room.embedder, room.explainer
  rng = np.random.default_rng(2)
  wins = cases = 0
  for z in tracks[rng.choice(len(tracks), 20, replace=False)]:
    q = e.embed_audio(z[None])
    idx, _ = room.bank['album_index'].search(q, 10)
    targets = room.bank['albums'][idx[0]]
    for t, groups in enumerate(ex.sound_groups(z, z, targets)):
      top, other = groups[0]['group'], rng.choice(
          [g['group'] for g in groups[1:]])

      def at_mean(group):
        zero = z.copy()
        zero[np.array(ex.groups) == group] = 0.0
        return float(e.embed_audio(zero[None])[0] @ targets[t])

      wins += at_mean(top) < at_mean(other)
      cases += 1
  assert wins / cases >= 0.9, (wins, cases)


def test_a_constant_group_gets_a_defined_weight(room):
  e, ex = room.embedder, room.explainer
  z = np.zeros(len(e.names), np.float32)  # Every value at its mean.
  groups = ex.sound_groups(z, z, room.bank['albums'][:2])
  for g in groups[0] + groups[1]:
    assert g['weight'] == 0.0 and all(np.isfinite(v['sd'])
                                      for v in g['values'])


def test_group_names_follow_the_acousticbrainz_namespaces():
  assert explain.group_of('lowlevel.mfcc.cov[0,1]') == (
      'timbre variation (MFCC covariance)')
  assert explain.group_of('lowlevel.mfcc.mean[3]') == 'timbre (MFCC means)'
  assert explain.group_of('rhythm.bpm') == 'rhythm and tempo'
  assert explain.group_of('tonal.key_strength') == 'tonal and key'
  assert explain.group_of('lowlevel.spectral_rolloff.dvar2') == (
      'brightness (spectral shape)')
  assert explain.group_of('lowlevel.unheard.mean[2]') == 'lowlevel.unheard'


def test_query_words_and_unknown_words(room):
  e, ex = room.embedder, room.explainer
  a, b = e.vocab.words[4], e.vocab.words[9]
  text = f'{a} zzqxunknown {b}'
  emb = np.asarray(e.embed_text(text)[0])
  targets = room.bank['albums'][:3]
  why, unknown = ex.query_words(text, targets)
  assert unknown == ['zzqxunknown']
  for t, words in enumerate(why):
    assert {w['word'] for w in words} == {a, b}
    for w in words:
      rest = f'zzqxunknown {b}' if w['word'] == a else f'{a} zzqxunknown'
      want = float(emb[0] @ targets[t]) - _cos(e, rest, targets[t])
      np.testing.assert_allclose(w['weight'], want, atol=2e-5)


@pytest.mark.parametrize('encoder,pooling', [('lstm', 'mean'),
                                             ('mean', 'idf'),
                                             ('mean', 'mean')])
def test_every_word_encoder_is_explained_by_the_same_rule(room, encoder,
                                                          pooling):
  """Each variant is the text with the word's occurrences taken out and
  the rest closed up, as if typed that way, embedded by the model itself:
  the BiLSTM reads order; the mean encoder's (weighted) mean is computed
  from the text's sums, and must equal embedding each variant."""
  e = room.embedder
  config = e.config.copy_and_resolve_references()
  config.model.text_encoder, config.model.pooling = encoder, pooling
  model = two_branch.from_manifest(config, e.manifest)
  variables = model.init(jax.random.PRNGKey(0), **two_branch.dummy_inputs(
      config, e.manifest))

  class Served:
    pass

  served = Served()
  for name in ('config', 'vocab', 'names', 'text_encoder', 'manifest'):
    setattr(served, name, getattr(e, name))
  served.config, served.model, served.variables = config, model, variables
  served.gated = None  # The model's own reading (no query rule).
  ex = explain.Explainer(served)
  assert (ex.table is None) == (encoder == 'lstm')
  tokens = [e.vocab.words[i] for i in (5, 9, 5, 12, 30, 9, 1, 2)]
  ids = ex._token_ids(tokens)
  query = np.ones(e.model.embed_dim, np.float32) / np.sqrt(e.model.embed_dim)
  words, weights = ex._word_weights(ids, query[None, :])
  assert list(words) == [2, 5, 9, 12, 30]  # Not the unknown word (1).

  def embed_ids(ts):
    row = np.zeros((1, config.data.max_len), np.int32)
    row[0, :len(ts)] = ts
    return np.asarray(embed.text(model, variables, row,
                                 np.array([len(ts)], np.int32)))[0]

  full = embed_ids(ids) @ query
  for w, weight in zip(words, weights[:, 0]):
    np.testing.assert_allclose(weight, full - embed_ids(ids[ids != w]) @ query,
                               atol=2e-5)
  # One word, said twice: nothing is left without it.
  words, weights = ex._word_weights(np.array([7, 7], np.int32), query[None])
  np.testing.assert_allclose(weights[:, 0], [embed_ids([7, 7]) @ query],
                             atol=2e-5)


def test_the_api_explains_on_request(room):
  client = TestClient(web.create_app(room, max_upload_bytes=2_000_000))
  with open(os.path.join(REAL_AB_DIR, REAL_DOCS[0]), 'rb') as f:
    data = f.read()
  r = client.post('/api/query/audio?k=3&explain=true',
                  files={'file': ('t.json', io.BytesIO(data))})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body['explain_ms'] >= 0
  for review in body['reviews']:
    assert review['why'] and {'word', 'weight'} == set(review['why'][0])
    for a, b in review['highlights']:
      assert review['excerpt'][a:b].lower() in {
          w['word'] for w in review['why']}
  for album in body['albums']:
    assert len(album['why_audio']) == 4
  plain = client.post('/api/query/audio?k=3',
                      files={'file': ('t.json', io.BytesIO(data))}).json()
  assert 'why' not in plain['reviews'][0] and 'explain_ms' not in plain
  assert [x['review_id'] for x in plain['reviews']] == [
      x['review_id'] for x in body['reviews']]
  word = room.embedder.vocab.words[6]
  r = client.post('/api/query/text', json={'text': f'{word} zzqxunknown',
                                           'k': 2, 'explain': True})
  assert r.status_code == 200, r.text
  assert r.json()['unknown_words'] == ['zzqxunknown']
  assert [w['word'] for w in r.json()['albums'][0]['why_words']] == [word]
  assert client.post('/api/query/text', json={
      'text': word, 'explain': 'sometimes'}).status_code == 422
  assert client.post('/api/query/audio?explain=sometimes', files={
      'file': ('t.json', io.BytesIO(data))}).status_code == 422


def test_warm_up_compiles_every_program_the_explanations_use(room):
  """After warm_up, explaining texts of any length compiles nothing."""
  ex = room.explainer
  ex.warm_up()
  caches = lambda: (embed.text._cache_size(),  # pylint: disable=g-long-lambda
                    explain._text_head._cache_size())
  before = caches()
  rng = np.random.default_rng(3)
  query = np.ones(room.embedder.model.embed_dim, np.float32)
  max_len = room.embedder.config.data.max_len
  for n in (1, 7, 16, 17, 40, max_len, 1000):
    words = rng.choice(room.embedder.vocab.words[2:], n)
    ex.review_words(' '.join(words), 0, query, 300)
  # max_len distinct words: max_len + 1 variants, the largest program.
  ex.review_words(' '.join(room.embedder.vocab.words[2:2 + max_len]), 0,
                  query, 300)
  assert caches() == before


def _library_docs(folder, n):
  """n AcousticBrainz documents: the real one with its timbre and
  brightness moved, each differently."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(REAL_AB_DIR, REAL_DOCS[0])) as f:
    doc = json.load(f)
  rng = np.random.default_rng(0)
  folder.mkdir()
  for i in range(n):
    d = json.loads(json.dumps(doc))
    mfcc = d['lowlevel']['mfcc']
    mfcc['mean'] = [v * (1 + 0.3 * rng.normal()) for v in mfcc['mean']]
    rolloff = d['lowlevel']['spectral_rolloff']
    rolloff['mean'] *= float(np.exp(0.5 * rng.normal()))
    (folder / f'track{i:02d}.json').write_text(json.dumps(d))


def test_a_served_library_is_searched_and_explained(trained_room,
                                                    trained_config, tmp_path):
  """A library of 24 embedded tracks served beside MARD: a typed text and
  an upload both return tracks of it, explained; a library embedded by
  another model is refused in one line."""
  import json  # pylint: disable=g-import-not-at-top
  from mardjax import modes  # pylint: disable=g-import-not-at-top
  from mardjax.data import manifest as manifest_lib  # pylint: disable=g-import-not-at-top
  _, workdir, room = trained_room
  config = trained_config
  _library_docs(tmp_path / 'music', 24)
  out = modes.run_mode('embed', config, workdir, show_progress=False,
                       input_dir=str(tmp_path / 'music'),
                       output_dir=str(tmp_path / 'library'))
  assert out['tracks'] == 24
  config.serve.library = str(tmp_path / 'library')
  data_dir = manifest_lib.data_dir_of(config, workdir)
  lib_room = web.Room(config, workdir, data_dir, room.embedder.config.data.mard_dir)
  word = room.embedder.vocab.words[6]
  got = lib_room.text_query(f'{word} music', 5, explain=True)
  files = [t['file'] for t in got['tracks']]
  assert len(files) == 5 and all(f.startswith('track') for f in files)
  assert [t['distance'] for t in got['tracks']] == sorted(
      t['distance'] for t in got['tracks'])
  assert {w['word'] for w in got['tracks'][0]['why_words']} <= {word,
                                                                'music'}
  with open(os.path.join(REAL_AB_DIR, REAL_DOCS[0])) as f:
    doc = json.load(f)
  got = lib_room.descriptor_query(doc, 3, explain=True)
  assert len(got['tracks']) == 3
  assert all(len(t['why_audio']) == 4 for t in got['tracks'])
  # The library's nearest track to one of its own documents is itself.
  with open(tmp_path / 'music' / 'track07.json') as f:
    got = lib_room.descriptor_query(json.load(f), 1)
  assert got['tracks'][0]['file'] == 'track07.json'
  assert 'tracks' not in room.text_query(word, 2)  # No library, no tracks.
  info = json.loads((tmp_path / 'library' / 'embed.json').read_text())
  info['params_sha256'] = '0' * 64
  (tmp_path / 'library' / 'embed.json').write_text(json.dumps(info))
  with pytest.raises(web.UserError, match='embedded by another model'):
    web.Room(config, workdir, data_dir, room.embedder.config.data.mard_dir)


def test_query_mode_answers_from_the_command_line(trained_room,
                                                  trained_config, tmp_path):
  from mardjax import modes  # pylint: disable=g-import-not-at-top
  from mardjax.serve import query  # pylint: disable=g-import-not-at-top
  _, workdir, room = trained_room
  config = trained_config
  word = room.embedder.vocab.words[6]
  out = modes.run_mode('query', config, workdir, show_progress=False,
                       text=f'{word} zzqxunknown', k=3)
  assert out['query'] == {'text': f'{word} zzqxunknown'}
  assert len(out['albums']) == 3 and out['unknown_words'] == ['zzqxunknown']
  assert out['albums'][0]['why_words'][0]['word'] == word
  text = query.describe(out)
  assert 'not known: zzqxunknown' in text and f'why: {word} +' in text
  doc = os.path.join(REAL_AB_DIR, REAL_DOCS[0])
  out = modes.run_mode('query', config, workdir, show_progress=False,
                       file=doc, k=2)
  assert len(out['reviews']) == 2 and out['reviews'][0]['why'] is not None
  assert 'Closest reviews:' in query.describe(out)
  write_tone(tmp_path / 'tone.wav', 2.0, 'wav')  # Analysed by Essentia.
  out = modes.run_mode('query', config, workdir, show_progress=False,
                       file=str(tmp_path / 'tone.wav'), k=2)
  assert len(out['albums']) == 2 and len(out['albums'][0]['why_audio']) == 4
  config.serve.max_audio_seconds = 1.0
  with pytest.raises(modes.UserError, match='analyses at most 1.0 s'):
    modes.run_mode('query', config, workdir, show_progress=False,
                   file=str(tmp_path / 'tone.wav'))
  fifo = tmp_path / 'pipe.json'
  os.mkfifo(fifo)
  (tmp_path / 'notes.txt').write_text('not music')
  (tmp_path / 'empty.json').write_text('')
  for kw, message in (
      ({}, 'one question'), ({'text': 'a', 'file': doc}, 'one question'),
      ({'text': word, 'k': 0}, r'--k must be in \[1, 100\]'),
      ({'text': 'zzqx wvvk'}, 'none of the words'),
      ({'text': ' '}, 'empty'),
      ({'file': str(tmp_path / 'missing.json')}, 'cannot be read'),
      ({'file': str(fifo)}, 'fifo'),
      ({'file': str(tmp_path / 'notes.txt')}, 'not a recording'),
      ({'file': str(tmp_path / 'empty.json')}, 'is empty'),
      ({'file': os.path.join(REAL_AB_DIR, 'bulk_lowlevel_response_sample.json'
                             )}, 'not an AcousticBrainz')):
    with pytest.raises(modes.UserError, match=message):
      modes.run_mode('query', config, workdir, show_progress=False, **kw)
