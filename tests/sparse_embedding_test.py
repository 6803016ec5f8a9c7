"""Row-sparse embedding training: compaction, lazy Adam, the lazy step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import test as test_config
from mardjax.models import layouts
from mardjax.models import two_branch
from mardjax.train import sparse_embedding
from mardjax.train import train_step
from tests import step_helpers


def test_compact_batch_maps_slots_back_to_the_tokens():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 3, 7)).astype(np.int32)
  out = sparse_embedding.compact_batch({'tokens': tokens, 'x': 1}, 50, 8)
  ids = out['vocab_ids']
  assert 'tokens' not in out and out['x'] == 1
  assert ids.shape[1] % 8 == 0 and ids.shape[1] >= len(np.unique(tokens))
  np.testing.assert_array_equal(ids[0], ids[1])  # Same on every device.
  real = ids[0][ids[0] < 50]
  np.testing.assert_array_equal(real, np.unique(tokens))
  assert len(np.unique(ids[0])) == ids.shape[1]  # Padding ids distinct too.
  for d in range(2):
    np.testing.assert_array_equal(ids[d][out['slots'][d]], tokens[d])


def test_compact_batch_lists_the_tokens_outside_the_bag(monkeypatch):
  """'rare_tokens': the flat positions of the real tokens whose slot is
  BAG_SLOTS or beyond, in order, padded with b * L to a bucket over the
  fullest device."""
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 2)
  tokens = np.array([[[5, 9, 7, 0], [9, 5, 5, 5]],
                     [[3, 0, 0, 0], [7, 7, 7, 0]]], np.int32)
  lengths = np.array([[3, 4], [1, 3]], np.int32)
  out = sparse_embedding.compact_batch(
      {'tokens': tokens, 'lengths': lengths}, 10, 4, split_bag=True)
  # Distinct ids 0, 3, 5, 7, 9: slots >= 2 are words 5, 7 and 9. Device 0:
  # positions 0, 1, 2 (review 0) and 4, 5, 6, 7 (review 1); device 1:
  # 4, 5, 6 (review 1's three 7s), the padding 0s excluded.
  np.testing.assert_array_equal(out['rare_tokens'],
                                [[0, 1, 2, 4, 5, 6, 7, 8],
                                 [4, 5, 6, 8, 8, 8, 8, 8]])
  assert 'rare_tokens' not in sparse_embedding.compact_batch(
      {'tokens': tokens, 'lengths': lengths}, 10, 4)


def test_compact_batch_reads_only_the_real_tokens():
  """With lengths, words past a review's length are not listed (the
  padding word, id 0, is when there is padding) and their slots point at
  the padding word; packed rows (the LSTM) are read whole."""
  tokens = np.array([[[4, 6, 8, 9], [6, 2, 7, 7]]], np.int32)  # Junk past.
  lengths = np.array([[2, 3]], np.int32)
  out = sparse_embedding.compact_batch(
      {'tokens': tokens, 'lengths': lengths}, 10, 4)
  np.testing.assert_array_equal(out['vocab_ids'][0][:5], [0, 2, 4, 6, 7])
  assert out['vocab_ids'][0][5:].min() >= 10  # Padding ids.
  np.testing.assert_array_equal(out['slots'], [[[2, 3, 0, 0], [3, 1, 4, 0]]])
  full = sparse_embedding.compact_batch(
      {'tokens': tokens, 'lengths': np.array([[4, 4]], np.int32)}, 10, 4)
  np.testing.assert_array_equal(full['vocab_ids'][0][:5], [2, 4, 6, 7, 8])
  packed = sparse_embedding.compact_batch(
      {'tokens': tokens, 'lengths': lengths, 'starts': tokens}, 10, 4)
  np.testing.assert_array_equal(packed['vocab_ids'][0][:6],
                                [2, 4, 6, 7, 8, 9])


def test_compact_batch_rejects_ids_outside_the_vocabulary():
  for bad in (60, 50, -1):  # Above, at V, and below (no wrapping around).
    with pytest.raises(ValueError, match=f'id {bad} is outside the vocab'):
      sparse_embedding.compact_batch(
          {'tokens': np.array([[[1, bad]]], np.int32)}, 50, 8)


def test_lazy_adam_equals_optax_adam_when_every_row_is_used():
  rng = np.random.default_rng(1)
  table = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
  ids = jnp.asarray([0, 1, 2, 3, 4, 5, 6, 7], jnp.int32)  # 6, 7: padding.
  tx = optax.adam(0.01)
  dense, opt = table, tx.init(table)
  lazy, state = table, sparse_embedding.init(table)
  for step in range(1, 4):
    g = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
    updates, opt = tx.update(g, opt, dense)
    dense = optax.apply_updates(dense, updates)
    row_grads = jnp.concatenate([g, jnp.ones((2, 4))])  # Padding: ignored.
    lazy, state = sparse_embedding.lazy_adam(
        lazy, state, ids, row_grads, jnp.int32(step), learning_rate=0.01)
  np.testing.assert_allclose(lazy, dense, rtol=1e-6, atol=1e-7)
  # The moments' multiply-add may be fused (one rounding instead of two):
  # a few units in the last place of the operands, not of the result.
  np.testing.assert_allclose(state.moments[:, 0], opt[0].mu, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(state.moments[:, 1], opt[0].nu, rtol=1e-6,
                             atol=1e-9)


def test_lazy_adam_leaves_other_rows_alone():
  rng = np.random.default_rng(2)
  table = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
  state = sparse_embedding.init(table)
  ids = jnp.asarray([1, 4, 6, 7], jnp.int32)
  g = jnp.asarray(rng.normal(size=(4, 4)).astype(np.float32))
  new, new_state = sparse_embedding.lazy_adam(
      table, state, ids, g, jnp.int32(1), learning_rate=0.1)
  new, table, g = np.asarray(new), np.asarray(table), np.asarray(g)
  untouched = np.array([0, 2, 3, 5])
  np.testing.assert_array_equal(new[untouched], table[untouched])
  np.testing.assert_array_equal(np.asarray(new_state.moments)[untouched], 0)
  # Adam's first step moves every used coordinate by lr against its sign.
  np.testing.assert_allclose(new[[1, 4]] - table[[1, 4]],
                             -0.1 * np.sign(g[:2]), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize('encoder,pooling,warmup,token_bucket,split', [
    ('mean', 'mean', 0, 0, False), ('mean', 'mean', 0, 16, False),
    ('lstm', 'mean', 0, 0, False), ('mean', 'idf', 3, 16, False),
    ('mean', 'mean', 0, 0, True), ('mean', 'idf', 0, 0, True)])
def test_lazy_step_equals_dense_step(encoder, pooling, warmup, token_bucket,
                                     split, monkeypatch):
  """From the same state, one lazy step = one dense Adam step (rows unused by
  the batch have zero gradient and zero moments, so dense Adam leaves them
  alone too); a second step on the same rows agrees as well, also with
  the IDF-weighted mean (its word scores are the table's last column) and
  a warmup schedule (both updates read the same step's learning rate), on
  the mean encoder's flat layout (token_bucket > 0) as on the padded, and
  with the bag-of-words product split (most tokens summed one by one)."""
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 5)
  config = test_config.get_config()
  config.model.text_encoder = encoder
  config.model.pooling = pooling
  config.train.warmup_steps = warmup
  config.loss.negatives = 'all'
  rng = np.random.default_rng(3)
  b, length, vocab = 8, 9, 30
  lengths = rng.integers(0, length + 1, b).astype(np.int32)  # One may be 0.
  tokens = rng.integers(2, vocab, (b, length)).astype(np.int32)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  batch = {'audio': rng.normal(size=(b, 5)).astype(np.float32),
           'tokens': tokens, 'lengths': lengths,
           'album': np.repeat(np.arange(b // 2), 2).astype(np.int32)}
  model = two_branch.build(config.model, vocab)
  states = {}
  for update in ('dense', 'lazy'):
    config.train.embedding_update = update
    plan = step_helpers.cpu_plan(
        config, positives='', token_bucket=token_bucket,
        text_layout=('flat' if token_bucket else 'split_bag'
                     if split and update == 'lazy' else 'padded'))
    state = train_step.create_state(model, config, plan,
                                    jax.random.PRNGKey(0), batch)
    prepared = train_step.prepare_batch(
        state, {k: v[None] for k, v in batch.items()}, plan, vocab_bucket=4)
    assert ('flat_review' in prepared) == bool(token_bucket)
    if split and update == 'lazy':
      assert prepared['rare_tokens'].shape[1] > 20
    prepared = {k: v[0] for k, v in prepared.items()}
    step = step_helpers.host_step(config)
    key = jax.random.PRNGKey(1)
    state, metrics = step(state, prepared, key)
    state, metrics = step(state, prepared, key)
    states[update] = (state, metrics)
  (dense, m_dense), (lazy, m_lazy) = states['dense'], states['lazy']
  np.testing.assert_allclose(m_lazy['loss'], m_dense['loss'], rtol=1e-5)
  np.testing.assert_allclose(m_lazy['grad_norm'], m_dense['grad_norm'],
                             rtol=1e-4)
  for x, y in zip(jax.tree_util.tree_leaves(lazy.params),
                  jax.tree_util.tree_leaves(dense.params)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  assert lazy.embed_opt is not None and dense.embed_opt is None


@pytest.mark.slow
def test_split_bag_padded_to_an_earlier_programs_sizes_trains_the_same(
    monkeypatch):
  """Longer word and token lists (`train_step.ProgramSizes` reusing a
  larger program) leave the step's parameters unchanged to the bit."""
  monkeypatch.setattr(layouts, 'BAG_SLOTS', 5)
  config = test_config.get_config()
  config.train.embedding_update = 'lazy'
  rng = np.random.default_rng(5)
  b, length, vocab = 8, 9, 30
  lengths = rng.integers(1, length + 1, b).astype(np.int32)
  tokens = rng.integers(2, vocab, (b, length)).astype(np.int32)
  tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
  batch = {'audio': rng.normal(size=(1, b, 5)).astype(np.float32),
           'tokens': tokens[None], 'lengths': lengths[None],
           'album': np.repeat(np.arange(b // 2), 2).astype(np.int32)[None]}
  model = two_branch.build(config.model, vocab)
  sizes = train_step.ProgramSizes()
  sizes.seen.append({'vocab': 64, 'rare': 96})
  params = []
  for padded in (None, sizes):
    plan = step_helpers.cpu_plan(config, positives='',
                                 text_layout='split_bag')
    state = train_step.create_state(model, config, plan,
                                    jax.random.PRNGKey(0),
                                    {k: v[0] for k, v in batch.items()})
    prepared = train_step.prepare_batch(state, batch, plan, 4, sizes=padded)
    assert (prepared['rare_tokens'].shape[1] == 96) == bool(padded)
    step = step_helpers.host_step(config)
    for _ in range(2):
      state, _ = step(state, {k: v[0] for k, v in prepared.items()},
                      jax.random.PRNGKey(1))
    params.append(state.params)
  for x, y in zip(*map(jax.tree_util.tree_leaves, params)):
    np.testing.assert_array_equal(x, y)


def test_a_lazy_state_refuses_an_unprepared_batch():
  config = test_config.get_config()
  rng = np.random.default_rng(4)
  batch = {'audio': rng.normal(size=(4, 5)).astype(np.float32),
           'tokens': rng.integers(2, 9, (4, 3)).astype(np.int32),
           'lengths': np.full(4, 3, np.int32),
           'album': np.array([0, 0, 1, 1], np.int32)}
  state = train_step.create_state(two_branch.build(config.model, 10), config,
                                  step_helpers.cpu_plan(config),
                                  jax.random.PRNGKey(0), batch)
  with pytest.raises(ValueError, match='prepare_batch'):
    step_helpers.host_step(config)(state, batch, jax.random.PRNGKey(0))
