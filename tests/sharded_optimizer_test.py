"""The optimizer state sharded over the devices trains as the replicated
one does (`mardjax.train.sharded_optimizer`)."""

import jax
import numpy as np
import pytest

from mardjax.models import two_branch
from mardjax.train import train_step
from tests import step_helpers
from tests.train_step_test import _assert_trees_close
from tests.train_step_test import _prepare
from tests.train_step_test import _setup


def _state(config, batch, vocab_size):
  """A fresh state for the 4-device step with a word table of
  `vocab_size` rows."""
  model = two_branch.build(config.model, vocab_size=vocab_size,
                           bn_axis_name=train_step.AXIS)
  sample = {k: v[:4] for k, v in batch.items()}
  return train_step.create_state(model, config,
                                 step_helpers.cpu_plan(config),
                                 jax.random.PRNGKey(0), sample)


@pytest.mark.slow
@pytest.mark.parametrize('embedding_update,vocab_size,batch_norm', [
    ('dense', 42, True), ('dense', 40, False), ('lazy', 42, False)])
def test_sharded_optimizer_state_equals_the_replicated(embedding_update,
                                                       vocab_size,
                                                       batch_norm):
  """shard_map with the large optimizer leaves split by rows over the 4
  devices (a reduce-scatter of their gradient, each device updating its
  rows, an all-gather of the new rows) trains as the replicated state does,
  over two steps (Adam's moments included), with the word table's rows
  padded to a multiple of the devices (42) or not (40); each device holds
  a quarter of those moments, and the state checkpoints hold is shaped as
  the parameters are."""
  n = jax.local_device_count()
  config, batch = _setup(batch_norm, 'sampled:4', gather=True,
                         embedding_update=embedding_update)
  config.train.parallelism = 'shard_map'
  config.train.optimizer_shard_min_size = 64
  plan = step_helpers.cpu_plan(config, n)
  assert plan.optimizer_sharding == 'sharded'
  key = jax.random.PRNGKey(11)
  mesh = train_step.make_mesh()
  runs = []
  for sharded in (False, True):
    state = _state(config, batch, vocab_size)
    sharding = (train_step.optimizer_sharding(
        state, plan, config.train.optimizer_shard_min_size) if sharded
                else None)
    program = train_step.step_program('shard_map', config.loss, mesh=mesh,
                                      sharding=sharding)
    inputs = train_step.shard_batch(
        _prepare(state, batch, n, plan.positives), mesh)
    state = train_step.place_state(state, mesh, sharding)
    for i in range(2):
      state, metrics = program(state, None, inputs, key, np.int32(i),
                               train_step.Layout())
    runs.append((state, metrics, sharding))
  (s_r, m_r, _), (s_s, m_s, sharding) = runs
  flags = sharding.tree(train_step.optimizer_params(s_s))
  mu = s_s.opt_state[0].mu
  big = [(f, x) for f, x in zip(jax.tree_util.tree_leaves(flags),
                                jax.tree_util.tree_leaves(mu)) if f]
  assert big and not all(jax.tree_util.tree_leaves(flags))
  for _, x in big:  # A quarter of the rows (padded) on each device.
    assert x.addressable_shards[0].data.shape[0] == -(-x.shape[0] // n) or (
        x.addressable_shards[0].data.shape[0] * n == x.shape[0])
  if embedding_update == 'dense':
    table = s_s.opt_state[0].mu['text_features']['embed']['embedding']
    assert table.shape[0] == -(-vocab_size // n) * n
    assert table.addressable_shards[0].data.shape[0] == table.shape[0] // n
  for k in m_r:
    np.testing.assert_allclose(float(m_s[k]), float(m_r[k]), rtol=1e-5,
                               err_msg=k)
  saved = train_step.saveable_state(s_s, sharding)
  for x, p in zip(jax.tree_util.tree_leaves(saved.opt_state[0].mu),
                  jax.tree_util.tree_leaves(
                      train_step.optimizer_params(saved))):
    assert x.shape == p.shape
  _assert_trees_close(s_r.opt_state, saved.opt_state, rtol=1e-4, atol=1e-7)
  _assert_trees_close(s_r.params, s_s.params, rtol=0,
                      atol=0.05 * config.train.learning_rate)
  if batch_norm:
    _assert_trees_close(s_r.batch_stats, s_s.batch_stats, rtol=1e-5,
                        atol=1e-6)
