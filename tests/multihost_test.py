"""Two processes on 127.0.0.1 train in lock-step through jax.distributed."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _free_port():
  # The coordinator listens on every interface ('[::]:port'), so the port is
  # probed there too. Another program may still take it before the
  # coordinator binds it: `_run_pair` then starts the pair again on a new one.
  with socket.socket(socket.AF_INET6) as s:
    s.bind(('::', 0))
    return s.getsockname()[1]


# What the coordinator (process 0) prints when it could not start the
# distributed service, as when its port was taken meanwhile: jax's error, or
# a crash whose stack is inside `modes.init_distributed` (nothing trained).
_SERVICE_NOT_STARTED = ('Failed to start RPC server', 'in init_distributed')


def _run_pair(workdir, corpus, data_dir, steps, extra=(), tries=3):
  """Runs launch.py as processes 0 and 1 of one job; their final JSON lines.

  Any failure of process 0 stops process 1, which would wait for it. A
  coordinator that could not start its service (its port taken) is the only
  failure retried: the pair starts again on another port, nothing having
  been trained or written by then.
  """
  for attempt in range(tries):
    port = _free_port()
    procs = _start_pair(workdir, corpus, data_dir, steps, extra, port)
    out, err = procs[0].communicate(timeout=600)
    if procs[0].returncode != 0:
      # Process 1 would wait for a coordinator that is gone.
      procs[1].kill()
      procs[1].communicate(timeout=60)
      if (any(sign in err for sign in _SERVICE_NOT_STARTED)
          and attempt + 1 < tries):
        continue
      raise AssertionError(err[-3000:])
    outputs = [(procs[0].returncode, out, err)]
    out1, err1 = procs[1].communicate(timeout=600)
    outputs.append((procs[1].returncode, out1, err1))
    results = []
    for returncode, out, err in outputs:
      assert returncode == 0, err[-3000:]
      results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _start_pair(workdir, corpus, data_dir, steps, extra, port):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  return [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
       os.path.join(ROOT, 'configs', 'test.py'), '--workdir', str(workdir),
       '--noprogress', f'--config.data.mard_dir={corpus}',
       f'--config.data.tfrecord_dir={data_dir}',
       f'--config.train.num_steps={steps}', '--config.train.checkpoint_every=4',
       '--config.train.eval_every=1000', '--config.train.log_every=4',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={pid}', *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for pid in range(2)]


@pytest.mark.slow
def test_two_processes_train_in_lock_step_and_resume(tmp_path,
                                                     tiny_corpus_master,
                                                     tiny_records):
  """Two processes stopped after step 4 and started again restore the
  multi-host checkpoint and end at the parameters of the same job run for
  8 steps without a stop; in both runs the two processes agree."""
  data_dir, _ = tiny_records
  straight = _run_pair(tmp_path / 'straight', tiny_corpus_master, data_dir, 8)
  assert straight[0]['params_sha256'] == straight[1]['params_sha256']
  assert straight[0]['recall@10'] == straight[1]['recall@10']
  stopped = _run_pair(tmp_path / 'resumed', tiny_corpus_master, data_dir, 4)
  assert stopped[0]['params_sha256'] != straight[0]['params_sha256']
  resumed = _run_pair(tmp_path / 'resumed', tiny_corpus_master, data_dir, 8)
  assert resumed[0]['resumed_from'] == resumed[1]['resumed_from'] == 4
  assert [r['params_sha256'] for r in resumed] == [
      straight[0]['params_sha256']] * 2
  # The last evaluation (step 8) of equal parameters; the best evaluation
  # may differ, since the stopped run also evaluated step 4.
  assert resumed[0]['last'] == resumed[1]['last'] == straight[0]['last']


@pytest.mark.slow
@pytest.mark.parametrize('encoder,update', [('mean', 'dense'),
                                            ('lstm', 'lazy')])
def test_two_processes_assemble_batches_on_their_own_devices(
    tmp_path, tiny_corpus_master, tiny_records, encoder, update):
  """Under pmap each process copies its own albums' tables to its devices
  and sends indices (and, for the lazy update, the word list of the union
  over processes; for the packed LSTM, the row count of the fullest
  device of any process): the same run as host-assembled batches, bit for
  bit."""
  data_dir, _ = tiny_records
  runs = {}
  for assembly in ('host', 'device'):
    runs[assembly] = _run_pair(
        tmp_path / assembly, tiny_corpus_master, data_dir, 8,
        (f'--config.model.text_encoder={encoder}',
         f'--config.train.embedding_update={update}',
         f'--config.train.batch_assembly={assembly}'))
  shas = {r['params_sha256'] for rs in runs.values() for r in rs}
  assert len(shas) == 1
  assert runs['host'][0]['recall@10'] == runs['device'][0]['recall@10']


@pytest.mark.slow
def test_a_pair_whose_port_was_taken_starts_again_on_another(
    tmp_path, tiny_corpus_master, tiny_records, monkeypatch):
  """The first port handed to the pair is held by a listener of the test's
  own, as another program could take it between the probe and the bind:
  the coordinator cannot bind it, and the pair is started again on a new
  port and trains."""
  data_dir, _ = tiny_records
  with socket.socket(socket.AF_INET6) as held:
    held.bind(('::', 0))
    held.listen()
    ports = [held.getsockname()[1]]
    probe = _free_port
    monkeypatch.setattr(sys.modules[__name__], '_free_port',
                        lambda: ports.pop() if ports else probe())
    results = _run_pair(tmp_path, tiny_corpus_master, data_dir, 1)
  assert not ports  # The held port was handed out first.
  assert [r['steps'] for r in results] == [1, 1]
