"""The execution plan: every 'auto' resolved once, in one module."""

import ast
import os

import pytest

from configs import default
from configs import test as test_config
from mardjax import plan as plan_lib
from mardjax.errors import UserError
from tests.conftest import ROOT


def _plan(config, backend='cpu', devices=1, processes=1):
  return plan_lib.resolve(config, backend=backend, devices=devices,
                          processes=processes)


def test_auto_fields_pick_per_backend():
  config = test_config.get_config()
  for field in ('embedding_update', 'batch_assembly'):
    assert config.train[field] == 'auto'
  assert config.model.lstm_loop == 'auto'
  cpu, gpu = _plan(config, 'cpu'), _plan(config, 'gpu')
  assert (cpu.embedding_update, cpu.batch_assembly, cpu.lstm_loop,
          cpu.prefetch_batches, cpu.steps_per_dispatch) == (
              'lazy', 'host', 'per_direction', 0, 1)
  assert (gpu.embedding_update, gpu.batch_assembly, gpu.lstm_loop,
          gpu.prefetch_batches) == ('dense', 'device', 'bidirectional', 2)
  config.train.embedding_update = 'dense'  # The CPU's dense update:
  assert _plan(config).batch_assembly == 'device'  # assembled there.
  # An explicit choice wins everywhere.
  config.train.update(embedding_update='lazy', prefetch_batches=3,
                      batch_assembly='device')
  config.model.lstm_loop = 'bidirectional'
  plan = _plan(config, 'gpu')
  assert (plan.embedding_update, plan.prefetch_batches, plan.batch_assembly,
          plan.lstm_loop) == ('lazy', 3, 'device', 'bidirectional')


def test_auto_steps_per_dispatch_divides_the_intervals():
  """On accelerators as many steps per dispatch as fit every log,
  checkpoint and evaluation interval, so no dispatch is cut short; one on
  CPUs."""
  config = default.get_config()
  assert _plan(config, 'gpu').steps_per_dispatch == 25  # 50/1000/1000.
  config.train.log_every = 48
  assert _plan(config, 'gpu').steps_per_dispatch == 8  # gcd 8.
  config.train.log_every, config.train.eval_every = 64, 512
  config.train.checkpoint_every = 1024
  assert _plan(config, 'gpu').steps_per_dispatch == 32  # The cap.
  config.train.log_every = 7
  assert _plan(config, 'gpu').steps_per_dispatch == 1
  assert _plan(config, 'cpu').steps_per_dispatch == 1


def test_auto_steps_per_dispatch_caps_the_examples_of_a_dispatch():
  """At large batches a step is long enough alone: a dispatch holds at
  most 65,536 examples of one process, so its indices stay small."""
  config = default.get_config()  # Intervals 50/1000/1000: divisors of 50.
  for batch, steps in ((1024, 25), (2048, 25), (4096, 10), (8192, 5),
                       (65536, 1), (131072, 1)):
    config.train.batch_size = batch
    assert _plan(config, 'gpu').steps_per_dispatch == steps, batch
  # The cap is per process: two processes of 8,192 each.
  config.train.batch_size = 16384
  assert _plan(config, 'gpu', processes=2).steps_per_dispatch == 5
  config.train.steps_per_dispatch = 25  # Asked for: not capped.
  assert _plan(config, 'gpu').steps_per_dispatch == 25


def test_parallelism_layout_and_positive_lists():
  config = test_config.get_config()
  assert _plan(config).parallelism == 'single'
  assert not _plan(config).parallel
  assert _plan(config, devices=4).parallelism == 'pmap'
  config.train.parallelism = 'shard_map'
  assert _plan(config, devices=2).parallelism == 'shard_map'
  # The mean encoder: split bag under the lazy update, flat under dense.
  assert _plan(config).text_layout == 'split_bag'
  config.train.embedding_update = 'dense'
  plan = _plan(config)
  assert (plan.text_layout, plan.token_bucket) == (
      'flat', config.train.token_bucket)
  config.model.text_encoder = 'lstm'
  plan = _plan(config)
  assert (plan.text_layout, plan.pack_rows, plan.token_bucket) == (
      'packed', config.train.lstm_pack_rows, 0)
  config.model.text_encoder = 'pretrained'
  assert _plan(config).text_layout == 'features'
  # Positive lists: the ranking loss, across devices when it gathers
  # candidates from all of them, none across processes.
  config.loss.gather_across_devices = True
  assert _plan(config).positives == 'local'
  assert _plan(config, devices=4).positives == 'across'
  config.train.parallelism = 'pmap'  # Across processes.
  assert _plan(config, devices=4, processes=2).positives == ''
  config.loss.kind = 'infonce'
  assert _plan(config).positives == ''


def test_optimizer_state_is_sharded_under_shard_map_on_one_process():
  config = test_config.get_config()
  assert config.train.optimizer_sharding == 'auto'
  assert _plan(config, devices=4).optimizer_sharding == 'replicated'  # pmap
  config.train.parallelism = 'shard_map'
  assert _plan(config, 'gpu', devices=4).optimizer_sharding == 'sharded'
  assert _plan(config, devices=1).optimizer_sharding == 'replicated'
  config.train.optimizer_sharding = 'replicated'
  assert _plan(config, devices=4).optimizer_sharding == 'replicated'
  config.train.parallelism = 'pmap'
  config.train.optimizer_sharding = 'sharded'
  with pytest.raises(UserError, match="parallelism='shard_map'"):
    _plan(config, devices=4)
  config.train.optimizer_sharding = 'zero'
  with pytest.raises(UserError, match='optimizer_sharding'):
    _plan(config, devices=4)


def test_combinations_not_served_are_one_clear_error():
  config = test_config.get_config()
  config.train.steps_per_dispatch = 8
  with pytest.raises(UserError, match='steps_per_dispatch=8 needs batches'):
    _plan(config)  # Lazy on a CPU: host assembly.
  config.train.batch_assembly = 'device'
  assert _plan(config).steps_per_dispatch == 8
  config.train.parallelism = 'shard_map'
  for assembly in ('device', 'host'):  # Each process would train alone.
    config.train.batch_assembly = assembly
    with pytest.raises(UserError, match='shard_map.* across processes is not'
                       ' served'):
      _plan(config, devices=2, processes=2)
  config.train.batch_assembly = 'device'
  config.model.lstm_loop = 'fused'
  with pytest.raises(UserError, match="lstm_loop='fused'"):
    _plan(config)


def test_plan_is_logged_and_recorded_as_a_dict():
  plan = _plan(test_config.get_config())
  line = plan.describe()
  assert 'embedding_update=lazy' in line and 'batch_assembly=host' in line
  record = plan.asdict()
  assert plan_lib.Plan(**record) == plan
  assert 'auto' not in record.values()


def _auto_comparisons(path):
  """Lines of `path` that compare a value with the string 'auto' or look it
  up by that key."""
  tree = ast.parse(open(path).read())
  lines = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Compare):
      operands = [node.left, *node.comparators]
      for operand in operands:
        if isinstance(operand, ast.Constant) and operand.value == 'auto':
          lines.append(node.lineno)
    elif isinstance(node, ast.Constant) and node.value == 'auto':
      lines.append(node.lineno)
  return sorted(set(lines))


def auto_sites(root):
  """{module path: lines} of every 'auto' literal under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        lines = _auto_comparisons(path)
        if lines:
          out[os.path.relpath(path, ROOT)] = lines
  return out


def test_auto_is_resolved_in_the_plan_module_only(tmp_path):
  assert list(auto_sites(os.path.join(ROOT, 'mardjax'))) == [
      os.path.join('mardjax', 'plan.py')]
  # The check itself: a module that resolves 'auto' again is named.
  probe = tmp_path / 'probe.py'
  probe.write_text("def f(config):\n"
                   "  return 1 if config.x == 'auto' else 2\n")
  assert auto_sites(str(tmp_path)) == {os.path.relpath(str(probe), ROOT):
                                       [2]}
