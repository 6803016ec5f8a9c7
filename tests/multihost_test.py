"""Two processes on 127.0.0.1 train in lock-step through jax.distributed."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_pair(workdir, corpus, data_dir, steps, extra=()):
  port = _free_port()
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  procs = [subprocess.Popen(
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
  results = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  return results


def test_two_processes_train_in_lock_step_and_resume(tmp_path,
                                                     tiny_corpus_master,
                                                     tiny_records):
  data_dir, _ = tiny_records
  first = _run_pair(tmp_path, tiny_corpus_master, data_dir, 8)
  assert first[0]['params_sha256'] == first[1]['params_sha256']
  assert first[0]['recall@10'] == first[1]['recall@10']
  # Both processes restore the multi-host checkpoint and go on together.
  second = _run_pair(tmp_path, tiny_corpus_master, data_dir, 12)
  assert second[0]['resumed_from'] == second[1]['resumed_from'] == 8
  assert second[0]['params_sha256'] == second[1]['params_sha256']
  assert second[0]['params_sha256'] != first[0]['params_sha256']


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
