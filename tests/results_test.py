"""Benchmark records: what a run records, and the tables rendered from them
(synthetic records; no figure is measured here)."""

import json
import re

import pytest

from configs import test as test_config
from mardjax import modes
from mardjax.experiments import benchmark
from mardjax.experiments import results

CPU = {'backend': 'cpu', 'cpu': 'Test CPU', 'device_count': 1,
       'host_cores': 2, 'memory_gib': 8.0}
GPU = {'backend': 'gpu', 'cpu': 'Host CPU', 'device_count': 1,
       'host_cores': 16, 'memory_gib': 128.0, 'device_kind': 'Test GPU'}
VERSIONS = {'python': '3.11.0', 'jax': '0.1', 'jaxlib': '0.1',
            'flax': '0.1', 'optax': '0.1', 'numpy': '2.0', 'torch': '2.0'}


def _run(machine, date, tag):
  return {'id': f'{date}-abc1234-{tag}', 'kind': 'train', 'date': date,
          'commit': 'abc1234', 'machine': machine, 'versions': VERSIONS,
          'config': {'train.batch_size': 128}}


def _train_lines(ours_mean, ours_lstm, peers):
  """Our two default-batch lines and the peer's variants
  ({variant: examples/s}), as `benchmark.run_train` writes them."""
  lines = [{'benchmark': f'train_step_{e}', 'encoder': e, 'batch_size': 128,
            'examples_per_s': rate, 'steps': 10, 'seconds': 5.0,
            'embedding_update': 'lazy', 'config_default': True}
           for e, rate in (('mean', ours_mean), ('lstm', ours_lstm))]
  for variant, rate in peers.items():
    lines.append({'benchmark': f'peer_train_step_{variant.split()[0]}',
                  'peer': True, 'encoder': variant.split()[0],
                  'batch_size': 128, 'variant': variant,
                  'examples_per_s': rate})
  lines.append({'benchmark': 'peer_train_step_lstm', 'peer': True,
                'encoder': 'lstm', 'batch_size': 128,
                'variant': 'lstm broken', 'error': 'RuntimeError: boom'})
  lines.append({'skipped': 'train_step_lstm at batch 8192',
                'why': 'needs about 60.0 GiB', 'encoder': 'lstm',
                'batch_size': 8192})
  return lines


@pytest.fixture
def records_dir(tmp_path):
  """Two runs on each of two machines; the newer one of each to show."""
  d = tmp_path / 'results'
  peers = {'mean dense': 1000.0, 'mean sparse': 2000.0,
           'lstm packed': 50.0, 'lstm padded': 40.0}
  # Written newest first: the file's order must not decide.
  for machine, date, tag, mean in (
      (CPU, '2024-03-01T00:00:00Z', 'aaa', 7000.0),
      (CPU, '2024-01-01T00:00:00Z', 'bbb', 1111.0),
      (GPU, '2024-02-01T00:00:00Z', 'ccc', 90000.0),
      (GPU, '2024-01-15T00:00:00Z', 'ddd', 2222.0)):
    results.append(str(d), 'train', _train_lines(mean, 150.0, peers),
                   _run(machine, date, tag))
  loop = {'benchmark': 'train_loop', 'text_encoder': 'mean',
          'batch_size': 128, 'steps': 100, 'end_to_end_share_of_step': 0.8,
          'end_to_end_examples_per_s': 5600.0, 'step_examples_per_s': 7000.0}
  results.append(str(d), 'train_loop', [loop],
                 dict(_run(CPU, '2024-03-02T00:00:00Z', 'eee'),
                      kind='train_loop'))
  return d


def test_a_run_names_its_machine_versions_commit_and_date():
  run = results.new_run(test_config.get_config(), 'train')
  assert {'backend', 'cpu', 'device_count', 'host_cores'} <= set(
      run['machine'])
  assert run['machine']['backend'] == 'cpu' and run['machine']['cpu']
  assert {'python', 'jax', 'jaxlib', 'flax', 'optax', 'numpy'} <= set(
      run['versions']) and 'torch' not in run['versions']
  assert re.fullmatch(r'[0-9a-f]{4,}(-dirty)?|unknown', run['commit'])
  assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', run['date'])
  assert run['id'].startswith(f"{run['date']}-{run['commit']}-")
  assert run['config']['train.batch_size'] == 32
  assert results.versions(torch='2.0')['torch'] == '2.0'


def test_commit_outside_a_checkout_is_unknown(tmp_path):
  assert results.commit(str(tmp_path)) == 'unknown'


def test_the_benchmark_mode_records_every_line_with_its_run(tmp_path):
  config = test_config.get_config()
  config.benchmark.update(kind='eval', eval_albums=40, eval_reviews=60,
                          eval_query_albums=10,
                          results_dir=str(tmp_path / 'results'))
  config.eval.bootstrap = 5
  for _ in range(2):  # Two runs append to the same file.
    modes.run_mode('benchmark', config, str(tmp_path))
  lines = results.load(str(tmp_path / 'results'))['eval']
  assert [l['benchmark'] for l in lines] == ['evaluation'] * 2
  assert lines[0]['run']['id'] != lines[1]['run']['id']
  assert lines[0]['run']['config']['benchmark.eval_albums'] == 40
  config.benchmark.results_dir = ''  # Records nothing.
  assert results.record(config, 'eval', {'benchmarks': [{}]}) is None


def test_render_shows_each_machines_newest_run_with_the_peer(records_dir,
                                                              tmp_path):
  out = tmp_path / 'performance.md'
  results.render(str(records_dir), str(out), None)
  page = out.read_text()
  assert '### Test CPU, 2 cores' in page and '### 1 x Test GPU' in page
  assert '7,000' in page and '90,000' in page  # The newest runs.
  assert '1,111' not in page and '2,222' not in page  # Not the older.
  assert '2024-03-01T00:00:00Z-abc1234-aaa' in page
  # Our mean figure beside the strongest peer variant of the same run.
  assert '| 7,000 | mean sparse | 2,000 | 3.50x |' in page
  assert '| 150 | lstm packed | 50.0 | 3.00x |' in page
  assert 'failed: peer_train_step_lstm lstm broken at batch 128: RuntimeError' in page
  assert 'skipped: train_step_lstm at batch 8192: needs about' in page
  assert 'jax 0.1' in page and 'torch 2.0' in page
  assert '| mean | 128 | lazy |' in page  # train_loop's row.


def test_render_twice_changes_nothing(records_dir, tmp_path):
  readme = tmp_path / 'README.md'
  readme.write_text(f'a\n{results.BEGIN}\nold\n{results.END}\nb\n')
  out = tmp_path / 'docs' / 'performance.md'
  results.render(str(records_dir), str(out), str(readme))
  first = out.read_bytes(), readme.read_bytes()
  results.render(str(records_dir), str(out), str(readme))
  assert (out.read_bytes(), readme.read_bytes()) == first


def test_the_readme_block_is_replaced_and_the_rest_kept(records_dir,
                                                        tmp_path):
  readme = tmp_path / 'README.md'
  before, after = '# Title\n\nText.\n', '\n## Next\n\nMore.\n'
  readme.write_text(f'{before}{results.BEGIN}\nold table\n{results.END}'
                    f'{after}')
  results.render(str(records_dir), str(tmp_path / 'docs' / 'p.md'),
                 str(readme))
  text = readme.read_text()
  assert text.startswith(before + results.BEGIN + '\n')
  assert text.endswith(results.END + after)
  block = text[len(before):-len(after)]
  assert 'old table' not in block
  assert ('| Train step, mean encoder, batch 128 (examples/s) | 7,000 | '
          '2,000 (mean sparse) | 3.50x | Test CPU, 2 cores | 2024-03-01 |'
          in block)
  assert '| Train step, LSTM encoder, batch 128 (examples/s) | 150 |' in block
  assert '| 90,000 |' in block  # The GPU's newest too.
  assert ('| Training loop / step alone, mean encoder, batch 128 | 0.8 |'
          in block)
  assert '[docs/p.md](docs/p.md)' in block


def test_a_readme_without_markers_is_left_alone(records_dir, tmp_path,
                                                capsys):
  readme = tmp_path / 'README.md'
  readme.write_text(f'# Title\n{results.BEGIN}\nno end marker\n')
  before = readme.read_bytes()
  results.render(str(records_dir), str(tmp_path / 'p.md'), str(readme))
  assert readme.read_bytes() == before
  assert 'left unchanged' in capsys.readouterr().err


def test_no_records_say_so_and_how_to_make_them(tmp_path):
  out = tmp_path / 'p.md'
  assert results.main(['render', '--results_dir', str(tmp_path / 'none'),
                       '--out', str(out), '--readme', '']) == 0
  page = out.read_text()
  assert 'No benchmark records yet.' in page
  assert '--config.benchmark.results_dir' in page
  assert 'No benchmark records yet' in results.render_headline({})


def test_a_step_that_cannot_fit_is_skipped_with_why(monkeypatch, capsys):
  class Memory:
    available = 64 * 2**20
    total = 8 * 2**30
  monkeypatch.setattr(benchmark.psutil, 'virtual_memory', Memory)
  config = test_config.get_config()
  config.benchmark.update(kind='train', encoders='lstm', batch_sizes='8',
                          min_seconds=0.0)
  assert benchmark.step_bytes(config, 'lstm', 8) > Memory.available
  result = benchmark.run_train(config, '')
  line, = result['benchmarks']
  assert line['skipped'] == 'train_step_lstm at batch 8' and (
      'GiB available' in line['why'])
  printed = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert printed == [{k: v for k, v in line.items()
                      if k not in ('encoder', 'batch_size')}]


def test_the_memory_bound_grows_with_the_batch_and_padding():
  config = test_config.get_config()
  sizes = [benchmark.step_bytes(config, 'lstm', b) for b in (8, 64, 512)]
  assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
  assert benchmark.step_bytes(config, 'lstm', 64, 'padded') > (
      benchmark.step_bytes(config, 'lstm', 64, 'packed'))


def test_a_newer_run_of_one_encoder_keeps_the_others_figures(records_dir,
                                                             tmp_path):
  """Each measurement's newest figure: a later run that timed only the
  LSTM replaces the LSTM's row, and the mean encoder's stays."""
  line = {'benchmark': 'train_step_lstm', 'encoder': 'lstm',
          'batch_size': 128, 'examples_per_s': 333.0,
          'embedding_update': 'lazy', 'config_default': True}
  results.append(str(records_dir), 'train', [line],
                 _run(CPU, '2024-04-01T00:00:00Z', 'fff'))
  out = tmp_path / 'p.md'
  readme = tmp_path / 'README.md'
  readme.write_text(f'{results.BEGIN}\n{results.END}\n')
  results.render(str(records_dir), str(out), str(readme))
  cpu = out.read_text().split('### Test CPU')[1].split('##')[0]
  assert '| 1 | lstm | 128 | lazy | - | - | - | - | 333 | - | - | - |' in cpu
  assert '| 2 | mean | 128 | lazy |' in cpu and '7,000' in cpu
  assert '| 150 |' not in cpu  # The older LSTM figure is replaced.
  assert cpu.index('fff') < cpu.index('aaa')  # Newest first.
  block = readme.read_text()
  assert '| 333 | - | - | Test CPU, 2 cores | 2024-04-01 |' in block
  assert '| 7,000 | 2,000 (mean sparse) | 3.50x | Test CPU' in block
