"""launch.py as a user runs it: modes, JSON result line, clear errors."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _launch(workdir, *args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
       os.path.join(ROOT, 'configs', 'test.py'), '--workdir', str(workdir),
       '--noprogress', *args],
      capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.mark.slow
def test_synth_then_preprocess_print_and_save_their_result(tmp_path):
  synth = _launch(tmp_path, '--mode=synth')
  assert synth.returncode == 0, synth.stderr
  result = json.loads(synth.stdout.strip().splitlines()[-1])
  assert result['mode'] == 'synth' and result['albums'] == 40
  with open(tmp_path / 'synth.json') as f:
    assert json.load(f) == result
  mard = tmp_path / 'synthetic_mard'
  assert (mard / 'mard_metadata.json').exists()

  pre = _launch(tmp_path, '--mode=preprocess', '--config.data.max_len=32')
  assert pre.returncode == 0, pre.stderr
  result = json.loads(pre.stdout.strip().splitlines()[-1])
  assert result['mode'] == 'preprocess'
  assert result['synth']['reused']  # The corpus from --mode=synth is reused.
  assert sum(result['reviews'].values()) == 320
  assert all(result['reconcile'].values())
  assert os.path.isfile(tmp_path / 'data' / 'manifest.json')
  with open(tmp_path / 'preprocess.json') as f:
    assert json.load(f) == result


@pytest.mark.slow
def test_preprocess_reads_a_given_mard_dir(tmp_path, tiny_corpus_master):
  out = tmp_path / 'records'
  run = _launch(tmp_path, '--mode=preprocess',
                f'--config.data.mard_dir={tiny_corpus_master}',
                f'--config.data.tfrecord_dir={out}')
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert 'synth' not in result and result['tfrecord_dir'] == str(out)
  assert not (tmp_path / 'synthetic_mard').exists()


@pytest.mark.parametrize('args,message', [
    (['--config.data.vocab_sise=3'], "no field 'vocab_sise'"),
    (['--config.dta.x=3'], "no field 'dta'"),
    (['--config.data.vocab_size=abc'], 'invalid literal'),
    (['--mode=nonsense'], 'value should be one of'),
    (['--config.data.vocab_size=0'], 'vocab_size'),
    (['--config.data.mard_dir=/no/such/dir'], 'does not exist'),
    (['--config.data.synth_preset=huge'], 'synth_preset'),
    (['--config.model.lstm_loop=fused'], 'lstm_loop'),
    (['--config.benchmark.lstm_loops=per_direction,fused'],
     "'fused' is none of"),
    (['--config.benchmark.embedding_updates=lazy,sparse'],
     "'sparse' is none of"),
])
def test_bad_flags_and_config_fail_with_one_clear_line(tmp_path, args,
                                                       message):
  run = _launch(tmp_path, '--mode=preprocess', *args)
  assert run.returncode == 2
  assert 'Traceback' not in run.stderr
  assert message in run.stderr.strip().splitlines()[-1] or message in (
      run.stderr), run.stderr


def test_refuses_to_overwrite_a_real_corpus_with_synthetic_data(tmp_path):
  real = tmp_path / 'mine'
  real.mkdir()
  (real / 'mard_metadata.json').write_text('{"amazon-id": "B1"}\n')
  run = _launch(tmp_path, '--mode=synth', f'--config.data.mard_dir={real}')
  assert run.returncode == 2 and 'refusing' in run.stderr
  assert (real / 'mard_metadata.json').read_text() == '{"amazon-id": "B1"}\n'


@pytest.mark.slow
def test_train_logs_its_plan_first_and_records_it(tmp_path):
  """--mode=train: the execution plan is the run's first log line (after
  jax's own start-up) and its result's 'plan'."""
  run = _launch(tmp_path, '--config.train.num_steps=2',
                '--config.train.eval_every=2', '--config.train.log_every=2',
                '--config.train.checkpoint_every=2')
  assert run.returncode == 0, run.stderr
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result['plan']['embedding_update'] == 'lazy'  # A CPU's 'auto'.
  assert 'auto' not in result['plan'].values()
  ours = [line for line in run.stderr.splitlines()
          if line[:1] in 'IWE' and '] ' in line and 'xla_bridge' not in line
          and 'port.cc' not in line]
  assert '] Plan: backend=cpu' in ours[0], ours[:3]


@pytest.mark.slow
def test_a_second_run_reads_its_programs_from_the_compilation_cache(
    tmp_path, monkeypatch):
  """--compile_cache=DIR: the first run writes its compiled programs
  there; a second run of the same config (another workdir) writes none,
  every program read back; off writes nothing."""
  cache = tmp_path / 'cache'
  args = ('--config.train.num_steps=2', '--config.train.eval_every=2',
          '--config.train.log_every=2', '--config.train.checkpoint_every=2',
          f'--compile_cache={cache}')
  run = _launch(tmp_path / 'a', *args)
  assert run.returncode == 0, run.stderr
  first = set(os.listdir(cache))
  assert len(first) >= 3, first  # The step, evaluation, embedding.
  run = _launch(tmp_path / 'b', *args)
  assert run.returncode == 0, run.stderr
  assert set(os.listdir(cache)) == first
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'user_cache'))
  run = _launch(tmp_path / 'c', *args[:-1], '--compile_cache=off')
  assert run.returncode == 0, run.stderr
  assert not (tmp_path / 'user_cache' / 'mardjax').exists()
  assert not os.path.exists(os.path.join(ROOT, 'off'))
