"""The step body under one device, pmap and shard_map gives the same update."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import test as test_config
from mardjax.models import layouts
from mardjax.models import two_branch
from mardjax.train import packing
from mardjax.train import train_step
from tests import step_helpers


def _setup(batch_norm, negatives='all', gather=True, kind='ranking',
           embedding_update='lazy'):
  config = test_config.get_config()
  config.train.embedding_update = embedding_update
  config.train.vocab_bucket = 8
  config.model.batch_norm = batch_norm
  config.loss.negatives = negatives
  config.loss.gather_across_devices = gather
  config.loss.kind = kind
  rng = np.random.default_rng(0)
  b, length, a = 16, 12, 10
  lengths = rng.integers(1, length + 1, b).astype(np.int32)
  tokens = rng.integers(2, 40, (b, length)).astype(np.int32)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  batch = {'audio': rng.normal(size=(b, a)).astype(np.float32),
           'tokens': tokens, 'lengths': lengths,
           # Uneven albums: devices hold different numbers of positives.
           'album': np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5, 0],
                             np.int32)}
  return config, batch


def _plan(config, devices=1):
  """The config's plan on this CPU with `devices` devices."""
  return step_helpers.cpu_plan(config, devices)


def _state(config, batch, axis_name):
  model = two_branch.build(config.model, vocab_size=40, bn_axis_name=axis_name)
  sample = {k: v[:4] for k, v in batch.items()}
  return train_step.create_state(model, config, _plan(config),
                                 jax.random.PRNGKey(0), sample)


def _prepare(state, batch, devices, positives=''):
  """(b, ...) batch -> what the state's step takes on `devices` devices
  (padded text; the ranking loss's positive lists as `positives` says)."""
  shaped = {k: v.reshape(devices, -1, *v.shape[1:]) for k, v in batch.items()}
  plan = dataclasses.replace(_plan(test_config.get_config()),
                             text_layout='padded', positives=positives)
  out = train_step.prepare_batch(state, shaped, plan, vocab_bucket=8)
  return {k: v[0] for k, v in out.items()} if devices == 1 else out


def _step(parallelism, config, mesh=None):
  return step_helpers.host_step(config, parallelism, mesh)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize('batch_norm,kind,negatives,embedding_update', [
    (False, 'ranking', 'all', 'dense'), (True, 'ranking', 'hardest:3', 'lazy'),
    (True, 'infonce', 'all', 'lazy'), (False, 'ranking', 'all', 'lazy')])
def test_pmap_equals_single_device_on_the_global_batch(batch_norm, kind,
                                                       negatives,
                                                       embedding_update):
  n = jax.local_device_count()
  assert n == 4
  config, raw = _setup(batch_norm, negatives, gather=True, kind=kind,
                       embedding_update=embedding_update)
  key = jax.random.PRNGKey(3)
  single = _state(config, raw, None)
  batch = _prepare(single, raw, 1)
  s1, m1 = _step('single', config)(single, batch, key)
  s1, _ = _step('single', config)(s1, batch, key)
  state = _state(config, raw, train_step.AXIS)
  sharded = _prepare(state, raw, n)
  step = _step('pmap', config)
  s2, m2 = step(state, sharded, key)
  s2, _ = step(s2, sharded, key)  # Two steps: Adam moments agree too.
  np.testing.assert_allclose(float(m2['loss']), float(m1['loss']), rtol=1e-5)
  _assert_trees_close(s1.params, s2.params)
  _assert_trees_close(s1.opt_state, s2.opt_state)
  _assert_trees_close(s1.embed_opt, s2.embed_opt)
  if batch_norm:
    _assert_trees_close(s1.batch_stats, s2.batch_stats)
  assert int(s2.step) == 2


@pytest.mark.slow
@pytest.mark.parametrize('gather,negatives', [(False, 'all'),
                                              (True, 'sampled:4'),
                                              (False, 'sampled:4')])
def test_shard_map_equals_pmap(gather, negatives):
  """Also with the ranking loss's positive lists, across devices or each
  device's own."""
  n = jax.local_device_count()
  config, batch = _setup(True, negatives, gather=gather)
  key = jax.random.PRNGKey(5)
  sharded = _prepare(_state(config, batch, None), batch, n,
                     _plan(config, 4).positives)
  assert 'positives' in sharded
  # Steps donate their input state: each wrapper gets its own copy.
  s_p, m_p = _step('pmap', config)(
      _state(config, batch, train_step.AXIS), sharded, key)
  mesh = train_step.make_mesh()
  s_s, m_s = _step('shard_map', config, mesh)(
      _state(config, batch, train_step.AXIS),
      train_step.shard_batch(sharded, mesh), key)
  np.testing.assert_allclose(float(m_s['loss']), float(m_p['loss']),
                             rtol=1e-6)
  # Gradients (Adam's first moment after one step is 0.1 * grad) agree
  # tightly; parameters to a small fraction of one Adam step (lr), since Adam
  # turns the round-off of a near-zero gradient into a full-size update.
  _assert_trees_close(s_p.opt_state[0].mu, s_s.opt_state[0].mu, rtol=1e-4,
                      atol=1e-7)
  _assert_trees_close(s_p.params, s_s.params, rtol=0,
                      atol=0.05 * config.train.learning_rate)
  _assert_trees_close(s_p.batch_stats, s_s.batch_stats, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize('gather', [True, False])
def test_positive_lists_train_as_every_pair(gather):
  """The ranking loss's hinges over each row's listed positives
  (`losses.positive_lists`) give the step of the hinges over every
  candidate (the same draws), under pmap across devices or per device."""
  n = jax.local_device_count()
  config, batch = _setup(True, 'sampled:4', gather=gather)
  key = jax.random.PRNGKey(7)
  options = _plan(config, 4).positives
  assert options == ('across' if gather else 'local')
  step = _step('pmap', config)
  results = []
  for positives in (options, ''):
    state = _state(config, batch, train_step.AXIS)
    sharded = _prepare(state, batch, n, positives)
    assert ('positives' in sharded) == bool(positives)
    results.append(step(state, sharded, key))
  (s1, m1), (s2, m2) = results
  for k in m1:
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5,
                               err_msg=k)
  _assert_trees_close(s1.opt_state, s2.opt_state, rtol=1e-4, atol=1e-7)


def test_a_step_reduces_the_loss_and_keeps_it_finite():
  config, batch = _setup(False, 'all', gather=False)
  config.train.learning_rate = 1e-2
  state = _state(config, batch, None)
  batch = _prepare(state, batch, 1)
  step = _step('single', config)
  key = jax.random.PRNGKey(0)
  first = None
  for _ in range(20):
    state, m = step(state, batch, key)
    assert np.isfinite(float(m['loss'])) and np.isfinite(float(m['grad_norm']))
    first = first if first is not None else float(m['loss'])
  assert float(m['loss']) < first


def _tables(tiny_records):
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  _, manifest = tiny_records
  return (manifest, input_pipeline.load_audio_table(manifest),
          input_pipeline.load_review_table(manifest, 64))


@pytest.mark.parametrize('album_tracks', [0, 3])
def test_device_assembly_matches_the_host_batches(tiny_records,
                                                  album_tracks):
  """Tokens, lengths, albums, track or album-LSTM audio and pretrained
  features gathered on the device are the host's batch."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  _, audio, reviews = _tables(tiny_records)
  reviews = dataclasses.replace(reviews, features=np.random.default_rng(
      0).normal(size=(len(reviews), 5)).astype(np.float32))
  kw = dict(batch_size=16, num_devices=1, seed=3, neighbourhood=True,
            reviews_per_album=2)
  tables = train_step.device_tables(reviews, audio, 64)
  host = input_pipeline.train_batches(reviews, audio, max_len=64,
                                      album_tracks=album_tracks, **kw)
  index = input_pipeline.train_indices(reviews, audio, **kw)
  layout = train_step.Layout(album_tracks=album_tracks)
  for _ in range(3):
    (pos_a, batch), (pos_b, idx) = next(host), next(index)
    assert pos_a == pos_b
    got = train_step.assemble(tables, {k: v[0] for k, v in idx.items()}, 64,
                              layout)
    assert set(got) == set(batch)
    for k, v in batch.items():
      np.testing.assert_array_equal(np.asarray(got[k]), v[0], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize('encoder,bucket,update,audio_encoder', [
    ('mean', 0, 'dense', 'track'), ('mean', 64, 'dense', 'track'),
    ('lstm', 0, 'dense', 'track'), ('lstm', 2, 'dense', 'track'),
    ('mean', 0, 'lazy', 'track'), ('lstm', 2, 'lazy', 'track'),
    ('mean', 64, 'dense', 'album_lstm'), ('mean', 0, 'lazy split', 'track')])
def test_index_step_equals_the_host_step(tiny_records, encoder, bucket,
                                         update, audio_encoder, monkeypatch):
  """Batches assembled on the device train exactly as the host's, on the
  padded layout, the mean encoder's flat layout (whose size the host
  sends, static) and the LSTM's packed rows (from the host's plan), with
  the dense update and the lazy one (slots from the host's word list;
  with the split bag-of-words, the host's planner sizes the list of
  tokens outside it as the host's compaction does), and with the album
  LSTM's audio."""
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.train import index_batches  # pylint: disable=g-import-not-at-top
  manifest, audio, reviews = _tables(tiny_records)
  config = test_config.get_config()
  config.model.text_encoder = encoder
  config.train.embedding_update = update.split()[0]
  config.train.split_bag = update == 'lazy split'
  config.train.vocab_bucket = 4
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 16)
  config.train.token_bucket = bucket
  config.train.lstm_pack_rows = bucket
  config.model.audio_encoder = audio_encoder
  tracks = two_branch.album_tracks(config)
  kw = dict(batch_size=16, num_devices=1, seed=0, neighbourhood=True,
            reviews_per_album=2)
  (_, first), = [next(input_pipeline.train_batches(
      reviews, audio, max_len=64, album_tracks=tracks, **kw))]
  model = two_branch.from_manifest(config, manifest)

  plan = _plan(config)

  def fresh():
    return train_step.create_state(model, config, plan, jax.random.PRNGKey(0),
                                   {k: v[0] for k, v in first.items()})
  host_step = _step('single', config)
  program = train_step.step_program('single', config.loss, max_len=64,
                                    device_assembly=True)
  tables = train_step.device_tables(reviews, audio, 64)
  a, b = fresh(), fresh()
  assert plan.positives == 'local'  # The test config's sampled negatives.
  planner = index_batches.Planner(
      config, plan, reviews, model.vocab_size if update != 'dense' else 0)
  sizes = train_step.ProgramSizes()
  key = jax.random.PRNGKey(5)
  seen_layouts = set()
  for (_, batch), (_, idx) in zip(
      input_pipeline.train_batches(reviews, audio, max_len=64,
                                   album_tracks=tracks, **kw),
      planner.with_plans(input_pipeline.train_indices(reviews, audio, **kw))):
    prepared = train_step.prepare_batch(a, batch, plan, 4, sizes=sizes)
    prepared = {k: v[0] for k, v in prepared.items()}
    planned, planned_layout = planner([idx], pmap=False)
    a, ma = host_step(a, prepared, key)
    idx = {k: idx[k][0] for k in ('rows', 'tracks')}
    layout = train_step.Layout(
        prepared['flat_review'].shape[0] if 'flat_review' in prepared else 0,
        album_tracks=tracks)
    if 'starts' in prepared:
      place, used = packing.plan(batch['lengths'], 64)
      idx['place'] = place[0]
      layout = layout._replace(
          packed_rows=packing.row_count(used, bucket, len(place[0])))
    # The host sends lists; the planner their width, and the step makes
    # them.
    assert 'positives' not in planned
    layout = layout._replace(positive_width=prepared['positives'].shape[-1])
    if update != 'dense':
      idx['vocab_ids'] = prepared['vocab_ids']
      np.testing.assert_array_equal(planned['vocab_ids'], idx['vocab_ids'])
    if 'rare_tokens' in prepared:
      layout = layout._replace(rare_tokens=prepared['rare_tokens'].shape[0])
      assert layout.rare_tokens > 0
    if layout.num_tokens:
      # The planner's flat size has a floor (`Planner._token_floor`): the
      # same layout with more padding positions (review B), the same step.
      assert planned_layout.num_tokens >= layout.num_tokens
      more = planned_layout.num_tokens - layout.num_tokens
      prepared['flat_review'] = np.concatenate([
          prepared['flat_review'],
          np.full(more, len(prepared['lengths']), np.int32)])
      layout = layout._replace(num_tokens=planned_layout.num_tokens)
    assert planned_layout == layout
    seen_layouts.add(layout)
    assembled = train_step.assemble(tables, idx, 64, layout,
                                    model.vocab_size)
    assert set(assembled) == set(prepared)
    assert assembled.pop('positives') == layout.positive_width
    for k, v in prepared.items():
      if k != 'positives':
        np.testing.assert_array_equal(np.asarray(assembled[k]), v,
                                      err_msg=k)
    b, mb = program(b, tables, idx, key, np.int32(0), layout)
    if int(a.step) == 4:
      break
  # The layout asked for was used (0: padded).
  assert all(max(x[:3]) > 0 for x in seen_layouts) == bool(bucket)
  assert float(ma['loss']) == float(mb['loss'])
  for x, y in zip(jax.tree_util.tree_leaves(a.params),
                  jax.tree_util.tree_leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_positive_list_width_starts_at_the_first_epochs_widest(
    tiny_records):
  """`step_builder.positive_widths`: one width, wider than the most rows one
  album holds in a batch of the first epoch, serves every batch that fits
  it (a narrower batch is widened, padding with -1); none without the
  lists."""
  import itertools  # pylint: disable=g-import-not-at-top
  from mardjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mardjax.train import losses  # pylint: disable=g-import-not-at-top
  from mardjax.train import step_builder  # pylint: disable=g-import-not-at-top
  _, audio, reviews = _tables(tiny_records)
  config = test_config.get_config()
  config.train.batch_size = 64
  widths = step_builder.positive_widths(config, _plan(config), reviews, audio)
  kw = dict(batch_size=64, seed=0, neighbourhood=True, reviews_per_album=2)
  most = input_pipeline.most_album_rows(reviews, input_pipeline.epoch_order(
      reviews, audio, epoch=0, **kw))
  assert widths.seen == [{'positives': losses.positive_width(most + 1)}]
  state = _state(*_setup(False, embedding_update='dense'), None)
  shapes = set()
  for _, batch in itertools.islice(input_pipeline.train_batches(
      reviews, audio, max_len=64, num_devices=1, **kw), 6):
    plan = dataclasses.replace(_plan(config), text_layout='padded',
                               positives='local')
    lists = train_step.prepare_batch(state, batch, plan, 8,
                                     widths=widths)['positives']
    natural = losses.positive_lists(batch['album'], False)
    np.testing.assert_array_equal(lists[..., :natural.shape[-1]], natural)
    assert (lists[..., natural.shape[-1]:] == -1).all()
    shapes.add(lists.shape)
  assert shapes == {(1, 64, losses.positive_width(most + 1))}
  config.loss.kind = 'infonce'
  assert not step_builder.positive_widths(config, _plan(config), reviews,
                                          audio).seen


def test_flat_layout_sizes_start_at_a_floor():
  """Batches of MARD-like lengths share one flat size (one program), at
  most a tenth above the largest batch's tokens; a batch beyond the floor
  gets its own size, which later batches that fit reuse."""
  from mardjax.data import tables  # pylint: disable=g-import-not-at-top
  from mardjax.train import index_batches  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  config.train.embedding_update, config.data.max_len = 'dense', 400
  config.train.token_bucket = 4096
  rng = np.random.default_rng(0)
  lengths = np.clip(rng.lognormal(4.5, 0.7, 50_000), 1, 400).astype(np.int32)
  reviews = tables.ReviewTable(
      tokens=np.ones(int(lengths.sum()), np.int32),
      offsets=np.cumsum(lengths) - lengths, lengths=lengths,
      album=np.zeros(len(lengths), np.int32))
  planner = index_batches.Planner(
      config, dataclasses.replace(_plan(config), positives=''), reviews, 0)
  batches = [rng.choice(len(lengths), (1, 1024), replace=False)
             for _ in range(200)]
  sizes = {planner.layout([{'rows': r}]).num_tokens for r in batches}
  most = max(int(lengths[r].sum()) for r in batches)
  assert len(sizes) == 1 and most <= sizes.pop() <= 1.1 * most + 4096
  longest = np.argsort(lengths)[-1024:][None]
  big = planner.layout([{'rows': longest}]).num_tokens
  assert big >= int(lengths[longest].sum())
  nearly = np.concatenate([longest[:, :1000], batches[0][:, :24]], 1)
  assert planner.layout([{'rows': nearly}]).num_tokens == big


def test_program_sizes_reuse_the_smallest_pair_that_fits():
  class Sync:  # Another process needs 30 rare tokens.
    def max(self, value):
      return max(value, 30)
  sizes = train_step.ProgramSizes(Sync())
  assert sizes({'vocab': 8, 'rare': 4}) == {'vocab': 8, 'rare': 30}
  assert sizes({'vocab': 16, 'rare': 4}) == {'vocab': 16, 'rare': 30}
  assert sizes({'vocab': 8, 'rare': 40}) == {'vocab': 8, 'rare': 40}
  # Both fit (8, 40) and (16, 30) fit; the smaller pair wins.
  assert sizes({'vocab': 8, 'rare': 10}) == {'vocab': 8, 'rare': 30}
  assert sizes({'vocab': 12, 'rare': 1}) == {'vocab': 16, 'rare': 30}
  assert len(sizes.seen) == 3


def test_learning_rate_schedule_warmup_scaling_and_cosine():
  config = test_config.get_config()
  config.train.update(learning_rate=1e-3, batch_size=512, lr_base_batch=128,
                      lr_scaling='sqrt', warmup_steps=10)
  assert train_step.peak_learning_rate(config) == pytest.approx(2e-3)
  sched = train_step.learning_rate_schedule(config)
  assert [float(sched(s)) for s in (0, 5, 10, 1000)] == pytest.approx(
      [0.0, 1e-3, 2e-3, 2e-3])
  config.train.update(lr_scaling='linear', lr_schedule='cosine',
                      lr_final_fraction=0.1)
  sched = train_step.learning_rate_schedule(config, num_steps=110)
  assert float(sched(10)) == pytest.approx(4e-3)
  assert float(sched(60)) == pytest.approx(4e-3 * (0.1 + 0.9 * 0.5))
  assert float(sched(110)) == pytest.approx(4e-4)
  with pytest.raises(ValueError, match='number of steps'):
    train_step.learning_rate_schedule(config)
  # The default is the paper's constant rate.
  plain = train_step.learning_rate_schedule(test_config.get_config())
  assert float(plain(0)) == float(plain(10 ** 6)) == pytest.approx(1e-3)


@pytest.mark.slow
@pytest.mark.parametrize('encoder,embedding_update', [
    ('mean', 'dense'), ('mean', 'lazy'), ('lstm', 'lazy'),
    ('lstm bidirectional', 'dense')])
def test_bfloat16_compute_trains_with_float32_state(encoder,
                                                    embedding_update):
  """bfloat16 products: parameters and optimizer moments stay float32, the
  embeddings are float32 and close to the float32 model's, and the loss
  falls as in float32 (the LSTM's directions a loop each, or both in one
  loop as on accelerators)."""
  config, batch = _setup(True, 'all', gather=False,
                         embedding_update=embedding_update)
  config.model.text_encoder = encoder.split()[0]
  config.model.lstm_loop = (encoder.split() + ['per_direction'])[1]
  config.train.learning_rate = 1e-2
  losses = {}
  for name in ('float32', 'bfloat16'):
    config.train.compute_dtype = name
    plan = _plan(config)
    model = two_branch.build(config.model, vocab_size=40,
                             dtype=train_step.compute_dtype(plan))
    state = train_step.create_state(model, config, plan,
                                    jax.random.PRNGKey(0),
                                    {k: v[:4] for k, v in batch.items()})
    if name == 'bfloat16':
      plain = model.clone(dtype=np.float32)
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      inputs = dict(audio=batch['audio'], tokens=batch['tokens'],
                    lengths=batch['lengths'])
      low, high = model.apply(variables, **inputs), plain.apply(
          variables, **inputs)
      for k in ('audio', 'text'):
        assert low[k].dtype == np.float32
        np.testing.assert_allclose(low[k], high[k], atol=0.05)
    step = _step('single', config)
    prepared = _prepare(state, batch, 1)
    history = []
    for _ in range(15):
      state, m = step(state, prepared, jax.random.PRNGKey(0))
      history.append(float(m['loss']))
    assert all(np.isfinite(history)) and history[-1] < history[0]
    for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state,
                                          state.embed_opt)):
      if hasattr(leaf, 'dtype') and np.issubdtype(leaf.dtype, np.floating):
        assert leaf.dtype == np.float32
    losses[name] = history
  np.testing.assert_allclose(losses['bfloat16'][-1], losses['float32'][-1],
                             rtol=0.2)


# 1e39 overflows float32 on purpose (the rate is cast where it is used).
@pytest.mark.filterwarnings('ignore:overflow encountered in cast')
@pytest.mark.parametrize('embedding_update', ['dense', 'lazy'])
@pytest.mark.parametrize('learning_rate', [1e30, 1e39])
def test_a_step_reported_finite_leaves_a_finite_state(embedding_update,
                                                      learning_rate):
  """`finite` is 1 only when the state the step wrote is finite: with an
  absurd learning rate the state goes non-finite within a few steps, and
  every step before is reported finite only with every leaf of its state
  finite, also when the rate (finite as a Python float) overflows float32
  and a finite gradient makes non-finite parameters; a non-finite input is
  reported at once."""
  config, raw = _setup(False, 'sampled:4', gather=False,
                       embedding_update=embedding_update)
  config.train.learning_rate = learning_rate
  state = _state(config, raw, None)
  batch = _prepare(state, raw, 1)
  step = _step('single', config)
  reported = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    finite = float(metrics['finite']) == 1.0
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state,
                                        state.embed_opt))
    if finite:
      assert all(np.isfinite(np.asarray(x)).all() for x in leaves), i
    reported.append(finite)
  # A rate beyond float32's range makes the very first step's state
  # non-finite (its loss and gradient were computed before, finite).
  assert reported[0] == (learning_rate < 3e38) and not all(reported)
  state = _state(config, raw, None)
  bad = dict(batch, audio=np.where(np.arange(batch['audio'].shape[1]) == 2,
                                   np.nan, batch['audio']))
  _, metrics = step(state, bad, jax.random.PRNGKey(0))
  assert float(metrics['finite']) < 1.0
