"""The benchmark mode prints well-formed JSON lines (figures not asserted)."""

import pytest

from configs import test as test_config
from mardjax import modes
from mardjax.experiments import benchmark


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


def test_train_step_benchmark_line():
  config = test_config.get_config()
  line = benchmark.train_step_throughput(config, 'mean', steps=2,
                                         vocab_size=100)
  assert line['benchmark'] == 'train_step_mean'
  assert line['examples_per_s'] > 0 and line['target_examples_per_s'] == 3000


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
