"""The benchmark mode prints well-formed JSON lines (figures not asserted)."""

import json

import jax
import numpy as np
import pytest

from configs import test as test_config
from mardjax import modes
from mardjax.experiments import benchmark
from mardjax.experiments import measuring
from tests.conftest import ROOT


def test_data_benchmark_measures_both_stages(tmp_path, capsys):
  config = test_config.get_config()
  result = benchmark.run_data(config, str(tmp_path))
  names = [line['benchmark'] for line in result['benchmarks']]
  assert names == ['synth', 'preprocess']
  for line in result['benchmarks']:
    assert line['ok'] and line['wall_s'] > 0 and line['peak_rss_mb'] > 0
    assert isinstance(line['meets_targets'], bool)
  assert result['benchmarks'][1]['result']['tracks'] == 180
  assert capsys.readouterr().out.count('"benchmark"') == 2


@pytest.mark.parametrize('assembly', ['host', 'device'])
def test_train_step_benchmark_line(assembly):
  config = test_config.get_config()
  config.train.batch_assembly = assembly
  line = measuring.train_step_throughput(config, 'mean', steps=2,
                                         vocab_size=100)
  assert line['benchmark'] == 'train_step_mean'
  assert (line['embedding_update'], line['batch_assembly']) == (
      'lazy', assembly)
  assert line['examples_per_s'] > 0 and line['target_examples_per_s'] == 3000


def test_train_benchmark_lines_per_encoder_batch_and_update(tmp_path,
                                                           capsys):
  config = test_config.get_config()
  config.benchmark.update(kind='train', encoders='mean,lstm',
                          batch_sizes='8,16', embedding_updates='lazy,dense',
                          train_steps=2)
  result = modes.run_mode('benchmark', config, str(tmp_path))
  got = [(l['benchmark'], l['batch_size'], l['embedding_update'],
          l['batch_assembly']) for l in result['benchmarks']]
  # Assembled where training would: 'auto' keeps lazy on this CPU's host.
  assert got == [(f'train_step_{e}', b, u, a) for e in ('mean', 'lstm')
                 for b in (8, 16)
                 for u, a in (('lazy', 'host'), ('dense', 'device'))]
  assert capsys.readouterr().out.count('"benchmark"') == 8


def test_train_benchmark_lines_per_lstm_loop(tmp_path):
  config = test_config.get_config()
  config.benchmark.update(kind='train', encoders='mean,lstm', batch_sizes='8',
                          lstm_loops='per_direction,bidirectional',
                          train_steps=2)
  result = modes.run_mode('benchmark', config, str(tmp_path))
  # The loops are the LSTM's: the mean encoder's line is one, unmarked.
  assert [(l['benchmark'], l.get('lstm_loop')) for l in result['benchmarks']
          ] == [('train_step_mean', None),
                ('train_step_lstm', 'per_direction'),
                ('train_step_lstm', 'bidirectional')]


def test_auto_embedding_update_picks_per_backend(monkeypatch):
  from mardjax.train import train_step  # pylint: disable=g-import-not-at-top
  config = test_config.get_config()
  assert config.train.embedding_update == 'auto'
  assert train_step.embedding_update(config) == 'lazy'  # This CPU.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert train_step.embedding_update(config) == 'dense'
  config.train.embedding_update = 'lazy'  # An explicit choice wins.
  assert train_step.embedding_update(config) == 'lazy'


def test_step_timing_runs_until_its_minimum_time(monkeypatch):
  """`measuring._timed`: the asked-for dispatches, then doubling rounds
  until the minimum time has passed (on a fake clock: each dispatch takes
  10 ms of it)."""
  clock, calls = [0.0], []
  monkeypatch.setattr(measuring.time, 'time', lambda: clock[0])

  def step(state):
    calls.append(state)
    clock[0] += 0.01
    return state + 1, np.zeros(())
  assert measuring._timed(step, 0, 3, 0.0) == (3, pytest.approx(0.03))
  calls.clear()
  # 3 take 0.03 s, then 3 more (0.06 s), then 6 more (0.12 s).
  assert measuring._timed(step, 0, 3, 0.1) == (12, pytest.approx(0.12))
  assert calls == list(range(12))  # Each dispatch takes the last state.


def test_pipeline_benchmark_compares_with_the_step(tmp_path):
  config = test_config.get_config()
  config.benchmark.pipeline_batches = 3
  config.benchmark.train_steps = 2
  result = benchmark.run_pipeline(config, str(tmp_path))
  step, line = result['benchmarks']
  assert line['benchmark'] == 'input_pipeline' and line['batches'] == 3
  assert line['examples_per_s'] > 0
  assert line['ratio'] == pytest.approx(
      line['examples_per_s'] / step['examples_per_s'], rel=0.01)


def test_train_loop_benchmark_runs_the_real_loop_without_tensorflow(tmp_path):
  code = (
      'import sys, json\n'
      'sys.modules["tensorflow"] = None  # As on GPU machines without it.\n'
      'from configs import test as test_config\n'
      'from mardjax import modes\n'
      'config = test_config.get_config()\n'
      'config.benchmark.update(kind="train_loop", loop_albums=40,\n'
      '    loop_tracks=90, loop_reviews=300, loop_dev_reviews=30,\n'
      '    train_loop_steps=6, train_steps=2, loop_step_seconds=0.05)\n'
      'config.train.update(eval_every=3, checkpoint_every=3)\n'
      f'out = modes.run_mode("benchmark", config, {str(tmp_path)!r},\n'
      '                      show_progress=False)\n'
      'print(json.dumps(out["benchmarks"][0]))\n'
      'print(any(m.startswith("tensorflow") and sys.modules[m] is not None\n'
      '          for m in sys.modules))\n')
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  line, tensorflow_loaded = json.loads(out[-2]), out[-1]
  assert tensorflow_loaded == 'False'
  assert line['benchmark'] == 'train_loop' and line['steps'] == 6
  assert line['evaluations'] == 3  # Steps 0, 3 and 6.
  # The test config's lazy update on a CPU: 'auto' assembles on the host.
  assert (line['batch_assembly'], line['steps_per_dispatch']) == ('host', 1)
  assert line['end_to_end_examples_per_s'] > 0
  assert line['step_examples_per_s'] == pytest.approx(
      sum(line['step_examples_per_s_before_after']) / 2, abs=0.1)
  assert min(line['step_examples_per_s_before_after']) > 0
  assert 0 < line['eval_share'] < 1 and 0 < line['checkpoint_share'] < 1
  # The step compiles in the loop; the projection counts that once.
  assert line['compiles'] >= 1 and 0 < line['compile_share'] < 1
  compile_s = line['compile_share'] * line['loop_s']
  rest = line['steps'] * line['batch_size'] / (line['loop_s'] - compile_s)
  assert line['share_of_step_excluding_compile'] == pytest.approx(
      rest / line['step_examples_per_s'], rel=0.01, abs=1e-3)  # 3 decimals.
  assert line['projected_200_epochs_s'] == pytest.approx(
      compile_s + 200 * 300 / rest, rel=0.01)
